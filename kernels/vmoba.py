"""VMoBA: mixture-of-block attention for video (and image) token grids, training-free.

Keys are cut into blocks of the token grid (a ``BlockPartition``: whole frames, patches through all frames, or
cubes; layers cycle through them). Each block is represented by the mean of its keys. Per head, the gate
``q · mean_k`` of every (query, block) pair is min-max normalised over the whole head ("global" selection); each
query keeps its own block, and the other (query, block) pairs are taken in decreasing order until the kept pairs hold
``threshold`` (τ) of the head's total normalised gate. A query then attends every token of its kept blocks, plus the
extra (text) keys. ``threshold >= 1`` keeps every block: dense attention.

Tensors are ``[B, S, H, D]`` with the grid flattened row-major. Three implementations share the selection:

- ``block_attention_reference``: an explicit ``[S, S]`` mask, the truth for tests at small sizes;
- ``block_attention_grouped``: the CPU path: queries grouped by their own block, each group attending the union of
  the blocks its queries kept (one batched SDPA per chunk of groups, a block-level mask inside the union);
- the Triton block-sparse kernel is the GPU path still to come (it needs per-query block masks).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    # Own blocks sort last (-1) and are never counted among the others.
    others = normalised.masked_fill(own, -1.0).reshape(groups, -1)
    ranked, order = torch.sort(others, dim=1, descending=True, stable=True)
    reached = ranked.clamp_min(0).cumsum(dim=1)
    # Smallest k with the first k others reaching what is needed (0 when the own blocks already suffice).
    count = (reached < needed[:, None]).sum(dim=1) + 1
    count = torch.where(needed > 0, count, torch.zeros_like(count))
    count = torch.minimum(count, (~own).sum().expand_as(count))
    taken = torch.arange(others.shape[1], device=gate.device)[None] < count[:, None]
    chosen = torch.zeros_like(taken).scatter_(1, order, taken)
    return chosen.view_as(gate) | own


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


def block_attention_grouped(
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
    """The CPU path: per (batch, head, query block), one SDPA over the union of the blocks its queries kept.

    Groups are ordered by union size and processed in chunks (keys padded to the chunk's largest union) so that the
    gathered keys, values and masks stay under ``max_chunk_bytes``.
    """
    batch, tokens, heads, dim = query.shape
    value_dim = value.shape[-1]
    device = query.device
    block_tokens = partition.block_tokens.to(device)  # [C, M]
    blocks, per_block = block_tokens.shape
    block_of_token = partition.block_of_token.to(device)

    # Which blocks each (batch, head, query block) needs: the union over its queries.
    query_slots = block_tokens.clamp_min(0)  # [C, M] padded slots repeat a real token and are dropped on output
    slot_valid = block_tokens >= 0
    flat_selected = selected.reshape(batch * heads, tokens, blocks)
    per_query = flat_selected[:, query_slots.flatten()].view(batch * heads, blocks, per_block, blocks)
    union = (per_query & slot_valid[None, :, :, None]).any(dim=2)  # [G0, C, C]
    union_sizes = union.sum(dim=-1).flatten()  # [G] with G = B*H*C
    groups_order = torch.argsort(union_sizes, stable=True)

    q_heads = query.permute(0, 2, 1, 3).reshape(batch * heads * tokens, dim)
    k_heads = key.permute(0, 2, 1, 3).reshape(batch * heads * tokens, dim)
    v_heads = value.permute(0, 2, 1, 3).reshape(batch * heads * tokens, value_dim)
    text_tokens = 0 if extra_key is None else extra_key.shape[1]
    if text_tokens:
        text_k = extra_key.permute(0, 2, 1, 3).reshape(batch * heads, text_tokens, dim)
        text_v = extra_value.permute(0, 2, 1, 3).reshape(batch * heads, text_tokens, value_dim)
        text_ok = None if extra_mask is None else extra_mask.repeat_interleave(heads, dim=0)  # [B*H, T]

    out = torch.empty(batch * heads * tokens, value_dim, dtype=query.dtype, device=device)
    # Chunks are sized for the widest union (the last group in the order), so every chunk fits the budget.
    widest_overall = max(1, int(union_sizes.max()))
    per_group = per_block * (widest_overall * per_block + text_tokens) * (dim + value_dim + 1) * query.element_size()
    chunk_groups = max(1, max_chunk_bytes // per_group)
    for start in range(0, groups_order.numel(), chunk_groups):
        chunk = groups_order[start : start + chunk_groups]
        widest = max(1, int(union_sizes[chunk[-1]]))
        head_group, query_block = chunk // blocks, chunk % blocks  # head_group indexes B*H
        kept = union.view(-1, blocks)[chunk]  # [g, C]
        # The kept blocks of each group first (stable order), padded with block 0 (masked out below).
        rank = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :widest]
        rank_valid = torch.gather(kept, 1, rank)
        key_tokens = block_tokens[rank]  # [g, widest, M]
        key_valid = (key_tokens >= 0) & rank_valid[..., None]
        key_tokens = key_tokens.clamp_min(0).flatten(1)
        key_valid = key_valid.flatten(1)

        q_tokens = query_slots[query_block]  # [g, M]
        base = (head_group * tokens)[:, None]
        q = q_heads[base + q_tokens]  # [g, M, D]
        k = k_heads[base + key_tokens]
        v = v_heads[base + key_tokens]
        # Each query attends the tokens of the blocks it kept itself (a subset of its group's union).
        query_keeps = flat_selected[head_group[:, None], q_tokens]  # [g, M, C]
        mask = torch.gather(query_keeps, 2, block_of_token[key_tokens][:, None, :].expand(-1, per_block, -1))
        mask = mask & key_valid[:, None, :]
        if text_tokens:
            k = torch.cat([k, text_k[head_group]], dim=1)
            v = torch.cat([v, text_v[head_group]], dim=1)
            text_mask = (
                torch.ones(chunk.numel(), text_tokens, dtype=torch.bool, device=device)
                if text_ok is None
                else text_ok[head_group]
            )
            mask = torch.cat([mask, text_mask[:, None, :].expand(-1, per_block, -1)], dim=2)
        result = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask[:, None])[:, 0]
        valid_slots = slot_valid[query_block]
        out[(base + q_tokens)[valid_slots]] = result[valid_slots].to(out.dtype)
    return out.view(batch, heads, tokens, value_dim).transpose(1, 2)
