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

from accel.kernels.reference import attention_with_lse


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


def block_means(key: torch.Tensor, partition: BlockPartition) -> torch.Tensor:
    """``[B, C, H, D]`` mean key of each block (fp32)."""
    batch, tokens, heads, dim = key.shape
    index = partition.block_of_token.to(key.device)
    sums = torch.zeros(batch, partition.num_blocks, heads, dim, dtype=torch.float32, device=key.device)
    sums.index_add_(1, index, key.float())
    counts = torch.bincount(index, minlength=partition.num_blocks).clamp_min(1).to(torch.float32)
    return sums / counts[None, :, None, None]


def select_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    partition: BlockPartition,
    threshold: float,
    max_chunk_elements: int = 1 << 25,
) -> torch.Tensor:
    """``[B, H, S, C]`` booleans: the blocks each query attends (global per-head cumulative-similarity selection).

    Vectorised over queries and blocks; (batch, head) pairs are processed in chunks of at most
    ``max_chunk_elements`` gate entries.
    """
    batch, tokens, heads, _ = query.shape
    blocks = partition.num_blocks
    own = F.one_hot(partition.block_of_token.to(query.device), blocks).bool()  # [S, C]
    if threshold >= 1.0:
        return torch.ones(batch, heads, tokens, blocks, dtype=torch.bool, device=query.device)
    means = block_means(key, partition)  # [B, C, H, D]
    q = query.float().permute(0, 2, 1, 3).reshape(batch * heads, tokens, -1)
    m = means.permute(0, 2, 1, 3).reshape(batch * heads, blocks, -1)
    selected = torch.empty(batch * heads, tokens, blocks, dtype=torch.bool, device=query.device)
    rows = max(1, max_chunk_elements // (tokens * blocks))
    for first in range(0, batch * heads, rows):
        part = slice(first, min(first + rows, batch * heads))
        gate = q[part] @ m[part].transpose(1, 2)  # [G, S, C]
        selected[part] = _threshold_selection(gate, own, threshold)
    return selected.view(batch, heads, tokens, blocks)


def _threshold_selection(gate: torch.Tensor, own: torch.Tensor, threshold: float) -> torch.Tensor:
    groups = gate.shape[0]
    low = gate.amin(dim=(1, 2), keepdim=True)
    spread = gate.amax(dim=(1, 2), keepdim=True) - low
    # A flat gate (every pair alike) normalises to zeros: nothing beyond the own blocks is needed or preferred.
    normalised = (gate - low) / torch.where(spread > 0, spread, torch.ones_like(spread))
    total = normalised.sum(dim=(1, 2))
    own_share = (normalised * own).sum(dim=(1, 2))
    needed = threshold * total - own_share  # [G]
    # Own blocks are marked -1 and never counted among the others.
    others = normalised.masked_fill(own, -1.0).reshape(groups, -1)
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
    bucket = torch.where(
        valid, (values * _BINS).long().clamp(max=_BINS - 1), torch.full_like(values, -1, dtype=torch.long)
    )
    flat_bucket = (torch.arange(rows, device=device)[:, None] * _BINS + bucket)[valid]
    sums = torch.zeros(rows * _BINS, dtype=values.dtype, device=device).index_add_(0, flat_bucket, values[valid])
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
    result for every query.
    """
    batch, tokens, heads, dim = query.shape
    value_dim = value.shape[-1]
    device = query.device
    groups = batch * heads
    block_tokens = partition.block_tokens.to(device)  # [C, M]
    blocks, per_block = block_tokens.shape

    q_heads = query.permute(0, 2, 1, 3).reshape(groups * tokens, dim)
    k_heads = key.permute(0, 2, 1, 3).reshape(groups * tokens, dim)
    v_heads = value.permute(0, 2, 1, 3).reshape(groups * tokens, value_dim)
    merged = _LogSumExpMerge(groups * tokens, value_dim, device)

    by_block = selected.reshape(groups, tokens, blocks).transpose(1, 2)  # [G, C, S]
    counts = by_block.sum(dim=-1).flatten()  # queries per (group, block) unit
    pairs = by_block.nonzero()  # (group, block, query), grouped by unit
    query_of_pair = pairs[:, 2]
    first_pair = torch.cumsum(counts, 0) - counts
    units = torch.argsort(counts, stable=True)
    units = units[counts[units] > 0]

    key_valid = block_tokens >= 0
    key_slots = block_tokens.clamp_min(0)
    partial_blocks = not bool(key_valid.all())
    widest = int(counts.max()) if units.numel() else 0
    per_unit = (widest * (dim + 2 * value_dim) + per_block * (dim + value_dim)) * query.element_size()
    chunk_units = max(1, max_chunk_bytes // max(per_unit, 1))
    for first in range(0, units.numel(), chunk_units):
        chunk = units[first : first + chunk_units]
        unit_counts = counts[chunk]
        rows = int(unit_counts[-1])
        slot = torch.arange(rows, device=device)
        valid = slot[None] < unit_counts[:, None]  # [U, rows]
        pair = first_pair[chunk][:, None] + torch.minimum(slot[None], unit_counts[:, None] - 1)
        base = (chunk // blocks * tokens)[:, None]
        query_rows = base + query_of_pair[pair]  # [U, rows] rows of q_heads
        key_rows = base + key_slots[chunk % blocks]  # [U, M]
        mask = None
        if partial_blocks:
            mask = torch.zeros(chunk.numel(), 1, 1, per_block, dtype=query.dtype, device=device)
            mask = mask.masked_fill(~key_valid[chunk % blocks][:, None, None, :], float("-inf"))
        out, lse = attention_with_lse(
            q_heads[query_rows][:, None], k_heads[key_rows][:, None], v_heads[key_rows][:, None], mask
        )
        merged.add(query_rows[valid], out[:, 0][valid], lse[:, 0][valid])

    if extra_key is not None:
        out, lse = attention_with_lse(
            query.transpose(1, 2), extra_key.transpose(1, 2), extra_value.transpose(1, 2), key_padding=extra_mask
        )  # [B, H, S, Dv], [B, H, S]
        merged.add(torch.arange(groups * tokens, device=device), out.reshape(-1, value_dim), lse.reshape(-1))
    return merged.result().to(query.dtype).view(batch, heads, tokens, value_dim).transpose(1, 2)


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
        return self.total / self.weight[:, None]
