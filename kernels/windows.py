"""Shifted-window attention over a 2-D token grid (HiDiffusion's MSW-MSA), as batched attention over windows.

Tensors are ``[B, S, H, D]`` with ``S = h * w`` tokens in row-major order. The grid is rolled by ``-shift`` (cyclic,
as HiDiffusion does: tokens wrapping around the border share a window, with no mask), cut into ``windows`` equal
windows, attended window by window in one batched SDPA call, and rolled back. Sides that do not divide are padded
at the end, and the padded keys are masked out, so any grid size works. No diffusers import.

On the Triton kernel (``backend="triton"``), windows that divide the grid are blocked neighborhood attention
(kernel = stride = window) on the rolled grid: the kernel visits only the key tiles of each query tile's window and
addresses the grid in place, so no window partition is copied; only the roll remains.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def window_geometry(grid: tuple[int, int], windows: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(window size, padding)`` per axis for ``grid`` cut into ``windows``."""
    size = tuple(math.ceil(side / count) for side, count in zip(grid, windows, strict=True))
    padding = tuple(s * count - side for s, count, side in zip(size, windows, grid, strict=True))
    return size, padding


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
    batch, tokens, heads, dim = query.shape
    height, width = grid
    if height * width != tokens:
        raise ValueError(f"grid {grid} holds {height * width} tokens, the sequence has {tokens}")
    if windows[0] > height or windows[1] > width:
        raise ValueError(f"{windows[0]}x{windows[1]} windows do not fit a {height}x{width} token grid")
    (window_h, window_w), (pad_h, pad_w) = window_geometry(grid, windows)
    if backend == "triton":
        return _block_sparse_windows(query, key, value, grid, (window_h, window_w), (pad_h, pad_w), shift)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    count = windows[0] * windows[1]

    def partition(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(batch, height, width, -1, x.shape[-1])
        if shift != (0, 0):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
        x = x.reshape(batch, windows[0], window_h, windows[1], window_w, -1, x.shape[-1])
        return x.permute(0, 1, 3, 2, 4, 5, 6).reshape(batch * count, window_h * window_w, -1, x.shape[-1])

    mask = None
    if pad_h or pad_w:
        mask = _padding_mask(grid, windows, query.device).repeat(batch, 1)[:, None, None, :]

    out = F.scaled_dot_product_attention(
        partition(query).transpose(1, 2),
        partition(key).transpose(1, 2),
        partition(value).transpose(1, 2),
        attn_mask=mask,
    ).transpose(1, 2)

    out = out.reshape(batch, windows[0], windows[1], window_h, window_w, heads, -1)
    out = out.permute(0, 1, 3, 2, 4, 5, 6).reshape(batch, windows[0] * window_h, windows[1] * window_w, heads, -1)
    out = out[:, :height, :width]
    if shift != (0, 0):
        out = torch.roll(out, shifts=shift, dims=(1, 2))
    return out.reshape(batch, tokens, heads, -1)


def windows_divide(grid: tuple[int, int], windows: tuple[int, int]) -> bool:
    """Whether ``windows`` cut ``grid`` into equal windows with no padding (what the Triton route needs)."""
    return window_geometry(grid, windows)[1] == (0, 0)


def _block_sparse_windows(query, key, value, grid, window, padding, shift):
    """Windows as blocked neighborhood attention on the Triton kernel, over the grid rolled by ``-shift``."""
    from accel.kernels.block_sparse import block_sparse_attention
    from accel.kernels.neighborhood import Neighborhood

    if padding != (0, 0):
        # Blocked GNA clamps a short last window back into the grid instead of padding it: other windows.
        raise ValueError(
            f"the Triton route needs windows that divide the {grid[0]}x{grid[1]} token grid (window {window}); "
            "use backend='torch', which pads"
        )
    batch, tokens, heads, _ = query.shape

    def rolled(tensor, by):
        if by == (0, 0):
            return tensor
        grid_view = tensor.reshape(batch, *grid, heads, tensor.shape[-1])
        return torch.roll(grid_view, shifts=by, dims=(1, 2)).reshape(batch, tokens, heads, tensor.shape[-1])

    into_windows = (-shift[0], -shift[1])
    blocked = Neighborhood.create(grid, window, window)
    out, _ = block_sparse_attention(
        rolled(query, into_windows), rolled(key, into_windows), rolled(value, into_windows), blocked
    )
    return rolled(out, shift)


@functools.lru_cache(maxsize=64)
def _padding_mask(grid: tuple[int, int], windows: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[count, window_h * window_w]`` booleans, True where a window position holds a real token.

    It depends only on the geometry, so it is built once per (grid, windows, device), not per layer and step.
    Padding sits at the end of each axis after the roll, so only the last windows hold padded positions.
    """
    (window_h, window_w), (pad_h, pad_w) = window_geometry(grid, windows)
    valid = F.pad(torch.ones(grid, device=device), (0, pad_w, 0, pad_h)) > 0
    valid = valid.reshape(windows[0], window_h, windows[1], window_w)
    return valid.permute(0, 2, 1, 3).reshape(windows[0] * windows[1], window_h * window_w)


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
