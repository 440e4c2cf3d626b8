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
  windows of its queries (batched SDPA per row of tiles, a mask only where the box is larger than a window);
- ``accel.kernels.block_sparse``: the Triton kernel for GPUs, driven by the same per-tile key lists.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from accel.kernels.reference import attention_with_lse, gradients_tracked


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


# Smallest query tile per axis, by grid rank. Measured on the 2-core CPU at 128x128 tokens with key strips: where
# tiles need masks, 8x8 ran 10-25 % faster than 16x16 (less of each box is masked away; window 33 stride 1, and
# window 40 stride 8, where 8x8 is one stride group and needs none) and 1.5-2x faster than 16x32 or 32x32. Larger
# strides make larger tiles (whole stride groups), e.g. 16x16 for the FLUX defaults.
_MIN_TILE = {1: (64,), 2: (8, 8), 3: (4, 8, 8)}


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
    """The tiling of one GNA problem on a (sub-)grid without dilation, axis by axis (a tile is a product of axes).

    Attributes:
        tile: query tile shape per axis; a grid's last tile on an axis may hold fewer positions.
        box: per axis, the span of keys a tile's windows cover.
        box_starts: per axis, the first key position of each tile's box.
        inside: per axis, ``[tiles, tile, box]`` booleans (a position past the grid's end repeats the last one), or
            ``None`` where every query of every tile sees its whole box on that axis.
        lead: the axis whose box outgrows its tile most: the CPU path's strips run along it (see ``_tiled_one_grid``).
        strips: per tile position on the other axes: its index per axis, its query slices in the grid and in the tile,
            and its box slices.
    """

    tile: tuple[int, ...]
    box: tuple[int, ...]
    box_starts: tuple[tuple[int, ...], ...]
    inside: tuple[torch.Tensor | None, ...]
    lead: int
    strips: tuple[tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]], ...]

    @property
    def others(self) -> list[int]:
        return [axis for axis in range(len(self.tile)) if axis != self.lead]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(starts) for starts in self.box_starts)


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
    boxes, box_starts, insides = [], [], []
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
        boxes.append(box)
        box_starts.append(tuple(int(first_key) for first_key in box_start))
        insides.append(None if bool(inside.all()) else inside.to(device))

    rank = len(grid)
    lead = max(range(rank), key=lambda axis: (boxes[axis] / tile[axis], -axis))
    others = [axis for axis in range(rank) if axis != lead]
    strips = []
    for index in itertools.product(*(range(len(box_starts[axis])) for axis in others)):
        queries = tuple(
            slice(i * tile[axis], min((i + 1) * tile[axis], grid[axis])) for axis, i in zip(others, index, strict=True)
        )
        filled = tuple(slice(0, part.stop - part.start) for part in queries)
        keys = tuple(
            slice(box_starts[axis][i], box_starts[axis][i] + boxes[axis])
            for axis, i in zip(others, index, strict=True)
        )
        strips.append((index, queries, filled, keys))
    return TilePlan(
        tile=tuple(tile),
        box=tuple(boxes),
        box_starts=tuple(box_starts),
        inside=tuple(insides),
        lead=lead,
        strips=tuple(strips),
    )


def dilation_groups(neighborhood: Neighborhood):
    """``(slices, sub_grid)`` per dilation group: GNA with dilation is dilation-free GNA inside each sub-grid."""
    for group in itertools.product(*(range(d) for d in neighborhood.dilation)):
        slices = tuple(slice(g, None, d) for g, d in zip(group, neighborhood.dilation, strict=True))
        sub_grid = tuple(
            len(range(g, side, d)) for g, side, d in zip(group, neighborhood.grid, neighborhood.dilation, strict=True)
        )
        yield slices, sub_grid


# Per-thread buffers the CPU path reuses between calls (see ``_scratch``), and the most it keeps.
_SCRATCH = threading.local()
_SCRATCH_KEPT_BYTES = 64 * 2**20


def neighborhood_attention_tiled(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    neighborhood: Neighborhood,
    extra_key: torch.Tensor | None = None,
    extra_value: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    tile: tuple[int, ...] | None = None,
    max_chunk_bytes: int = _SCRATCH_KEPT_BYTES,
) -> torch.Tensor:
    """GNA as batched SDPA over query tiles: the CPU path (exact up to SDPA's own rounding).

    Arguments as in ``neighborhood_attention_reference``; ``tile`` overrides ``default_tile``. Keys and values are copied
    into strips chunk by chunk, so the copies stay under ``max_chunk_bytes`` (one strip at least).
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
    """Tiled GNA on one grid: queries attend their tile's box, the text keys through a log-sum-exp merge.

    SDPA wants each batch entry's keys as one strided run, and a box is not one in the row-major grid. So keys and
    values are copied into strips, one per tile position on the non-lead axes: the box's extent on those axes, over the
    whole lead axis, laid out lead axis first. A tile's box is then one contiguous run of its strip, and each tile row
    along the lead axis is one SDPA call that reads the strips in place. The copies grow the keys by the box-to-tile
    ratio of the non-lead axes only, so the lead axis is the one with the largest ratio (gathering every tile's box
    grew them by all ratios, and an index gather ran 5-8x slower than these slice copies). Strips go through buffers
    reused chunk by chunk, which keeps memory under ``max_chunk_bytes`` and clear of fresh-page faults.
    """
    batch, tokens, heads, dim = query.shape
    value_dim = value.shape[-1]
    grid, rank = neighborhood.grid, len(neighborhood.grid)
    tile = tuple(min(t, side) for t, side in zip(tile or default_tile(neighborhood), grid, strict=True))
    plan = tile_plan(grid, neighborhood.kernel_size, neighborhood.stride, neighborhood.is_causal, tile, query.device)
    lead, others, strips = plan.lead, plan.others, plan.strips
    lead_side, lead_tile, lead_box = grid[lead], plan.tile[lead], plan.box[lead]
    tile_others = [plan.tile[axis] for axis in others]
    box_others = [plan.box[axis] for axis in others]
    tile_area, box_area = math.prod(tile_others), math.prod(box_others)

    # Grid views with the lead axis first: [B, lead, *others, H, D].
    order = (0, 1 + lead, *(1 + axis for axis in others), rank + 1, rank + 2)

    def lead_first(tensor):
        return tensor.reshape(batch, *grid, heads, tensor.shape[-1]).permute(order)

    query_grid, key_grid, value_grid = lead_first(query), lead_first(key), lead_first(value)
    out = query.new_empty(batch, tokens, heads, value_dim)
    out_grid = lead_first(out)

    bytes_per_strip = batch * lead_side * heads * query.element_size()
    bytes_per_strip *= tile_area * dim + box_area * (dim + value_dim)
    chunk = min(len(strips), max(1, max_chunk_bytes // max(bytes_per_strip, 1)))

    # Buffers run strip-major, batch-minor: a chunk's strips are one [strips * B, ...] batch for SDPA. Query positions
    # past the grid's end (a partial tile) hold stale copies: their rows are computed and dropped, and no other
    # row reads them.
    query_shape = (chunk, batch, lead_side, *tile_others, heads, dim)
    key_shape = (chunk, batch, lead_side, *box_others, heads, dim)
    value_shape = (chunk, batch, lead_side, *box_others, heads, value_dim)
    sizes = [math.prod(shape) for shape in (query_shape, key_shape, value_shape)]
    # Under autograd (latent guidance composed with GNA) a chunk's copies are saved for the backward pass, so each
    # chunk gets buffers of its own, zeroed: a partial tile's unused query rows must not carry NaNs into key gradients.
    tracked = gradients_tracked(query, key, value, extra_key, extra_value)

    def buffers():
        if tracked:
            flat = torch.zeros(sum(sizes), dtype=query.dtype, device=query.device)
        else:
            flat = _scratch(sum(sizes), query.dtype, query.device)
        # Slices rather than ``split``: autograd refuses in-place copies into views from a multi-view op.
        starts = (0, sizes[0], sizes[0] + sizes[1])
        shapes = (query_shape, key_shape, value_shape)
        return (flat[a : a + n].view(shape) for a, n, shape in zip(starts, sizes, shapes, strict=True))

    query_buffer, key_buffer, value_buffer = buffers()
    everything = (slice(None), slice(None))

    for first in range(0, len(strips), chunk):
        if tracked and first:
            query_buffer, key_buffer, value_buffer = buffers()
        chunk_strips = strips[first : first + chunk]
        count = len(chunk_strips)
        for slot, (_, queries, filled, boxes) in enumerate(chunk_strips):
            query_buffer[(slot, *everything, *filled)].copy_(query_grid[everything + queries])
            key_buffer[slot].copy_(key_grid[everything + boxes])
            value_buffer[slot].copy_(value_grid[everything + boxes])
        keys = key_buffer[:count].view(count * batch, lead_side * box_area, heads, dim)
        values = value_buffer[:count].view(count * batch, lead_side * box_area, heads, value_dim)
        text = None
        if extra_key is not None:
            text = _text_attention(
                query_buffer[:count].view(count * batch, lead_side * tile_area, heads, dim),
                extra_key,
                extra_value,
                extra_mask,
                count,
            )
        strip_mask = _strip_mask(plan, others, [strip[0] for strip in chunk_strips])
        for row, box_start in enumerate(plan.box_starts[lead]):
            rows = slice(row * lead_tile, min((row + 1) * lead_tile, lead_side))
            height = rows.stop - rows.start
            q = query_buffer[:count, :, rows].reshape(count * batch, height * tile_area, heads, dim)
            span = slice(box_start * box_area, (box_start + lead_box) * box_area)
            mask = _tile_mask(plan, lead, row, height, strip_mask, count, batch)
            row_text = None
            if text is not None:
                tokens_in_rows = slice(rows.start * tile_area, rows.stop * tile_area)
                row_text = (text[0][:, :, tokens_in_rows], text[1][:, :, tokens_in_rows])
            result = _attend_with_text(q, keys[:, span], values[:, span], mask, row_text)
            result = result.transpose(1, 2).reshape(count, batch, height, *tile_others, heads, -1)
            for slot, (_, queries, filled, _) in enumerate(chunk_strips):
                out_grid[(slice(None), rows, *queries)].copy_(result[(slot, *everything, *filled)])
    return out


def _scratch(elements: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of ``elements``; up to ``_SCRATCH_KEPT_BYTES`` it is kept per thread, dtype and device for the next
    call.

    Fresh buffers of tens of MB come from the OS page by page, and those page faults cost 5-10 % of a block-sparse call
    on the 2-core CPU. The buffer holds only copies that each call overwrites before reading, so nothing carries from
    one call to the next but memory. Larger buffers (real model widths, where a strip alone outgrows the budget) are
    not kept: their faults are a smaller share of their calls.
    """
    if elements * dtype.itemsize > _SCRATCH_KEPT_BYTES:
        return torch.empty(elements, dtype=dtype, device=device)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < elements:
        buffer = buffers[key] = torch.empty(elements, dtype=dtype, device=device)
    return buffer[:elements]


def _strip_mask(plan: TilePlan, others: list[int], indices: list[tuple[int, ...]]) -> torch.Tensor | None:
    """``[strips, *tile_others, *box_others]`` booleans of the non-lead axes, or ``None`` where they mask nothing."""
    if all(plan.inside[axis] is None for axis in others):
        return None
    mask = None
    for position, axis in enumerate(others):
        inside = plan.inside[axis]
        if inside is None:
            inside = torch.ones(plan.counts[axis], plan.tile[axis], plan.box[axis], dtype=torch.bool)
        chosen = inside[[index[position] for index in indices]]  # [strips, tile, box]
        if mask is None:
            mask = chosen
            continue
        # Outer product with the axes before: tile positions and box positions both multiply, row-major.
        strips, tile_before, box_before = mask.shape[0], mask.shape[1], mask.shape[2]
        mask = (mask[:, :, None, :, None] & chosen[:, None, :, None, :]).reshape(
            strips, tile_before * chosen.shape[1], box_before * chosen.shape[2]
        )
    return mask


def _tile_mask(plan: TilePlan, lead: int, row: int, height: int, strip_mask, count: int, batch: int):
    """``[strips * B, 1, queries, keys]`` booleans of one tile row, or ``None`` when every query sees its box."""
    lead_inside = plan.inside[lead]
    if lead_inside is None and strip_mask is None:
        return None
    device = strip_mask.device if lead_inside is None else lead_inside.device
    lead_part = (
        torch.ones(height, 1, dtype=torch.bool, device=device) if lead_inside is None else lead_inside[row, :height]
    )
    other_part = torch.ones(1, 1, 1, dtype=torch.bool, device=device) if strip_mask is None else strip_mask
    # [strips, rows, tile_others, lead box, box_others]: queries and keys both run lead axis first.
    mask = lead_part[None, :, None, :, None] & other_part[:, None, :, None, :]
    tile_area = math.prod(plan.tile) // plan.tile[lead]
    box_area = math.prod(plan.box) // plan.box[lead]
    mask = mask[:, None].expand(count, batch, height, tile_area, plan.box[lead], box_area)
    return mask.reshape(count * batch, 1, height * tile_area, plan.box[lead] * box_area)


def _text_attention(query, extra_key, extra_value, extra_mask, count):
    """``(out, lse)`` of ``[strips * B, L, H, D]`` queries against the text keys (the same for every strip)."""
    batch, text_tokens, heads, dim = extra_key.shape

    def per_strip(tensor):
        return (
            tensor.transpose(1, 2)[None].expand(count, -1, -1, -1, -1).reshape(count * batch, heads, text_tokens, -1)
        )

    padding = None if extra_mask is None else extra_mask[None].expand(count, -1, -1).reshape(count * batch, -1)
    return attention_with_lse(query.transpose(1, 2), per_strip(extra_key), per_strip(extra_value), key_padding=padding)


def _attend_with_text(query, key, value, mask, text):
    """``[N, H, L, Dv]``: the box attention, merged by log-sum-exp with the text part ``(out, lse)`` when given."""
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if text is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    additive = None
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
    box_out, box_lse = attention_with_lse(query, key, value, additive)
    text_out, text_lse = text
    # The softmax over box and text keys together is the two partial results weighted by their shares of its
    # normaliser; the text's share is sigmoid(lse_text - lse_box), 0 when every text key is padding. One fused pass.
    text_share = torch.sigmoid(text_lse - box_lse)[..., None]
    if box_out.dtype != torch.float32:
        return torch.lerp(box_out.float(), text_out.float(), text_share).to(box_out.dtype)
    return torch.lerp(box_out, text_out, text_share)
