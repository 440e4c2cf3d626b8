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

import contextlib
import functools
import itertools
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


# The buffer per device the CPU path reuses between calls (see ``_scratch``), and the most it keeps.
_SCRATCH: dict[torch.device, torch.Tensor] = {}
_SCRATCH_LOCK = threading.Lock()
_SCRATCH_KEPT_BYTES = 64 * 2**20

# fp32 score-sized tensors autograd keeps for a tile row (its scores, their masked copy and the probabilities): the
# backward pass's chunks count them against ``max_chunk_bytes``.
_SCORE_COPIES_KEPT = 3


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
    into strips chunk by chunk, so the copies stay under ``max_chunk_bytes`` (one strip at least). Under autograd the
    copies and scores of one tile row of a chunk are what the backward pass holds at a time (one tile row of one strip
    at least).
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
    """Tiled GNA on one grid (see ``_tiles``); under autograd through ``_TileRowsRecomputed``."""
    if gradients_tracked(query, key, value, extra_key, extra_value):
        geometry = (neighborhood, extra_mask, tile, max_chunk_bytes)
        return _TileRowsRecomputed.apply(query, key, value, extra_key, extra_value, geometry)
    return _tiles(query, key, value, neighborhood, extra_key, extra_value, extra_mask, tile, max_chunk_bytes)


class _TileRowsRecomputed(torch.autograd.Function):
    """Tiled GNA under autograd (latent guidance composed with GNA): the forward pass of inference, and a backward
    pass that computes each tile row again, differentiates it and adds its gradients into the inputs' slice by slice.

    Recorded as it ran, the forward pass kept every row's copies and fp32 scores for the backward pass (1.3 GB for one
    FLUX layer at 1024^2, where dense attention keeps 0.16 GB); the graph now keeps the inputs. Recomputing rows under
    ``torch.utils.checkpoint`` bounded that too, but each row's input gradients then came back input-sized, zeros
    but for the row's slice, and adding them up took a fifth of the backward pass at 128x128 tokens, a share that
    grows with the number of rows. This forward pass is also inference's own: no fp32 scores, and the same output.
    """

    @staticmethod
    def forward(ctx, query, key, value, extra_key, extra_value, geometry):
        ctx.save_for_backward(query, key, value, extra_key, extra_value)
        ctx.geometry = geometry
        neighborhood, extra_mask, tile, max_chunk_bytes = geometry
        return _tiles(query, key, value, neighborhood, extra_key, extra_value, extra_mask, tile, max_chunk_bytes)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, extra_key, extra_value = ctx.saved_tensors
        neighborhood, extra_mask, tile, max_chunk_bytes = ctx.geometry
        grads = _tiles(
            query, key, value, neighborhood, extra_key, extra_value, extra_mask, tile, max_chunk_bytes, grad_out
        )
        return (
            *(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad[:5], strict=True)),
            None,
        )


def _tiles(query, key, value, neighborhood, extra_key, extra_value, extra_mask, tile, max_chunk_bytes, grad_out=None):
    """Tiled GNA on one grid: queries attend their tile's box, the text keys through a log-sum-exp merge. Given
    ``grad_out``, the gradients of the five inputs instead (``None`` for absent text).

    SDPA wants each batch entry's keys as one strided run, and a box is not one in the row-major grid. So keys and
    values are copied into strips, one per tile position on the non-lead axes: the box's extent on those axes, over the
    whole lead axis, laid out lead axis first. A tile's box is then one contiguous run of its strip, and each tile row
    along the lead axis is one SDPA call that reads the strips in place. The copies grow the keys by the box-to-tile
    ratio of the non-lead axes only, so the lead axis is the one with the largest ratio (gathering every tile's box
    grew them by all ratios, and an index gather ran 5-8x slower than these slice copies). Strips go through buffers
    reused chunk by chunk, which keeps memory under ``max_chunk_bytes`` and clear of fresh-page faults.

    The backward pass copies one tile row of a chunk at a time (the part of the strips it reads), so that its copies
    and the scores autograd keeps for it stay under ``max_chunk_bytes`` (one row of one strip at least).
    """
    batch, tokens, heads, dim = query.shape
    value_dim = value.shape[-1]
    grid, rank = neighborhood.grid, len(neighborhood.grid)
    tile = tuple(min(t, side) for t, side in zip(tile or default_tile(neighborhood), grid, strict=True))
    plan = tile_plan(grid, neighborhood.kernel_size, neighborhood.stride, neighborhood.is_causal, tile, query.device)
    lead, others, strips = plan.lead, plan.others, plan.strips
    lead_side, lead_tile, lead_box = grid[lead], plan.tile[lead], plan.box[lead]
    box_starts = plan.box_starts[lead]
    tile_others = [plan.tile[axis] for axis in others]
    box_others = [plan.box[axis] for axis in others]
    tile_area, box_area = math.prod(tile_others), math.prod(box_others)

    # Grid views with the lead axis first: [B, lead, *others, H, D].
    order = (0, 1 + lead, *(1 + axis for axis in others), rank + 1, rank + 2)

    def lead_first(tensor):
        return tensor.reshape(batch, *grid, heads, tensor.shape[-1]).permute(order)

    query_grid, key_grid, value_grid = lead_first(query), lead_first(key), lead_first(value)
    everything = (slice(None), slice(None))

    def lead_extents(first_row, end_row):
        """The lead-axis positions of tile rows ``first_row`` up to ``end_row``: their queries and their boxes' keys."""
        # Boxes only move forward with the rows, so the last row's box ends the span.
        return (
            slice(first_row * lead_tile, min(end_row * lead_tile, lead_side)),
            slice(box_starts[first_row], box_starts[end_row - 1] + lead_box),
        )

    def buffers(flat, count, first_row, end_row):
        """Query, key and value buffers of ``count`` strips over rows ``first_row`` up to ``end_row``, in ``flat``.

        Strip-major, batch-minor: a chunk's strips are one [strips * B, ...] batch for SDPA.
        """
        queries, keys = lead_extents(first_row, end_row)
        query_extent, key_extent = queries.stop - queries.start, keys.stop - keys.start
        shapes = (
            (count, batch, query_extent, *tile_others, heads, dim),
            (count, batch, key_extent, *box_others, heads, dim),
            (count, batch, key_extent, *box_others, heads, value_dim),
        )
        if flat is None:
            return sum(math.prod(shape) for shape in shapes)
        views, offset = [], 0
        # Slices rather than ``split``: autograd refuses in-place copies into views from a multi-view op.
        for shape in shapes:
            views.append(flat[offset : offset + math.prod(shape)].view(shape))
            offset += math.prod(shape)
        return views

    def copy_into(views, chunk_strips, first_row, end_row):
        # Query positions past the grid's end (a partial tile) keep what the buffer held: their rows are computed and
        # dropped, and no other row reads them.
        query_buffer, key_buffer, value_buffer = views
        query_span, key_span = lead_extents(first_row, end_row)
        for slot, (_, queries, filled, boxes) in enumerate(chunk_strips):
            query_buffer[(slot, *everything, *filled)].copy_(query_grid[(slice(None), query_span, *queries)])
            key_buffer[slot].copy_(key_grid[(slice(None), key_span, *boxes)])
            value_buffer[slot].copy_(value_grid[(slice(None), key_span, *boxes)])

    def attend_rows(views, chunk_strips, first_row, end_row, text_key, text_value):
        """``(rows, [strips, B, rows, *tile_others, H, Dv])`` of each tile row ``first_row`` up to ``end_row`` of the
        chunk's strips, from their copies in ``views``."""
        count = len(chunk_strips)
        query_buffer, key_buffer, value_buffer = views
        query_span, key_span = lead_extents(first_row, end_row)
        keys = key_buffer.view(count * batch, -1, heads, dim)
        values = value_buffer.view(count * batch, -1, heads, value_dim)
        text = None
        if text_key is not None:
            text = _text_attention(
                query_buffer.view(count * batch, -1, heads, dim), text_key, text_value, extra_mask, count
            )
        strip_mask = _strip_mask(plan, others, [strip[0] for strip in chunk_strips])
        for row in range(first_row, end_row):
            rows = slice(row * lead_tile, min((row + 1) * lead_tile, lead_side))
            height = rows.stop - rows.start
            local = slice(rows.start - query_span.start, rows.stop - query_span.start)
            q = query_buffer[:, :, local].reshape(count * batch, height * tile_area, heads, dim)
            box_start = box_starts[row] - key_span.start
            span = slice(box_start * box_area, (box_start + lead_box) * box_area)
            mask = _tile_mask(plan, lead, row, height, strip_mask, count, batch)
            row_text = None
            if text is not None:
                tokens_in_rows = slice(local.start * tile_area, local.stop * tile_area)
                row_text = (text[0][:, :, tokens_in_rows], text[1][:, :, tokens_in_rows])
            result = _attend_with_text(q, keys[:, span], values[:, span], mask, row_text)
            yield rows, result.transpose(1, 2).reshape(count, batch, height, *tile_others, heads, -1)

    if grad_out is not None:
        # One tile row of a chunk at a time: its copies are the leaves of a graph of its own, and their gradients are
        # added into the inputs' slice by slice.
        text_tokens = 0 if extra_key is None else extra_key.shape[1]
        row_queries = lead_tile * tile_area
        bytes_per_strip = batch * heads * query.element_size()
        bytes_per_strip *= row_queries * dim + lead_box * box_area * (dim + value_dim)
        bytes_per_strip += batch * heads * row_queries * (lead_box * box_area + text_tokens) * 4 * _SCORE_COPIES_KEPT
        chunk = min(len(strips), max(1, max_chunk_bytes // bytes_per_strip))
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (query, key, value)]
        grad_grids = [lead_first(grad) for grad in grads]
        grad_out_grid = lead_first(grad_out)
        text = [] if extra_key is None else [x.detach().requires_grad_() for x in (extra_key, extra_value)]
        text_grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in text]
        for first in range(0, len(strips), chunk):
            chunk_strips = strips[first : first + chunk]
            count = len(chunk_strips)
            for row in range(len(box_starts)):
                rows = (row, row + 1)
                # Zeroed: a partial tile's unused query rows get zero gradients, and 0 x stale NaN would reach the keys'.
                flat = torch.zeros(buffers(None, count, *rows), dtype=query.dtype, device=query.device)
                copy_into(buffers(flat, count, *rows), chunk_strips, *rows)
                flat.requires_grad_()
                with torch.enable_grad():
                    ((queries_in_row, result),) = attend_rows(
                        buffers(flat, count, *rows), chunk_strips, *rows, *(text or (None, None))
                    )
                grad_result = torch.zeros_like(result)
                for slot, (_, queries, filled, _) in enumerate(chunk_strips):
                    grad_result[(slot, *everything, *filled)] = grad_out_grid[(slice(None), queries_in_row, *queries)]
                flat_grad, *found = torch.autograd.grad(result, [flat, *text], grad_result)
                query_span, key_span = lead_extents(*rows)
                query_grad, key_grad, value_grad = buffers(flat_grad, count, *rows)
                for slot, (_, queries, filled, boxes) in enumerate(chunk_strips):
                    grad_grids[0][(slice(None), query_span, *queries)] += query_grad[(slot, *everything, *filled)]
                    grad_grids[1][(slice(None), key_span, *boxes)] += key_grad[slot]
                    grad_grids[2][(slice(None), key_span, *boxes)] += value_grad[slot]
                for total, part in zip(text_grads, found, strict=True):
                    total += part
        grads += text_grads or [None, None]
        inputs = (query, key, value, extra_key, extra_value)
        return [None if grad is None else grad.to(x.dtype) for grad, x in zip(grads, inputs, strict=True)]

    out = query.new_empty(batch, tokens, heads, value_dim)
    out_grid = lead_first(out)
    bytes_per_strip = batch * lead_side * heads * query.element_size()
    bytes_per_strip *= tile_area * dim + box_area * (dim + value_dim)
    chunk = min(len(strips), max(1, max_chunk_bytes // max(bytes_per_strip, 1)))
    every_row = (0, len(box_starts))
    with _scratch(buffers(None, chunk, *every_row) * query.element_size(), query.device) as memory:
        flat = memory.view(query.dtype)
        for first in range(0, len(strips), chunk):
            chunk_strips = strips[first : first + chunk]
            views = buffers(flat, len(chunk_strips), *every_row)
            copy_into(views, chunk_strips, *every_row)
            for rows, result in attend_rows(views, chunk_strips, *every_row, extra_key, extra_value):
                for slot, (_, queries, filled, _) in enumerate(chunk_strips):
                    out_grid[(slice(None), rows, *queries)].copy_(result[(slot, *everything, *filled)])
    return out


@contextlib.contextmanager
def _scratch(nbytes: int, device: torch.device):
    """``nbytes`` of memory for one call's copies: the device's kept buffer when no other call holds it and the size
    is within ``_SCRATCH_KEPT_BYTES``, else a fresh one.

    Fresh buffers of tens of MB come from the OS page by page, and those page faults cost 5-10 % of a block-sparse call
    on the 2-core CPU. The buffer holds only copies that each call overwrites before reading, so nothing carries from
    one call to the next but memory. One buffer per device, shared by dtypes and threads: kept per thread and dtype,
    a server's 8 workers held 0.9 GB more, for good. Calls that overlap it pay the page faults instead. Larger buffers
    (real model widths, where a strip alone outgrows the budget) are not kept: their faults are a smaller share of
    their calls.
    """
    if nbytes > _SCRATCH_KEPT_BYTES or not _SCRATCH_LOCK.acquire(blocking=False):
        yield torch.empty(nbytes, dtype=torch.uint8, device=device)
        return
    try:
        buffer = _SCRATCH.get(device)
        if buffer is None or buffer.numel() < nbytes:
            _SCRATCH.pop(device, None)
            buffer = _SCRATCH[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        yield buffer[:nbytes]
    finally:
        _SCRATCH_LOCK.release()


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
