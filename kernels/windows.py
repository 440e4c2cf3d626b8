"""Shifted-window attention over a 2-D token grid (HiDiffusion's MSW-MSA), as batched attention over windows.

Tensors are ``[B, S, H, D]`` with ``S = h * w`` tokens in row-major order. The grid is shifted cyclically by
``-shift`` (as HiDiffusion does: tokens wrapping around the border share a window, with no mask), cut into
``windows`` equal windows, attended window by window in one batched SDPA call, and put back. Sides that do not
divide are padded at the end, and the padded keys are masked out, so any grid size works. One index gather does the
shift, the padding and the cut, and one puts the result back; the index tables depend only on the geometry and are
cached. No diffusers import.

On the Triton kernel (``backend="triton"``), windows that divide the grid are blocked neighborhood attention
(kernel = stride = window) on the shifted grid: the kernel visits only the key tiles of each query tile's window and
addresses the grid in place, so no window partition is copied; only the shift remains."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def window_geometry(grid: tuple[int, int], windows: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(window size, padding)`` per axis for ``grid`` cut into ``windows``."""
    size = tuple(math.ceil(side / count) for side, count in zip(grid, windows, strict=True))
    padding = tuple(s * count - side for s, count, side in zip(size, windows, grid, strict=True))
    return size, padding


# HiDiffusion shifts its windows by 0, 1/4, 1/2 or 3/4 of a window, the same fraction on both axes.
SHIFT_QUARTERS = 4


def quarter_shift(grid: tuple[int, int], windows: tuple[int, int], quarter: int) -> tuple[int, int]:
    """The cyclic shift, in tokens per axis, of ``quarter`` quarters of a window."""
    (window_h, window_w), _ = window_geometry(grid, windows)
    return window_h * quarter // SHIFT_QUARTERS, window_w * quarter // SHIFT_QUARTERS


@dataclass(frozen=True)
class WindowOrder:
    """Where each token goes when a grid is shifted and cut into windows, for one or several shifts.

    Attributes:
        gather: ``[shifts, count * window_h * window_w]``: the token that each position of the windows (window by
            window, row-major inside) takes; padding positions take token 0, whose keys are masked out.
        scatter: ``[shifts, h * w]``: each token's position in that order (the inverse on real tokens).
        valid: ``[count, window_h * window_w]`` booleans, True at real tokens; ``None`` where the windows divide the
            grid. Padding sits at the end of each axis after the shift, so it is the same for every shift.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    valid: torch.Tensor | None


def window_order(grid: tuple[int, int], windows: tuple[int, int], shifts, device) -> WindowOrder:
    """The `WindowOrder` of ``grid`` cut into ``windows`` after each cyclic shift in ``shifts`` (by ``-shift``)."""
    height, width = grid
    (window_h, window_w), (pad_h, pad_w) = window_geometry(grid, windows)
    window = (window_h, window_w)
    rows, cols = torch.arange(height + pad_h), torch.arange(width + pad_w)
    real = (rows < height)[:, None] & (cols < width)[None, :]
    # Where each position of the padded grid lands in window-major order; the same for every shift.
    landing = torch.argsort(_window_major(torch.arange(real.numel()).reshape(real.shape), windows, window))
    gathers, scatters = [], []
    for shift_h, shift_w in shifts:
        # Position (r, c) of the shifted, padded grid holds token ((r + shift_h) mod h, (c + shift_w) mod w).
        source = ((rows + shift_h) % height)[:, None] * width + ((cols + shift_w) % width)[None, :]
        source = source.masked_fill(~real, 0)
        gathers.append(_window_major(source, windows, window))
        scatter = torch.empty(height * width, dtype=torch.long)
        scatter[source[real]] = landing[real.flatten()]
        scatters.append(scatter)
    valid = None
    if pad_h or pad_w:
        valid = _window_major(real, windows, window).reshape(windows[0] * windows[1], -1).to(device)
    return WindowOrder(torch.stack(gathers).to(device), torch.stack(scatters).to(device), valid)


def _window_major(grid_values: torch.Tensor, windows, window) -> torch.Tensor:
    """A padded ``[H, W]`` grid of values, flattened window by window (row-major inside each window)."""
    blocks = grid_values.reshape(windows[0], window[0], windows[1], window[1]).permute(0, 2, 1, 3)
    return blocks.reshape(-1)


# Constant under torch.compile: Dynamo calls it while tracing and keeps the tables in the graph, instead of tracing
# the index arithmetic into every layer's graph (a decorated lru_cache object would be traced through).
@torch.compiler.assume_constant_result
def quarter_window_orders(
    grid: tuple[int, int], windows: tuple[int, int], cut: bool, device: torch.device
) -> WindowOrder:
    """The `WindowOrder` for HiDiffusion's four shifts (row ``q``: ``quarter_shift(grid, windows, q)``); with
    ``cut=False`` the shifted grid stays whole, in row-major order (what the Triton route reads)."""
    return _quarter_window_orders(grid, windows, cut, device)


@functools.lru_cache(maxsize=64)
def _quarter_window_orders(grid, windows, cut, device) -> WindowOrder:
    shifts = [quarter_shift(grid, windows, quarter) for quarter in range(SHIFT_QUARTERS)]
    return window_order(grid, windows if cut else (1, 1), shifts, device)


@functools.lru_cache(maxsize=64)
def _single_window_order(grid, windows, shift, device) -> WindowOrder:
    return window_order(grid, windows, [shift], device)


def shifted_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grid: tuple[int, int],
    windows: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    backend: str = "torch",
) -> torch.Tensor:
    """Attention restricted to ``windows[0] x windows[1]`` windows of the ``grid`` after a cyclic ``shift``.

    Args:
        query, key, value: ``[B, h * w, H, D]``.
        grid: ``(h, w)``.
        windows: windows per axis; ``(1, 1)`` is dense attention.
        shift: cyclic shift per axis in tokens, applied before cutting and undone after.
        backend: ``"torch"`` (batched SDPA over windows) or ``"triton"`` (the block-sparse kernel; the windows must
            divide the grid, see ``windows_divide``).

    Returns:
        ``[B, h * w, H, D]``.
    """
    _check_geometry(query, grid, windows, backend)
    shift = tuple(int(s) % side for s, side in zip(shift, grid, strict=True))
    order = _single_window_order(grid, (1, 1) if backend == "triton" else windows, shift, query.device)
    return _attend_in_order(query, key, value, grid, windows, order, 0, backend)


def quarter_shifted_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grid: tuple[int, int],
    windows: tuple[int, int],
    quarter: int | torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """`shifted_window_attention` shifted by ``quarter`` quarters of a window (HiDiffusion's shifts).

    ``quarter`` may be a one-element long tensor on the inputs' device: under torch.compile a graph then serves every shift
    (an int would be a constant of the graph, compiled again for each other shift).
    """
    _check_geometry(query, grid, windows, backend)
    order = quarter_window_orders(grid, windows, backend != "triton", query.device)
    return _attend_in_order(query, key, value, grid, windows, order, quarter, backend)


def _check_geometry(query, grid, windows, backend) -> None:
    height, width = grid
    if height * width != query.shape[1]:
        raise ValueError(f"grid {grid} holds {height * width} tokens, the sequence has {query.shape[1]}")
    if windows[0] > height or windows[1] > width:
        raise ValueError(f"{windows[0]}x{windows[1]} windows do not fit a {height}x{width} token grid")
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and not windows_divide(grid, windows):
        # Blocked GNA clamps a short last window back into the grid instead of padding it: other windows.
        raise ValueError(
            f"the Triton route needs windows that divide the {height}x{width} token grid (window "
            f"{window_geometry(grid, windows)[0]}); use backend='torch', which pads"
        )


def _attend_in_order(query, key, value, grid, windows, order: WindowOrder, row, backend) -> torch.Tensor:
    """Attention in the windows of ``order``'s row ``row`` (on the Triton route, ``order`` only shifts the grid)."""
    batch, tokens, heads, _ = query.shape
    if isinstance(row, torch.Tensor):
        # A tensor row stays data in the graph; indexing with it as a scalar would make Dynamo read its value.
        gather, scatter = (table.index_select(0, row.reshape(1)).squeeze(0) for table in (order.gather, order.scatter))
    else:
        gather, scatter = order.gather[row], order.scatter[row]
    if backend == "triton":
        from accel.kernels.block_sparse import block_sparse_attention
        from accel.kernels.neighborhood import Neighborhood

        # The kernel addresses each window's key tiles in place: only the shift is a copy.
        window = window_geometry(grid, windows)[0]
        out, _ = block_sparse_attention(
            query.index_select(1, gather),
            key.index_select(1, gather),
            value.index_select(1, gather),
            Neighborhood.create(grid, window, window),
        )
        return out.index_select(1, scatter)
    count = windows[0] * windows[1]

    def windowed(x: torch.Tensor) -> torch.Tensor:
        # One gather shifts, pads and cuts; SDPA takes [B * count, heads, window tokens, dim].
        return x.index_select(1, gather).reshape(batch * count, -1, heads, x.shape[-1]).transpose(1, 2)

    mask = None if order.valid is None else order.valid.repeat(batch, 1)[:, None, None, :]
    out = F.scaled_dot_product_attention(windowed(query), windowed(key), windowed(value), attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, -1, heads, out.shape[-1])
    return out.index_select(1, scatter)


def windows_divide(grid: tuple[int, int], windows: tuple[int, int]) -> bool:
    """Whether ``windows`` cut ``grid`` into equal windows with no padding (what the Triton route needs)."""
    return window_geometry(grid, windows)[1] == (0, 0)


def shifted_window_attention_reference(query, key, value, grid, windows, shift=(0, 0)) -> torch.Tensor:
    """The same result through an explicit ``[S, S]`` mask over the unshifted grid: slow, obviously right."""
    height, width = grid
    (window_h, window_w), _ = window_geometry(grid, windows)
    rows = (torch.arange(height) - shift[0]) % height // window_h
    cols = (torch.arange(width) - shift[1]) % width // window_w
    window_id = (rows[:, None] * windows[1] + cols[None, :]).reshape(-1).to(query.device)
    mask = window_id[:, None] == window_id[None, :]
    from accel.kernels.reference import attention_reference

    return attention_reference(query, key, value, attn_mask=mask)
