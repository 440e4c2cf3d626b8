"""Generalized neighborhood attention (GNA) over 1-D / 2-D / 3-D token grids: NATTEN's semantics in plain PyTorch.

Per grid axis of length ``L`` a query sees a window of ``kernel_size`` keys:

- non-causal: the window is centred on the query's stride-group leader (``kernel_size // 2`` on the left) and clamped
  at the borders, so every query sees exactly ``kernel_size`` keys;
- ``stride``: queries in a group of ``stride`` consecutive positions share the window of their leader (the middle
  position; the last one when causal); ``stride == kernel_size`` is blocked (window) attention;
- ``dilation``: the axis is split into ``dilation`` interleaved sub-grids (positions with equal ``coord % dilation``)
  and the window runs inside the query's sub-grid;
- causal: the window ends at the query itself and holds at most ``kernel_size`` keys.

A query's neighborhood is the product of its per-axis windows. Extra keys (the text tokens of FLUX / HunyuanVideo)
are seen by every query. Tensors are ``[B, S, H, D]`` with the grid flattened row-major. No diffusers import.

Three implementations share one geometry (``Neighborhood``):

- ``neighborhood_attention_reference``: an explicit ``[S, S]`` mask, the truth for tests at small sizes;
- ``neighborhood_attention_tiled``: the CPU path: query tiles, each attending the box of keys that covers the
  windows of its queries (one batched SDPA, a per-tile mask only where the box is larger than a window);
- ``accel.kernels.block_sparse``: the Triton kernel for GPUs, driven by the same per-tile key lists.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Neighborhood:
    """The geometry of one GNA problem; build it with ``Neighborhood.create``, which validates it.

    Attributes:
        grid: token grid, e.g. ``(height, width)`` or ``(frames, height, width)``.
        kernel_size, stride, dilation: per axis.
        is_causal: per axis.
    """

    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @classmethod
    def create(cls, grid, kernel_size, stride=1, dilation=1, is_causal=False) -> Neighborhood:
        grid = tuple(int(side) for side in grid)
        if not 1 <= len(grid) <= 3 or any(side < 1 for side in grid):
            raise ValueError(f"the token grid must have 1 to 3 positive sides, got {grid}")
        rank = len(grid)
        kernel_size = _per_axis("kernel_size", kernel_size, rank)
        stride = _per_axis("stride", stride, rank)
        dilation = _per_axis("dilation", dilation, rank)
        is_causal = _per_axis("is_causal", is_causal, rank, kind=bool)
        for axis, (side, kernel, step, dil) in enumerate(zip(grid, kernel_size, stride, dilation, strict=True)):
            where = f"axis {axis} (grid {grid})"
            if kernel > side:
                raise ValueError(
                    f"kernel_size {kernel} is larger than the token grid's side {side} on {where}; use at most {side}"
                    " (a kernel as large as the grid is dense attention)"
                )
            if step > kernel:
                raise ValueError(f"stride {step} is larger than kernel_size {kernel} on {where}; use stride <= kernel")
            if dil * kernel > side:
                raise ValueError(
                    f"dilation {dil} x kernel_size {kernel} = {dil * kernel} exceeds the side {side} on {where}; "
                    f"use dilation <= {side // kernel}"
                )
        return cls(grid, kernel_size, stride, dilation, is_causal)

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def is_dense(self) -> bool:
        """True when every query sees every key (kernel covers the grid, no dilation, no causality)."""
        return self.kernel_size == self.grid and not any(self.is_causal) and all(d == 1 for d in self.dilation)

    def density(self) -> float:
        """Share of (query, key) pairs attended: the inverse of the speed-of-light speedup over dense attention."""
        # The mask is a Kronecker product of per-axis masks, so its density is the product of theirs.
        return math.prod(float(_axis_allowed(*self._axis(axis)).float().mean()) for axis in range(len(self.grid)))

    def _axis(self, axis: int) -> tuple[int, int, int, int, bool]:
        return (
            self.grid[axis],
            self.kernel_size[axis],
            self.stride[axis],
            self.dilation[axis],
            self.is_causal[axis],
        )

    def mask(self, device=None) -> torch.Tensor:
        """``[S, S]`` booleans, True where query ``i`` (row-major) attends key ``j``."""
        allowed = [_axis_allowed(*self._axis(axis)).to(device) for axis in range(len(self.grid))]
        mask = allowed[0]
        for axis_mask in allowed[1:]:
            # Kronecker AND: (i0, i1) attends (j0, j1) iff each axis allows it.
            mask = (mask[:, None, :, None] & axis_mask[None, :, None, :]).reshape(
                mask.shape[0] * axis_mask.shape[0], -1
            )
        return mask


def _per_axis(option: str, value, rank: int, kind=int) -> tuple:
    values = tuple(value) if isinstance(value, list | tuple) else (value,) * rank
    if len(values) != rank:
        raise ValueError(f"{option}={value!r} needs one value per grid axis ({rank})")
    if kind is bool:
        if not all(isinstance(v, bool) for v in values):
            raise ValueError(f"{option}={value!r} must be a bool or one bool per axis")
        return values
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{option}={value!r} must be a positive int or one per axis")
    return values


def axis_windows(length: int, kernel: int, stride: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, end)`` of every position's window on one axis without dilation (``end`` exclusive)."""
    index = torch.arange(length)
    if causal:
        leader = torch.clamp((index // stride) * stride + stride - 1, max=length - 1)
        start = torch.clamp(leader - (kernel - 1), min=0)
        end = torch.clamp(index + 1, max=length)
        return start, end
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    leader = torch.clamp((index // stride) * stride + stride // 2, max=length - 1)
    # Clamped, not padded: a window that would cross the far border slides back so it still holds `kernel` keys.
    start = torch.clamp(leader - left, min=0) - torch.clamp(leader + right - (length - 1), min=0)
    return start, start + kernel


@functools.lru_cache(maxsize=256)
def _axis_allowed(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> torch.Tensor:
    """``[L, L]`` booleans for one axis, dilation included."""
    index = torch.arange(length)
    group, position = index % dilation, index // dilation
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for g in range(dilation):
        members = index[group == g]
        start, end = axis_windows(len(members), kernel, stride, causal)
        inside = (position[members][None, :] >= start[:, None]) & (position[members][None, :] < end[:, None])
        allowed[members[:, None], members[None, :]] = inside
    return allowed


def neighborhood_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    neighborhood: Neighborhood,
    extra_key: torch.Tensor | None = None,
    extra_value: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GNA through an explicit mask, in fp32: the truth every faster path is tested against (small sizes only).

    Args:
        query, key, value: ``[B, S, H, D]`` with ``S`` the grid's tokens, row-major.
        neighborhood: the geometry.
        extra_key, extra_value: ``[B, T, H, D]`` keys every query attends (text tokens), or ``None``.
        extra_mask: ``[B, T]`` booleans, False for extra keys nobody attends (padding), or ``None``.
    """
    from accel.kernels.reference import attention_reference

    _check_tokens(query, neighborhood)
    mask = neighborhood.mask(query.device)[None, None]
    if extra_key is not None:
        key, value = torch.cat([key, extra_key], dim=1), torch.cat([value, extra_value], dim=1)
        text = torch.ones(query.shape[0], extra_key.shape[1], dtype=torch.bool, device=query.device)
        if extra_mask is not None:
            text = extra_mask.to(torch.bool)
        mask = torch.cat(
            [mask.expand(query.shape[0], 1, -1, -1), text[:, None, None, :].expand(-1, 1, mask.shape[2], -1)],
            dim=-1,
        )
    return attention_reference(query, key, value, attn_mask=mask)


def _check_tokens(query: torch.Tensor, neighborhood: Neighborhood) -> None:
    if query.shape[1] != neighborhood.tokens:
        raise ValueError(
            f"the grid {neighborhood.grid} holds {neighborhood.tokens} tokens, the sequence has {query.shape[1]}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Tiling: query tiles and the key box that covers their windows. Shared by the CPU path and the Triton kernel.


# Smallest query tile per axis, by grid rank: about 256 queries per tile. Measured on the 2-core CPU at 128x128
# tokens: 16x16 tiles ran 1.35-1.4x faster than 8x8 ones (fewer gathered key copies) and 2.6x faster than 32x32.
_MIN_TILE = {1: (64,), 2: (16, 16), 3: (4, 8, 8)}


def default_tile(neighborhood: Neighborhood) -> tuple[int, ...]:
    """Query tile per axis: the smallest multiple of the stride that reaches ``_MIN_TILE``, capped by the grid.

    A tile made of whole stride groups has boxes no larger than the stride groups' windows need; a tile that is one
    stride group sees exactly its window, with no mask.
    """
    tile = []
    minimum = _MIN_TILE[len(neighborhood.grid)]
    for side, step, dil, least in zip(
        neighborhood.grid, neighborhood.stride, neighborhood.dilation, minimum, strict=True
    ):
        sub_side = math.ceil(side / dil)
        tile.append(min(sub_side, step * math.ceil(least / step)))
    return tuple(tile)


@dataclass(frozen=True)
class TilePlan:
    """Index tensors of one tiled GNA problem on one (sub-)grid without dilation.

    Attributes:
        query_index: ``[tiles, tile_tokens]`` flat query positions (positions past the grid repeat the last one).
        key_index: ``[tiles, box_tokens]`` flat key positions of each tile's box.
        mask: ``[tiles, tile_tokens, box_tokens]`` booleans, or ``None`` when every query sees its whole box.
        valid: ``[tiles * tile_tokens]`` booleans, True where the tile position is a real query.
        box: box shape per axis.
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    mask: torch.Tensor | None
    valid: torch.Tensor
    box: tuple[int, ...]
    all_valid: bool = False


@functools.lru_cache(maxsize=64)
def tile_plan(
    grid: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    is_causal: tuple[bool, ...],
    tile: tuple[int, ...],
    device: torch.device,
) -> TilePlan:
    """The tiling of a dilation-free problem (cached: it depends only on the geometry)."""
    per_axis = []
    for side, kernel, step, causal, size in zip(grid, kernel_size, stride, is_causal, tile, strict=True):
        start, end = axis_windows(side, kernel, step, causal)
        count = math.ceil(side / size)
        positions = torch.clamp(torch.arange(count * size).reshape(count, size), max=side - 1)
        first, last = positions[:, 0], positions[:, -1]
        # Windows only move forward with the query, so a tile's windows are covered by [start(first), end(last)).
        box = int((end[last] - start[first]).max())
        box_start = torch.clamp(start[first], max=side - box)
        keys = box_start[:, None] + torch.arange(box)[None, :]
        inside = (keys[:, None, :] >= start[positions][:, :, None]) & (keys[:, None, :] < end[positions][:, :, None])
        real = torch.arange(count * size).reshape(count, size) < side
        per_axis.append((positions, keys, inside, real, box))

    rank = len(grid)
    strides = [math.prod(grid[axis + 1 :]) for axis in range(rank)]
    query_index = key_index = None
    mask = valid = None
    for axis, (positions, keys, inside, real, _) in enumerate(per_axis):
        q_axis = positions * strides[axis]
        k_axis = keys * strides[axis]
        if query_index is None:
            query_index, key_index, mask, valid = q_axis, k_axis, inside, real
            continue
        # Outer combination of this axis with the previous ones: tiles, tile tokens and box tokens all multiply.
        tiles_before, tiles_now = query_index.shape[0], q_axis.shape[0]
        query_index = (query_index[:, None, :, None] + q_axis[None, :, None, :]).reshape(tiles_before * tiles_now, -1)
        key_index = (key_index[:, None, :, None] + k_axis[None, :, None, :]).reshape(tiles_before * tiles_now, -1)
        mask = (mask[:, None, :, None, :, None] & inside[None, :, None, :, None, :]).reshape(
            tiles_before * tiles_now, query_index.shape[1], key_index.shape[1]
        )
        valid = (valid[:, None, :, None] & real[None, :, None, :]).reshape(tiles_before * tiles_now, -1)
    box = tuple(item[4] for item in per_axis)
    return TilePlan(
        query_index=query_index.to(device),
        key_index=key_index.to(device),
        mask=None if bool(mask.all()) else mask.to(device),
        valid=valid.reshape(-1).to(device),
        box=box,
        all_valid=bool(valid.all()),
    )


def dilation_groups(neighborhood: Neighborhood):
    """``(slices, sub_grid)`` per dilation group: GNA with dilation is dilation-free GNA inside each sub-grid."""
    import itertools

    for group in itertools.product(*(range(d) for d in neighborhood.dilation)):
        slices = tuple(slice(g, None, d) for g, d in zip(group, neighborhood.dilation, strict=True))
        sub_grid = tuple(
            len(range(g, side, d)) for g, side, d in zip(group, neighborhood.grid, neighborhood.dilation, strict=True)
        )
        yield slices, sub_grid


def neighborhood_attention_tiled(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    neighborhood: Neighborhood,
    extra_key: torch.Tensor | None = None,
    extra_value: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    tile: tuple[int, ...] | None = None,
    max_chunk_bytes: int = 256 * 2**20,
) -> torch.Tensor:
    """GNA as batched SDPA over query tiles: the CPU path (exact up to SDPA's own rounding).

    Arguments as in ``neighborhood_attention_reference``; ``tile`` overrides ``default_tile``. Tiles are processed in
    chunks so that gathered keys and values stay under ``max_chunk_bytes``.
    """
    _check_tokens(query, neighborhood)
    batch, tokens, heads, dim = query.shape
    if neighborhood.is_dense and extra_mask is None:
        # One window holding the whole grid is dense attention: no tiles, no gathered copies.
        if extra_key is not None:
            key, value = torch.cat([key, extra_key], dim=1), torch.cat([value, extra_value], dim=1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2)
    if all(d == 1 for d in neighborhood.dilation):
        return _tiled_one_grid(
            query, key, value, neighborhood, extra_key, extra_value, extra_mask, tile, max_chunk_bytes
        )
    out = torch.empty(batch, tokens, heads, value.shape[-1], dtype=query.dtype, device=query.device)
    grid_view = (batch, *neighborhood.grid, heads, -1)
    out_grid = out.view(*grid_view[:-1], value.shape[-1])
    for slices, sub_grid in dilation_groups(neighborhood):
        index = (slice(None), *slices)
        sub = Neighborhood(
            sub_grid, neighborhood.kernel_size, neighborhood.stride, (1,) * len(sub_grid), neighborhood.is_causal
        )

        q, k, v = (x.reshape(grid_view)[index].reshape(batch, -1, heads, x.shape[-1]) for x in (query, key, value))
        result = _tiled_one_grid(q, k, v, sub, extra_key, extra_value, extra_mask, tile, max_chunk_bytes)
        out_grid[index] = result.reshape(batch, *sub_grid, heads, -1)
    return out


def _tiled_one_grid(query, key, value, neighborhood, extra_key, extra_value, extra_mask, tile, max_chunk_bytes):
    batch, tokens, heads, dim = query.shape
    tile = tuple(min(t, side) for t, side in zip(tile or default_tile(neighborhood), neighborhood.grid, strict=True))
    plan = tile_plan(
        neighborhood.grid, neighborhood.kernel_size, neighborhood.stride, neighborhood.is_causal, tile, query.device
    )
    tiles, tile_tokens = plan.query_index.shape
    box_tokens = plan.key_index.shape[1]
    text_tokens = 0 if extra_key is None else extra_key.shape[1]
    bytes_per_tile = batch * (box_tokens + text_tokens) * heads * (dim + value.shape[-1]) * query.element_size()
    chunk = max(1, max_chunk_bytes // max(bytes_per_tile, 1))

    outputs = []
    for first in range(0, tiles, chunk):
        rows = slice(first, min(first + chunk, tiles))
        count = rows.stop - rows.start
        q = query[:, plan.query_index[rows].reshape(-1)].reshape(batch * count, tile_tokens, heads, dim)
        k = key[:, plan.key_index[rows].reshape(-1)].reshape(batch * count, box_tokens, heads, dim)
        v = value[:, plan.key_index[rows].reshape(-1)].reshape(batch * count, box_tokens, heads, -1)
        mask = None if plan.mask is None else plan.mask[rows].repeat(batch, 1, 1)
        if extra_key is not None:
            k = torch.cat([k, extra_key.repeat_interleave(count, dim=0)], dim=1)
            v = torch.cat([v, extra_value.repeat_interleave(count, dim=0)], dim=1)
            if mask is not None or extra_mask is not None:
                if mask is None:
                    mask = torch.ones(batch * count, tile_tokens, box_tokens, dtype=torch.bool, device=query.device)
                text = (
                    torch.ones(batch, text_tokens, dtype=torch.bool, device=query.device)
                    if extra_mask is None
                    else extra_mask.to(torch.bool)
                )
                text = text.repeat_interleave(count, dim=0)[:, None, :].expand(-1, tile_tokens, -1)
                mask = torch.cat([mask, text], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None],
        )
        outputs.append(out.transpose(1, 2).reshape(batch, count * tile_tokens, heads, -1))
    out_tiles = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    out = torch.empty(batch, tokens, heads, value.shape[-1], dtype=query.dtype, device=query.device)
    if plan.all_valid:
        # Tiles cover the grid exactly: one scatter, no boolean selection (a full extra copy of the output).
        return out.index_copy_(1, plan.query_index.reshape(-1), out_tiles)
    out[:, plan.query_index.reshape(-1)[plan.valid]] = out_tiles[:, plan.valid]
    return out
