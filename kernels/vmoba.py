"""VMoBA: mixture-of-block attention for video (and image) token grids, training-free.

Keys are cut into blocks of the token grid (a ``BlockPartition``: whole frames, patches through all frames, or
cubes; layers cycle through them). Each block is represented by the mean of its keys. Per head, the gate
``q · mean_k`` of every (query, block) pair is min-max normalised over the whole head ("global" selection); each
query keeps its own block, and the other (query, block) pairs are taken in decreasing order until the kept pairs hold
``threshold`` (τ) of the head's total normalised gate. A query then attends every token of its kept blocks, plus the
extra (text) keys. ``threshold >= 1`` keeps every block: dense attention.

Tensors are ``[B, S, H, D]`` with the grid flattened row-major. Three implementations share the selection:

- ``block_attention_reference``: an explicit ``[S, S]`` mask, the truth for tests at small sizes;
- ``block_attention_sparse``: the CPU path: for every (head, key block) the queries that kept it attend its tokens
  (batched SDPA with log-sum-exp per chunk of blocks), and the partial results are merged by log-sum-exp;
- the Triton block-sparse kernel is the GPU path still to come (it needs per-query block masks).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from accel.kernels.reference import attention_with_lse, gradients_tracked


@dataclass(frozen=True)
class BlockPartition:
    """A partition of a token grid into blocks (boxes of ``block`` tokens per axis; the last ones may be partial).

    Attributes:
        grid: the token grid.
        block: block sides per axis (each at most the grid side).
        block_of_token: ``[S]`` the block of each token (blocks numbered in raster order of their positions).
        block_tokens: ``[C, M]`` the tokens of each block (``M`` = a whole block's tokens), ``-1`` past a partial
            block's end.
    """

    grid: tuple[int, ...]
    block: tuple[int, ...]
    block_of_token: torch.Tensor
    block_tokens: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.block_tokens.shape[0]

    @property
    def tokens(self) -> int:
        return self.block_of_token.numel()


def block_partition(grid: tuple[int, ...], block: tuple[int | None, ...]) -> BlockPartition:
    """The partition of ``grid`` into ``block``-sized boxes; ``None`` on an axis takes the whole axis.

    Raises a ``ValueError`` that names the fix for a block with the wrong number of axes, a non-positive side or a
    side larger than the grid's.
    """
    grid = tuple(int(side) for side in grid)
    if len(block) != len(grid):
        raise ValueError(f"a block needs one side per grid axis: got {tuple(block)} for the {len(grid)}-D grid {grid}")
    sides = []
    for axis, (side, size) in enumerate(zip(grid, block, strict=True)):
        size = side if size is None else size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"block side {size!r} on axis {axis} must be a positive int (or None for the whole axis)")
        if size > side:
            raise ValueError(
                f"block {tuple(block)} is larger than the token grid {grid} on axis {axis} ({size} > {side}); "
                f"use a block side of at most {side} there, or None for the whole axis"
            )
        sides.append(size)
    return _partition(grid, tuple(sides))


@functools.lru_cache(maxsize=64)
def _partition(grid: tuple[int, ...], block: tuple[int, ...]) -> BlockPartition:
    counts = [math.ceil(side / size) for side, size in zip(grid, block, strict=True)]
    coords = torch.stack(torch.meshgrid(*(torch.arange(side) for side in grid), indexing="ij"), dim=-1)
    block_coords = coords // torch.tensor(block)
    block_of_token = torch.zeros(grid, dtype=torch.long)
    for axis, count in enumerate(counts):
        block_of_token = block_of_token * count + block_coords[..., axis]
    block_of_token = block_of_token.flatten()
    order = torch.argsort(block_of_token, stable=True)
    sizes = torch.bincount(block_of_token, minlength=math.prod(counts))
    per_block = math.prod(block)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(order.numel()) - starts[block_of_token[order]]
    block_tokens = torch.full((math.prod(counts), per_block), -1, dtype=torch.long)
    block_tokens[block_of_token[order], slot] = order
    return BlockPartition(grid, block, block_of_token, block_tokens)


# Bytes of temporaries per gate entry (one query, one block) while a head's blocks are selected: the fp32 gate, its
# normalised copy, bin indices and masks of ``_take_largest_until``. Measured peak at HunyuanVideo's 720p grid: 33.
_SELECTION_BYTES_PER_GATE = 36
_SELECTION_CHUNK_BYTES = 128 * 2**20


def block_means(key: torch.Tensor, partition: BlockPartition, max_chunk_bytes: int = _SELECTION_CHUNK_BYTES):
    """``[B, C, H, D]`` mean key of each block (fp32); keys are converted to fp32 ``max_chunk_bytes`` at a time."""
    batch, tokens, heads, dim = key.shape
    index = partition.block_of_token.to(key.device)
    sums = torch.zeros(batch, partition.num_blocks, heads, dim, dtype=torch.float32, device=key.device)
    step = max(1, max_chunk_bytes // (batch * heads * dim * 4))
    for first in range(0, tokens, step):
        part = slice(first, first + step)
        sums.index_add_(1, index[part], key[:, part].float())
    counts = torch.bincount(index, minlength=partition.num_blocks).clamp_min(1).to(torch.float32)
    return sums / counts[None, :, None, None]


def select_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    partition: BlockPartition,
    threshold: float,
    max_chunk_bytes: int = _SELECTION_CHUNK_BYTES,
) -> torch.Tensor:
    """``[B, H, S, C]`` booleans: the blocks each query attends (global per-head cumulative-similarity selection).

    Vectorised over queries and blocks, a few heads at a time: their temporaries (the fp32 queries and
    ``_SELECTION_BYTES_PER_GATE`` per gate entry) stay under ``max_chunk_bytes``, or take one head where a head alone
    outgrows it (the selection is global over a head's queries).
    """
    with torch.no_grad():
        # Booleans carry no gradient: recorded under latent guidance, the selection kept fp32 copies of the queries.
        return _select_blocks(query, key, partition, threshold, max_chunk_bytes)


def _select_blocks(query, key, partition, threshold, max_chunk_bytes):
    batch, tokens, heads, dim = query.shape
    blocks = partition.num_blocks
    if threshold >= 1.0:
        return torch.ones(batch, heads, tokens, blocks, dtype=torch.bool, device=query.device)
    own = torch.zeros(tokens, blocks, dtype=torch.bool, device=query.device)
    own[torch.arange(tokens, device=query.device), partition.block_of_token.to(query.device)] = True
    means = block_means(key, partition, max_chunk_bytes)  # [B, C, H, D]
    selected = torch.empty(batch, heads, tokens, blocks, dtype=torch.bool, device=query.device)
    per_head = tokens * (blocks * _SELECTION_BYTES_PER_GATE + dim * 4)
    step = max(1, min(heads, max_chunk_bytes // per_head))
    for sample in range(batch):
        for first in range(0, heads, step):
            part = slice(first, first + step)
            q = query[sample, :, part].transpose(0, 1).float()  # [h, S, D], a view when already fp32
            selected[sample, part] = _threshold_selection(q @ means[sample, :, part].permute(1, 2, 0), own, threshold)
    return selected


def _threshold_selection(gate: torch.Tensor, own: torch.Tensor, threshold: float) -> torch.Tensor:
    """The selection of ``[G, S, C]`` gates, computed in place of them."""
    groups = gate.shape[0]
    low = gate.amin(dim=(1, 2), keepdim=True)
    spread = gate.amax(dim=(1, 2), keepdim=True) - low
    # A flat gate (every pair alike) normalises to zeros: nothing beyond the own blocks is needed or preferred.
    normalised = gate.sub_(low).div_(torch.where(spread > 0, spread, torch.ones_like(spread)))
    total = normalised.sum(dim=(1, 2))
    own_share = (normalised * own).sum(dim=(1, 2))
    needed = threshold * total - own_share  # [G]
    # Own blocks are marked -1 and never counted among the others.
    others = normalised.masked_fill_(own, -1.0).view(groups, -1)
    return _take_largest_until(others, needed).view_as(gate) | own


_BINS = 1024


def _take_largest_until(values: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """Per row, the fewest largest non-negative values (ties: lower index first) whose sum reaches ``needed``.

    Same result as sorting each row, without sorting it: values in [0, 1] are binned, the bin where the running sum
    from the top crosses ``needed`` is found from per-bin sums, every value above it is taken and only the values
    inside that bin are sorted.
    """
    rows, width = values.shape
    device = values.device
    valid = values >= 0
    # int32 bins and in-place steps: these are the largest temporaries of the selection.
    bucket = (values * _BINS).to(torch.int32).clamp_(max=_BINS - 1).masked_fill_(~valid, -1)
    flat_bucket = (torch.arange(rows, device=device, dtype=torch.int32)[:, None] * _BINS + bucket)[valid]
    sums = torch.zeros(rows * _BINS, dtype=values.dtype, device=device).index_add_(0, flat_bucket, values[valid])
    del flat_bucket
    from_top = sums.view(rows, _BINS).flip(1).cumsum(1).flip(1)  # sum of the bins >= b
    # The crossing bin: the highest bin whose running sum from the top reaches what is needed (-1: never, take all;
    # _BINS: nothing is needed).
    crossing = (from_top >= needed[:, None]).sum(dim=1) - 1
    crossing = torch.where(needed > 0, crossing, torch.full_like(crossing, _BINS))
    taken = bucket > crossing[:, None]
    # Inside the crossing bin, take values in decreasing order while the sum stays short of what is needed.
    above = torch.cat([from_top, torch.zeros(rows, 1, dtype=values.dtype, device=device)], dim=1)
    remaining = needed - torch.gather(above, 1, (crossing + 1).clamp(0, _BINS)[:, None])[:, 0]
    row, column = (bucket == crossing[:, None]).nonzero(as_tuple=True)
    if row.numel():
        candidates = values[row, column]
        by_value = torch.argsort(candidates, descending=True, stable=True)
        order = by_value[torch.argsort(row[by_value], stable=True)]
        row, column, candidates = row[order], column[order], candidates[order]
        running = candidates.cumsum(0)
        counts = torch.bincount(row, minlength=rows)
        start = torch.cumsum(counts, 0) - counts
        before_row = torch.where(start > 0, running[(start - 1).clamp_min(0)], torch.zeros_like(running[:1]))
        sum_before = running - candidates - before_row[row]
        keep = sum_before < remaining[row]
        taken[row[keep], column[keep]] = True
    return taken


def block_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    partition: BlockPartition,
    selected: torch.Tensor,
    extra_key: torch.Tensor | None = None,
    extra_value: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with the explicit ``[B, H, S, S]`` mask of ``selected`` blocks, in fp32 (small sizes only)."""
    mask = selected[..., partition.block_of_token.to(query.device)]  # [B, H, S, S]
    q, k, v = (t.float().transpose(1, 2) for t in (query, key, value))
    if extra_key is not None:
        k = torch.cat([k, extra_key.float().transpose(1, 2)], dim=2)
        v = torch.cat([v, extra_value.float().transpose(1, 2)], dim=2)
        text = torch.ones(query.shape[0], extra_key.shape[1], dtype=torch.bool, device=query.device)
        if extra_mask is not None:
            text = extra_mask
        mask = torch.cat([mask, text[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)], dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).to(query.dtype)


def block_attention_sparse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    partition: BlockPartition,
    selected: torch.Tensor,
    extra_key: torch.Tensor | None = None,
    extra_value: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    max_chunk_bytes: int = 256 * 2**20,
) -> torch.Tensor:
    """The CPU path: per (batch, head, key block), the queries that kept it attend its tokens; partial results are
    merged by log-sum-exp, so the work follows the kept (query, block) pairs exactly.

    Units are ordered by how many queries kept them and processed in chunks (queries padded to the chunk's largest
    unit) so that the gathered tensors stay under ``max_chunk_bytes``. The extra (text) keys are one more partial
    result for every query. Under autograd the backward pass recomputes the attention probabilities chunk by chunk
    (``_SparseBlockAttention``) and the graph holds the inputs, the output and one log-sum-exp per query.
    """
    batch, tokens, heads, _ = query.shape
    if gradients_tracked(query, key, value, extra_key, extra_value):
        out = _SparseBlockAttention.apply(
            query, key, value, extra_key, extra_value, partition, selected, extra_mask, max_chunk_bytes
        )
    else:
        out = _sparse_merge(
            query, key, value, partition, selected, extra_key, extra_value, extra_mask, max_chunk_bytes
        ).result()
    return out.to(query.dtype).view(batch, heads, tokens, -1).transpose(1, 2)


# One slice of (sample, head) groups at a time: its pairs' int64 query indices, the [C, S] booleans searched for them
# and head-major copies of its queries, keys and values stay under this (one group at least). All groups at once took
# 1.4 GB beyond the inputs at 30,720 tokens x 24 heads x 64 with 256-token blocks (pair indices alone 425 MB).
_GROUP_SLICE_BYTES = 128 * 2**20


def _unit_chunks(selected, partition, bytes_per_query, bytes_per_key, max_chunk_bytes, bytes_per_token=0):
    """The kept (query, block) pairs of ``[B, H, S, C]`` ``selected``, grouped by unit (one group's block, a group
    being one sample's head) in chunks of units whose gathered tensors (``bytes_per_query`` per padded query row,
    ``bytes_per_key`` per block key) stay under ``max_chunk_bytes``.

    Groups are taken a slice at a time, slices costing ``bytes_per_token`` per group and token besides their pair
    indices. Yields ``(groups, query_rows, valid, key_rows, key_valid)``: the slice of groups, ``[U, R]`` rows of the
    slice's ``[groups * S]`` head-major tokens (a unit with fewer than ``R`` queries repeats its last one, ``valid``
    False), ``[U, M]`` rows of its block's keys and ``[U, M]`` booleans, False past a partial block's end (``None``
    when no block is partial).
    """
    batch, heads, tokens, blocks = selected.shape
    device = selected.device
    block_tokens = partition.block_tokens.to(device)  # [C, M]
    per_block = block_tokens.shape[1]
    key_valid = block_tokens >= 0
    key_slots = block_tokens.clamp_min(0)
    partial_blocks = not bool(key_valid.all())
    by_block = selected.reshape(batch * heads, tokens, blocks).transpose(1, 2)  # [G, C, S]
    # Queries per (group, block) unit. A sum converts the booleans to int64 first (675 MB at once at 30,720 tokens x
    # 24 heads x 120 blocks), so it runs a few groups at a time.
    step = max(1, _GROUP_SLICE_BYTES // (8 * tokens * blocks))
    counts = torch.cat([by_block[first : first + step].sum(dim=-1) for first in range(0, batch * heads, step)])
    costs = counts.sum(dim=1) * 8 + tokens * (blocks + bytes_per_token)
    for groups in _slices_under(costs, _GROUP_SLICE_BYTES):
        slice_counts = counts[groups].flatten()
        # Pairs in unit order (group, block, query): the flat index of a pair modulo S is its query.
        query_of_pair = by_block[groups].reshape(-1).nonzero().squeeze(1).remainder_(tokens)
        first_pair = torch.cumsum(slice_counts, 0) - slice_counts
        units = torch.argsort(slice_counts, stable=True)
        units = units[slice_counts[units] > 0]
        widest = int(slice_counts.max()) if units.numel() else 0
        per_unit = widest * bytes_per_query + per_block * bytes_per_key
        chunk_units = max(1, max_chunk_bytes // max(per_unit, 1))
        for first in range(0, units.numel(), chunk_units):
            chunk = units[first : first + chunk_units]
            unit_counts = slice_counts[chunk]
            rows = int(unit_counts[-1])
            slot = torch.arange(rows, device=device)
            valid = slot[None] < unit_counts[:, None]  # [U, rows]
            pair = first_pair[chunk][:, None] + torch.minimum(slot[None], unit_counts[:, None] - 1)
            base = (chunk // blocks * tokens)[:, None]
            block = chunk % blocks
            key_rows = base + key_slots[block]
            yield groups, base + query_of_pair[pair], valid, key_rows, key_valid[block] if partial_blocks else None


def _slices_under(costs: torch.Tensor, budget: int):
    """Consecutive slices of ``costs`` (one element at least) whose sums stay under ``budget``."""
    start, total = 0, 0
    for index, cost in enumerate(costs.tolist()):
        if index > start and total + cost > budget:
            yield slice(start, index)
            start, total = index, 0
        total += cost
    yield slice(start, len(costs))


def _heads_major(tensor: torch.Tensor, groups: slice) -> torch.Tensor:
    """``[groups * S, D]``: the tokens of the (sample, head) ``groups`` of a ``[B, S, H, D]`` tensor, head by head.

    Gathering rows from this copy ran 2x faster than from the input's own layout, whose rows of one head lie H rows
    apart.
    """
    heads = tensor.shape[2]
    parts = []
    for sample in range(groups.start // heads, (groups.stop - 1) // heads + 1):
        first, last = max(groups.start - sample * heads, 0), min(groups.stop - sample * heads, heads)
        parts.append(tensor[sample, :, first:last].transpose(0, 1).reshape(-1, tensor.shape[-1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _sliced_inputs(tensors, groups, current):
    """``_heads_major`` copies of ``tensors`` for ``groups``, reusing ``current`` (``(groups, copies)``) when the same."""
    if current is not None and current[0] == groups:
        return current
    return groups, [_heads_major(tensor, groups) for tensor in tensors]


def _sparse_merge(query, key, value, partition, selected, extra_key, extra_value, extra_mask, max_chunk_bytes):
    """The forward pass of ``block_attention_sparse``: its ``_LogSumExpMerge`` over ``[B * H * S]`` head-major rows."""
    batch, tokens, heads, dim = query.shape
    value_dim = value.shape[-1]
    device = query.device
    merged = _LogSumExpMerge(batch * heads * tokens, value_dim, device)
    element = query.element_size()
    chunks = _unit_chunks(
        selected,
        partition,
        (dim + 2 * value_dim) * element,
        (dim + value_dim) * element,
        max_chunk_bytes,
        bytes_per_token=(2 * dim + value_dim) * element,
    )
    inputs = None
    for groups, query_rows, valid, key_rows, key_valid in chunks:
        inputs = _sliced_inputs((query, key, value), groups, inputs)
        q_rows, k_rows, v_rows = inputs[1]
        mask = None
        if key_valid is not None:
            mask = torch.zeros(key_valid.shape[0], 1, 1, key_valid.shape[1], dtype=query.dtype, device=device)
            mask = mask.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        out, lse = attention_with_lse(
            q_rows[query_rows][:, None], k_rows[key_rows][:, None], v_rows[key_rows][:, None], mask
        )
        merged.add(groups.start * tokens + query_rows[valid], out[:, 0][valid], lse[:, 0][valid])
    del inputs

    if extra_key is not None:
        out, lse = attention_with_lse(
            query.transpose(1, 2), extra_key.transpose(1, 2), extra_value.transpose(1, 2), key_padding=extra_mask
        )  # [B, H, S, Dv], [B, H, S]
        # On CPU these are laid out [B, S, H, ...] like the query: taken in that order they are views, not copies.
        rows = torch.arange(lse.numel(), device=device).view(batch, heads, tokens).transpose(1, 2).reshape(-1)
        merged.add(rows, out.transpose(1, 2).reshape(-1, value_dim), lse.transpose(1, 2).reshape(-1))
    return merged


class _SparseBlockAttention(torch.autograd.Function):
    """``block_attention_sparse`` under autograd, with the backward pass of memory-efficient attention.

    Differentiating through the forward pass kept every chunk's fp32 scores and a copy of the whole merge state per
    chunk (1.7 GB for one FLUX layer at 1024^2 where dense attention keeps 0.16 GB). The softmax over a query's keys
    is ``exp(score - lse)`` with ``lse`` the merged log-sum-exp, so the backward pass recomputes each chunk's
    probabilities from the inputs and one fp32 ``lse`` per query row, and uses the usual gradients of attention:
    ``dV = Pᵀ dO``, ``dS = P ⊙ (dO Vᵀ - rowsum(dO ⊙ O))``, ``dQ = dS K · scale``, ``dK = dSᵀ Q · scale``.
    """

    @staticmethod
    def forward(ctx, query, key, value, extra_key, extra_value, partition, selected, extra_mask, max_chunk_bytes):
        merged = _sparse_merge(
            query, key, value, partition, selected, extra_key, extra_value, extra_mask, max_chunk_bytes
        )
        out = merged.result().to(query.dtype)
        ctx.save_for_backward(query, key, value, extra_key, extra_value, selected, extra_mask, out, merged.lse())
        ctx.partition, ctx.max_chunk_bytes = partition, max_chunk_bytes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        query, key, value, extra_key, extra_value, selected, extra_mask, out, lse = ctx.saved_tensors
        batch, tokens, heads, dim = query.shape
        value_dim = value.shape[-1]
        scale = dim**-0.5
        budget = ctx.max_chunk_bytes
        rows = lse.numel()
        # rowsum(dO ⊙ O), in slices of rows so that no fp32 copy of the whole output is made.
        delta = torch.empty(rows, device=lse.device)
        step = max(1, budget // (8 * value_dim))
        for first in range(0, rows, step):
            part = slice(first, first + step)
            delta[part] = (grad_out[part].float() * out[part].float()).sum(dim=-1)

        grad_q = torch.zeros(rows, dim, device=lse.device)
        grad_k = torch.zeros(rows, dim, device=lse.device)
        grad_v = torch.zeros(rows, value_dim, device=lse.device)
        per_block = ctx.partition.block_tokens.shape[1]
        element = query.element_size()
        chunks = _unit_chunks(
            selected,
            ctx.partition,
            # fp32 per padded query row: its query, dO and dQ, and three score rows (probabilities, dP, dS).
            4 * (2 * dim + value_dim + 3 * per_block),
            4 * 2 * (dim + value_dim),
            budget,
            bytes_per_token=(2 * dim + value_dim) * element,
        )
        inputs = None
        for groups, query_rows, valid, key_rows, key_valid in chunks:
            inputs = _sliced_inputs((query, key, value), groups, inputs)
            q_rows, k_rows, v_rows = inputs[1]
            offset = groups.start * tokens
            parts = _attention_gradients(
                q_rows[query_rows].float(),
                k_rows[key_rows].float(),
                v_rows[key_rows].float(),
                grad_out[offset + query_rows].float(),
                lse[offset + query_rows],
                delta[offset + query_rows],
                scale,
                key_valid[:, None, :] if key_valid is not None else None,
                # A unit's padded rows repeat one of its queries: they must not count twice.
                valid[..., None],
            )
            for target, index, part in zip(
                (grad_q, grad_k, grad_v), (query_rows, key_rows, key_rows), parts, strict=True
            ):
                target.index_add_(0, offset + index.flatten(), part.flatten(0, 1))
        del inputs

        grad_q = grad_q.view(batch, heads, tokens, dim)
        grad_extra_key = grad_extra_value = None
        if extra_key is not None:
            # Every query attends the text keys: [B, H, S, ...] against [B, H, T, ...], in slices of queries.
            text_tokens = extra_key.shape[1]
            text_key = extra_key.transpose(1, 2).float()
            text_value = extra_value.transpose(1, 2).float()
            text_valid = None if extra_mask is None else extra_mask.to(torch.bool)[:, None, None, :]
            grad_extra_key = torch.zeros_like(text_key)
            grad_extra_value = torch.zeros_like(text_value)
            per_query = batch * heads * 4 * (2 * dim + value_dim + 3 * text_tokens)
            step = max(1, budget // per_query)
            for first in range(0, tokens, step):
                part = slice(first, first + step)
                parts = _attention_gradients(
                    query[:, part].transpose(1, 2).float(),
                    text_key,
                    text_value,
                    grad_out.view(batch, heads, tokens, value_dim)[:, :, part].float(),
                    lse.view(batch, heads, tokens)[:, :, part],
                    delta.view(batch, heads, tokens)[:, :, part],
                    scale,
                    text_valid,
                    None,
                )
                grad_q[:, :, part] += parts[0]
                grad_extra_key += parts[1]
                grad_extra_value += parts[2]
            grad_extra_key = grad_extra_key.transpose(1, 2).to(extra_key.dtype)
            grad_extra_value = grad_extra_value.transpose(1, 2).to(extra_value.dtype)

        def per_token(grad, like):
            return grad.view(batch, heads, tokens, -1).transpose(1, 2).to(like.dtype)

        return (
            per_token(grad_q, query),
            per_token(grad_k, key),
            per_token(grad_v, value),
            grad_extra_key,
            grad_extra_value,
            None,
            None,
            None,
            None,
        )


def _attention_gradients(query, key, value, grad_out, lse, delta, scale, key_valid, query_valid):
    """``(dQ, dK, dV)`` of the part of a softmax attention over ``key`` whose rows' full log-sum-exp is ``lse``.

    fp32 ``[..., R, D]`` queries and ``grad_out``, ``[..., M, D]`` keys and values, ``[..., R]`` ``lse`` and
    ``delta = rowsum(dO ⊙ O)``; ``key_valid`` (broadcast to ``[..., R, M]``) False for keys nobody attends,
    ``query_valid`` False for rows to leave out.
    """
    scores = (query @ key.transpose(-1, -2)).mul_(scale)
    if key_valid is not None:
        scores.masked_fill_(~key_valid, float("-inf"))
    probs = scores.sub_(lse[..., None]).exp_()
    if query_valid is not None:
        probs.mul_(query_valid)
    grad_value = probs.transpose(-1, -2) @ grad_out
    grad_scores = (grad_out @ value.transpose(-1, -2)).sub_(delta[..., None]).mul_(probs)
    del probs
    grad_query = (grad_scores @ key).mul_(scale)
    grad_key = (grad_scores.transpose(-1, -2) @ query).mul_(scale)
    return grad_query, grad_key, grad_value


class _LogSumExpMerge:
    """Accumulates partial attention results ``(out, lse)`` per row into the softmax over all their keys."""

    def __init__(self, rows: int, dim: int, device: torch.device):
        self.peak = torch.full((rows,), float("-inf"), device=device)
        self.weight = torch.zeros(rows, device=device)
        self.total = torch.zeros(rows, dim, device=device)

    def add(self, rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        lse = lse.float()
        peak = self.peak.scatter_reduce(0, rows, lse, reduce="amax")
        # Rows without earlier partial results have nothing to rescale (and -inf - -inf would be NaN).
        seen = torch.isfinite(self.peak)
        rescale = torch.where(seen, torch.exp(self.peak - torch.where(seen, peak, self.peak)), 1.0)
        self.weight.mul_(rescale)
        self.total.mul_(rescale[:, None])
        share = torch.exp(lse - peak[rows])
        self.weight.index_add_(0, rows, share)
        self.total.index_add_(0, rows, out.float() * share[:, None])
        self.peak = peak

    def result(self) -> torch.Tensor:
        """The merged rows, normalised in place of the running total (the merge's last step)."""
        return self.total.div_(self.weight[:, None])

    def lse(self) -> torch.Tensor:
        """The log-sum-exp of each row over all its keys."""
        return self.peak + torch.log(self.weight)
