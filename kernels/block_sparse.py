"""Fused block-sparse attention forward in Triton: the engine GNA (and later VMoBA and window attention) runs on GPUs.

One program computes one query tile of one (batch, head). Tiles are boxes of the token grid (``tile`` positions per
axis), addressed in place: the kernel computes each token's row-major offset from its grid coordinates, so the
``[B, S, H, D]`` tensors are never permuted into tile order. For each query tile the kernel walks a list of key tiles
(built on the host from the neighborhood, per-axis, so no ``[S, S]`` mask ever exists), applies the fine-grained
window mask from token coordinates only in key tiles that are partly inside the windows, then attends the dense
extra keys (text tokens, with an optional padding mask) in the same launch, and writes the output and the
log-sum-exp. Softmax is online, in fp32, base 2. Each launch takes the largest tile (down from 128 positions) whose
operands fit the device's shared memory (`launch_config`): fp32 and head dim 256 need smaller ones on most GPUs.

Tests run it on CPU through Triton's interpreter (``TRITON_INTERPRET=1``) against
``accel.kernels.neighborhood.neighborhood_attention_reference``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch

from accel.kernels.neighborhood import Neighborhood, _axis_allowed, axis_windows

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency; elsewhere the torch paths serve
    triton = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A head's whole feature row sits in every tile; the launches are checked (cross-compiled) up to 256.
MAX_HEAD_DIM = 256
# On GPUs tl.dot needs 16 along its inner axis, and GNA's key tiles are its query tiles (the interpreter accepts less,
# so only a compiled kernel would fail).
MIN_TILE_POSITIONS = 16
# Keys per step of the select kernel and text keys per step of both, where the query tile is no shorter.
KEY_BLOCK = 64


def triton_usable(device: torch.device | str) -> bool:
    """Whether the kernel can run on ``device``: a CUDA device, or any device under Triton's interpreter."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.device(device).type == "cuda"


def default_tile(grid: tuple[int, ...]) -> tuple[int, ...]:
    """Power-of-two tile per axis, 128 tokens where the grid allows (NATTEN's H100 choices: (16, 8), (2, 8, 8)), and
    never under ``MIN_TILE_POSITIONS`` (positions past the grid are masked)."""
    preferred = {1: (128,), 2: (16, 8), 3: (2, 8, 8)}[len(grid)]
    tile = [min(size, _next_power_of_two(side)) for size, side in zip(preferred, grid, strict=True)]
    while math.prod(tile) < MIN_TILE_POSITIONS:
        # Grow along an axis the grid still extends past the tile, so fewer positions are padding.
        longer = [axis for axis, (size, side) in enumerate(zip(tile, grid, strict=True)) if size < side]
        tile[longer[-1] if longer else -1] *= 2
    return tuple(tile)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _check_tile(tile: tuple[int, ...], grid: tuple[int, ...]) -> None:
    if len(tile) != len(grid) or any(t < 1 or t & (t - 1) for t in tile):
        raise ValueError(f"tile {tile} must give one power of two per grid axis {grid}")
    if math.prod(tile) < MIN_TILE_POSITIONS:
        raise ValueError(
            f"tile {tile} holds {math.prod(tile)} positions; GPUs need {MIN_TILE_POSITIONS} or more (tl.dot's "
            f"minimum), e.g. {default_tile(grid)}"
        )


def _halve(tile: tuple[int, ...]) -> tuple[int, ...]:
    """The tile with its longest axis halved (the first of equals, so the contiguous last axis stays long)."""
    axis = tile.index(max(tile))
    return tile[:axis] + (tile[axis] // 2,) + tile[axis + 1 :]


@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel is launched: its query tile, the keys it takes per step (the select kernel's block keys and both
    kernels' text keys; GNA's key tiles are its query tiles), and Triton's options."""

    tile: tuple[int, ...]
    key_block: int
    num_warps: int
    num_stages: int


def shared_memory_estimate(kernel: str, dtype: torch.dtype, block_d: int, query_positions: int, arch: int = 90) -> int:
    """Bytes of shared memory one program of ``kernel`` ("gna" or "select") takes on an NVIDIA GPU of compute
    capability ``arch`` (90 for 9.0): at least what Triton allocates, and within 1 KiB of it but for the select
    kernel's 16-bit build on sm90 and sm100, which takes less (fitted to both kernels cross-compiled for sm80, sm86,
    sm89, sm90, sm100 and sm120, at the dtypes, head dims and tiles `launch_config` can choose).

    Operands pass through shared memory on their way to tl.dot: the query tile, the key and value tiles, and in fp32,
    where IEEE dots run on CUDA cores, the probabilities as well. Text keys come in blocks no longer than the key
    tiles, so the key loop bounds them.
    """
    keys = query_positions if kernel == "gna" else min(KEY_BLOCK, query_positions)
    # Rows of D staged, as compiled: M + 2 N in general; the select kernel's 16-bit build holds a second query tile,
    # GNA's on sm100 (tcgen05 MMA) a third key tile.
    rows = query_positions + 2 * keys
    if dtype.itemsize == 2 and kernel == "select":
        rows += query_positions
    elif dtype.itemsize == 2 and 100 <= arch < 120:
        rows += keys
    needed = rows * block_d * dtype.itemsize
    if dtype == torch.float32:
        needed += query_positions * keys * 4
    return needed + 1024


def launch_config(
    kernel: str, dtype: torch.dtype, head_dim: int, tile: tuple[int, ...], shared_memory: int | None, arch: int = 90
) -> LaunchConfig:
    """The launch of ``kernel`` ("gna" or "select") for ``tile``: as given where ``shared_memory`` bytes (the limit of
    the device, of compute capability ``arch``; ``None`` under the interpreter, which has none) hold it, else with the
    tile halved until they do.

    Flash-attention's usual choice, 128 positions and two pipeline stages, fits fp16 and bf16 up to head dim 128 on
    every GPU since the A100; fp32 and head dim 256 need smaller tiles on most. Halving the tile is the one step down:
    with one stage the fp16 builds take more shared memory, not less (cross-compiled).
    """
    block_d = _block_d(head_dim)
    while True:
        positions = math.prod(tile)
        if shared_memory is None or shared_memory_estimate(kernel, dtype, block_d, positions, arch) <= shared_memory:
            # Warps: flash-attention's usual choice for 128 x 128 tiles; not yet tuned on a GPU (none was lent so far).
            warps = 8 if positions * block_d >= 128 * 128 else 4
            return LaunchConfig(tile, min(KEY_BLOCK, positions), num_warps=warps, num_stages=2)
        if positions <= MIN_TILE_POSITIONS:
            raise ValueError(
                f"the {kernel} kernel needs more than the device's {shared_memory} bytes of shared memory for {dtype} "
                f"at head dim {head_dim}, at any tile; use the torch path (backend='torch')"
            )
        tile = _halve(tile)


def _block_d(head_dim: int) -> int:
    return max(16, _next_power_of_two(head_dim))


def _device_limits(device: torch.device) -> tuple[int | None, int]:
    """``(shared_memory, arch)`` for `launch_config`: the bytes of shared memory one program may use on ``device`` and
    its compute capability; no limit under the interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None, 90
    return _cuda_limits(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_limits(index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"], 10 * major + minor


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device, which need not be the tensors' (a model on ``cuda:1``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _features_within_int32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor``, or a contiguous copy where its features lie 2**31 elements apart or more: the kernels multiply the
    feature index by its stride in int32, as 64-bit offset tiles would cost registers (cross-compiled, they spill).
    Rows are addressed in int64."""
    if tensor is None or tensor.stride(-1) * tensor.shape[-1] < 2**31:
        return tensor
    return tensor.contiguous()


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the block-sparse kernel needs triton (pip install triton); use the torch path instead")


def _check_operands(query, key, value, extra_key, extra_value, extra_mask, **more) -> None:
    """A ``ValueError`` naming the operand that does not match the query: the kernels take every shape from the query
    and would read a mismatched operand out of bounds, or in the wrong dtype, without an error."""
    if query.ndim != 4:
        raise ValueError(f"query must be [B, S, H, D], got shape {tuple(query.shape)}")
    batch, _, heads, dim = query.shape
    if query.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the kernel runs fp16, bf16 and fp32, the query is {query.dtype}; use the torch path")
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"the kernel takes head dims up to {MAX_HEAD_DIM}, the query has {dim}; use the torch path")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"query, key and value must share one shape, got {query.shape}, {key.shape}, {value.shape}")
    if (extra_key is None) != (extra_value is None):
        raise ValueError("extra_key and extra_value come together: give both or neither")
    if extra_mask is not None and extra_key is None:
        raise ValueError("extra_mask masks extra keys, and no extra_key was given")
    if extra_key is not None:
        if extra_key.ndim != 4 or (extra_key.shape[0], *extra_key.shape[2:]) != (batch, heads, dim):
            raise ValueError(
                f"extra_key must be [B, T, H, D] = [{batch}, T, {heads}, {dim}] as the query, got "
                f"{tuple(extra_key.shape)}"
            )
        if extra_value.shape != extra_key.shape:
            raise ValueError(
                f"extra_value must have extra_key's shape {tuple(extra_key.shape)}, got {tuple(extra_value.shape)}"
            )
        if extra_mask is not None and tuple(extra_mask.shape) != (batch, extra_key.shape[1]):
            raise ValueError(
                f"extra_mask must be [B, T] = [{batch}, {extra_key.shape[1]}], got {tuple(extra_mask.shape)} (expand a "
                f"mask shared by the batch with .expand({batch}, -1))"
            )
        if extra_mask is not None and extra_mask.dtype != torch.bool:
            raise ValueError(f"extra_mask must be booleans (False for padded keys), got {extra_mask.dtype}")
    same_dtype = {"key": key, "value": value, "extra_key": extra_key, "extra_value": extra_value}
    for name, tensor in same_dtype.items():
        if tensor is not None and tensor.dtype != query.dtype:
            raise ValueError(f"{name} is {tensor.dtype} and the query {query.dtype}; the kernel takes one dtype")
    for name, tensor in {**same_dtype, "extra_mask": extra_mask, **more}.items():
        if tensor is not None and tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device} and the query on {query.device}; move it there")


@dataclass(frozen=True)
class BlockSparsePlan:
    """Host-side description of one GNA problem for the kernel.

    Attributes:
        grid, tile: 3-D (leading axes of size 1 added for 1-D / 2-D problems).
        windows: ``int32 [3, 2, L_max]``: per axis, each position's window start and end in its dilation sub-grid.
        dilation: per axis (3-D).
        key_tiles: ``int32 [query_tiles, max_count]``: ``2 * key_tile + partial`` for each key tile a query tile
            attends; ``partial`` says the fine mask is needed there.
        key_tile_counts: ``int32 [query_tiles]``.
        density: share of tile pairs visited (what the kernel computes, masks included).
    """

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    windows: torch.Tensor
    dilation: tuple[int, int, int]
    key_tiles: torch.Tensor
    key_tile_counts: torch.Tensor
    density: float


@functools.lru_cache(maxsize=64)
def block_sparse_plan(neighborhood: Neighborhood, tile: tuple[int, ...], device: torch.device) -> BlockSparsePlan:
    _check_tile(tile, neighborhood.grid)
    pad = 3 - len(neighborhood.grid)
    grid = (1,) * pad + neighborhood.grid
    tile3 = (1,) * pad + tuple(tile)
    kernel = (1,) * pad + neighborhood.kernel_size
    stride = (1,) * pad + neighborhood.stride
    dilation = (1,) * pad + neighborhood.dilation
    causal = (False,) * pad + neighborhood.is_causal

    longest = max(grid)
    windows = torch.zeros(3, 2, longest, dtype=torch.int32)
    any_tiles, all_tiles = [], []
    for axis in range(3):
        side, size, dil = grid[axis], tile3[axis], dilation[axis]
        for group in range(dil):
            members = torch.arange(group, side, dil)
            start, end = axis_windows(len(members), kernel[axis], stride[axis], causal[axis])
            windows[axis, 0, members] = start.to(torch.int32)
            windows[axis, 1, members] = end.to(torch.int32)
        allowed = _axis_allowed(side, kernel[axis], stride[axis], dil, causal[axis])
        count = math.ceil(side / size)
        padded = torch.zeros(count * size, count * size, dtype=torch.bool)
        padded[:side, :side] = allowed
        real = torch.zeros(count * size, dtype=torch.bool)
        real[:side] = True
        blocks = padded.reshape(count, size, count, size)
        any_tiles.append(blocks.any(dim=3).any(dim=1))
        # Positions past the grid are masked by bounds in the kernel, so they do not make a tile partial.
        ignore = ~(real[:, None] & real[None, :])
        all_tiles.append((padded | ignore).reshape(count, size, count, size).all(dim=3).all(dim=1))

    def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a[:, None, :, None] & b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], -1)

    visited = kron(kron(any_tiles[0], any_tiles[1]), any_tiles[2])
    full = kron(kron(all_tiles[0], all_tiles[1]), all_tiles[2]) & visited
    counts = visited.sum(dim=1).to(torch.int32)
    order = torch.argsort((~visited).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]
    entries = (2 * order + (~full).gather(1, order).to(torch.int64)).to(torch.int32)
    return BlockSparsePlan(
        grid=grid,
        tile=tile3,
        windows=windows.to(device),
        dilation=dilation,
        key_tiles=entries.contiguous().to(device),
        key_tile_counts=counts.to(device),
        density=float(visited.float().mean()),
    )


# Eager under torch.compile (a graph break per call): the launch plan is built in Python from the grid, and Triton
# launches traced into Dynamo graphs have not been run on a GPU here.
@torch.compiler.disable
def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    neighborhood: Neighborhood,
    extra_key: torch.Tensor | None = None,
    extra_value: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    tile: tuple[int, ...] | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GNA on the Triton kernel.

    Args:
        query, key, value: ``[B, S, H, D]`` (fp16, bf16 or fp32, ``D <= 256``; any strides, e.g. slices of a joint
            sequence).
        neighborhood: the geometry; ``S`` must equal its token count.
        extra_key, extra_value: ``[B, T, H, D]`` keys every query attends (text tokens), or ``None``.
        extra_mask: ``[B, T]`` booleans, False for padded extra keys, or ``None``.
        tile: power-of-two tile per axis, at least 16 positions (``default_tile`` by default); halved where the
            device's shared memory cannot hold it.
        scale: softmax scale, ``1 / sqrt(D)`` by default.

    Returns:
        ``(out [B, S, H, D], lse [B, H, S] fp32)``.

    Raises:
        ValueError: operands that do not match the query (shape, dtype, device), or a bad tile.
    """
    _require_triton()
    _check_operands(query, key, value, extra_key, extra_value, extra_mask)
    query, key, value, extra_key, extra_value = map(
        _features_within_int32, (query, key, value, extra_key, extra_value)
    )
    batch, tokens, heads, dim = query.shape
    if tokens != neighborhood.tokens:
        raise ValueError(f"the grid {neighborhood.grid} holds {neighborhood.tokens} tokens, the sequence has {tokens}")
    tile = tuple(tile or default_tile(neighborhood.grid))
    _check_tile(tile, neighborhood.grid)
    config = launch_config("gna", query.dtype, dim, tile, *_device_limits(query.device))
    plan = block_sparse_plan(neighborhood, config.tile, query.device)
    out = torch.empty_like(query)
    lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device=query.device)
    text_key, text_value, text_mask, text_tokens = _text_arguments(query, value, extra_key, extra_value, extra_mask)
    has_text = extra_key is not None
    query_tiles = plan.key_tiles.shape[0]
    scale = dim**-0.5 if scale is None else scale
    with _on_device(query.device):
        _gna_forward[(query_tiles, batch * heads)](
            query, key, value, out, lse,
            text_key, text_value, text_mask,
            plan.windows, plan.key_tiles, plan.key_tile_counts,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            *text_key.stride(), *text_value.stride(), text_mask.stride(0),
            heads, tokens, text_tokens, plan.key_tiles.shape[1], plan.windows.shape[-1], scale * 1.4426950408889634,
            *plan.grid, *plan.dilation, dim,
            T0=plan.tile[0], T1=plan.tile[1], T2=plan.tile[2],
            BLOCK_D=_block_d(dim),
            BLOCK_TEXT=config.key_block,
            HAS_TEXT=has_text,
            HAS_TEXT_MASK=has_text and extra_mask is not None,
            IEEE=query.dtype == torch.float32,
            # Triton's interpreter multiplies bf16 tiles as raw 16-bit integers; there, and only there, dots run in fp32.
            UPCAST=query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
    return out, lse


def _text_arguments(query, value, extra_key, extra_value, extra_mask):
    """The kernels' text operands; without text, stand-ins the kernel never reads."""
    ones = torch.ones(1, 1, dtype=torch.int8, device=query.device)
    if extra_key is None:
        return query, value, ones, 0
    mask = extra_mask.to(torch.int8).contiguous() if extra_mask is not None else ones
    return extra_key, extra_value, mask, extra_key.shape[1]


@functools.lru_cache(maxsize=64)
def tile_of_tokens(grid: tuple[int, ...], tile: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[S]`` the query tile of each row-major token, numbered as the kernels walk tiles (raster order); cached
    per geometry, since every layer of every step asks for the same one."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(side) for side in grid), indexing="ij"), dim=-1).reshape(
        -1, len(grid)
    )
    index = torch.zeros(coords.shape[0], dtype=torch.long)
    for axis, (side, size) in enumerate(zip(grid, tile, strict=True)):
        index = index * math.ceil(side / size) + coords[:, axis] // size
    return index.to(device)


# Eager under torch.compile, as block_sparse_attention is.
@torch.compiler.disable
def block_select_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    partition,
    selected: torch.Tensor,
    extra_key: torch.Tensor | None = None,
    extra_value: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    tile: tuple[int, ...] | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VMoBA on the Triton kernel: each query attends the key blocks it selected, plus the extra (text) keys.

    Args:
        query, key, value: ``[B, S, H, D]`` on the ``partition``'s grid.
        partition: an ``accel.kernels.vmoba.BlockPartition``.
        selected: ``[B, H, S, C]`` booleans from ``select_blocks`` (per query, per block).
        extra_key, extra_value, extra_mask: as in `block_sparse_attention`.
        tile: power-of-two query tile per axis, at least 16 positions (``default_tile`` by default); halved where the
            device's shared memory cannot hold it.

    Returns:
        ``(out [B, S, H, D], lse [B, H, S] fp32)``.

    A query tile visits the union of its queries' blocks (per head, a variable number); rows that did not keep a
    block are masked there, so the result is exactly the per-query selection.
    """
    _require_triton()
    _check_operands(query, key, value, extra_key, extra_value, extra_mask, selected=selected)
    query, key, value, extra_key, extra_value = map(
        _features_within_int32, (query, key, value, extra_key, extra_value)
    )
    batch, tokens, heads, dim = query.shape
    if tokens != partition.tokens:
        raise ValueError(f"the grid {partition.grid} holds {partition.tokens} tokens, the sequence has {tokens}")
    blocks = partition.num_blocks
    if selected.shape != (batch, heads, tokens, blocks):
        raise ValueError(
            f"selected must be [B, H, S, C] = {(batch, heads, tokens, blocks)}, got {tuple(selected.shape)}"
        )
    tile = tuple(tile or default_tile(partition.grid))
    _check_tile(tile, tuple(partition.grid))
    config = launch_config("select", query.dtype, dim, tile, *_device_limits(query.device))
    tile = config.tile
    pad = 3 - len(partition.grid)
    grid3, tile3 = (1,) * pad + tuple(partition.grid), (1,) * pad + tile
    query_tiles = math.prod(math.ceil(side / size) for side, size in zip(grid3, tile3, strict=True))

    kept = selected.reshape(batch * heads, tokens, blocks).to(torch.uint8)
    index = tile_of_tokens(tuple(partition.grid), tile, query.device)[None, :, None].expand_as(kept)
    visited = torch.zeros(batch * heads, query_tiles, blocks, dtype=torch.uint8, device=query.device)
    visited.scatter_reduce_(1, index, kept, reduce="amax")
    visited = visited.bool()
    counts = visited.sum(dim=-1).to(torch.int32)  # [BH, QT]
    widest = max(int(counts.max()), 1)
    key_blocks = torch.argsort((~visited).to(torch.int8), dim=-1, stable=True)[..., :widest].to(torch.int32)

    out = torch.empty_like(query)
    lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device=query.device)
    text_key, text_value, text_mask, text_tokens = _text_arguments(query, value, extra_key, extra_value, extra_mask)
    block_tokens = partition.block_tokens.to(device=query.device, dtype=torch.int32).contiguous()
    scale = dim**-0.5 if scale is None else scale
    with _on_device(query.device):
        _block_select_forward[(query_tiles, batch * heads)](
            query, key, value, out, lse,
            text_key, text_value, text_mask,
            block_tokens, kept.contiguous(), key_blocks.contiguous(), counts.contiguous(),
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            *text_key.stride(), *text_value.stride(), text_mask.stride(0),
            heads, tokens, text_tokens, blocks, block_tokens.shape[1], widest, scale * 1.4426950408889634,
            *grid3, dim,
            T0=tile3[0], T1=tile3[1], T2=tile3[2],
            BLOCK_N=config.key_block,
            BLOCK_D=_block_d(dim),
            BLOCK_TEXT=config.key_block,
            HAS_TEXT=extra_key is not None,
            HAS_TEXT_MASK=extra_key is not None and extra_mask is not None,
            IEEE=query.dtype == torch.float32,
            UPCAST=query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
    return out, lse


if triton is not None:

    @triton.jit
    def _tile_coordinates(tile_index, G1, G2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
        tiles_1 = tl.cdiv(G1, T1)
        tiles_2 = tl.cdiv(G2, T2)
        offsets = tl.arange(0, T0 * T1 * T2)
        c0 = (tile_index // (tiles_1 * tiles_2)) * T0 + offsets // (T1 * T2)
        c1 = ((tile_index // tiles_2) % tiles_1) * T1 + (offsets // T2) % T1
        c2 = (tile_index % tiles_2) * T2 + offsets % T2
        return c0, c1, c2

    @triton.jit
    def _rows(Base, b, h, token, stride_b, stride_h, stride_s):
        """Pointers to the ``[B, S, H, D]`` rows of ``token`` in (b, h), in int64: a tensor, or the joint sequence it is
        sliced from, may hold more than 2**31 elements (``b`` and ``h`` are int64 already)."""
        return Base + b * stride_b + h * stride_h + token.to(tl.int64) * stride_s

    @triton.jit
    def _load_query_tile(
        Q, query_tile, b, h, sqb, sqs, sqh, sqd, G0, G1, G2, head_dim,
        T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """The query tile's rows (addressed in place from grid coordinates) and the coordinates themselves."""
        q0, q1, q2 = _tile_coordinates(query_tile, G1, G2, T0, T1, T2)
        q_valid = (q0 < G0) & (q1 < G1) & (q2 < G2)
        q_token = (q0 * G1 + q1) * G2 + q2
        d = tl.arange(0, BLOCK_D)
        d_valid = d < head_dim
        q = tl.load(
            _rows(Q, b, h, q_token, sqb, sqh, sqs)[:, None] + d[None, :] * sqd,
            mask=q_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        return q, q0, q1, q2, q_valid, q_token, d, d_valid

    @triton.jit
    def _keys_scores(
        q, K, V, b, h, k_token, k_valid, d, d_valid, skb, sks, skh, skd, svb, svs, svh, svd, scale_log2,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """Scores of the tile's queries against the keys at ``k_token`` (row indices, any order), and their values."""
        k = tl.load(
            _rows(K, b, h, k_token, skb, skh, sks)[None, :] + d[:, None] * skd,
            mask=k_valid[None, :] & d_valid[:, None],
            other=0.0,
        )
        v = tl.load(
            _rows(V, b, h, k_token, svb, svh, svs)[:, None] + d[None, :] * svd,
            mask=k_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            scores = tl.dot(q, k, input_precision="ieee") * scale_log2
        else:
            scores = tl.dot(q, k) * scale_log2
        return scores, v

    @triton.jit
    def _online_update(scores, allowed, m_i, l_i, acc, v, IEEE: tl.constexpr):
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen no key yet keeps m = -inf; shift by 0 there so exp2 never sees (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _gna_forward(
        Q, K, V, Out, Lse,
        TK, TV, TMask,
        Windows, KeyTiles, KeyTileCounts,
        sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sos, soh, sod,
        stkb, stks, stkh, stkd, stvb, stvs, stvh, stvd, stmb,
        heads, tokens, text_tokens, max_count, windows_len, scale_log2,
        G0, G1, G2, D0, D1, D2, head_dim,
        T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_TEXT: tl.constexpr,
        HAS_TEXT: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        query_tile = tl.program_id(0)
        # int64, so that every offset derived from it (b * stride, the selection's and the LSE's rows) is.
        batch_head = tl.program_id(1).to(tl.int64)
        b = batch_head // heads
        h = batch_head % heads

        q, q0, q1, q2, q_valid, q_token, d, d_valid = _load_query_tile(
            Q, query_tile, b, h, sqb, sqs, sqh, sqd, G0, G1, G2, head_dim, T0, T1, T2, BLOCK_D, UPCAST
        )
        # Each query's window per axis, in units of its dilation sub-grid.
        start0 = tl.load(Windows + q0, mask=q_valid, other=0)
        end0 = tl.load(Windows + windows_len + q0, mask=q_valid, other=0)
        start1 = tl.load(Windows + 2 * windows_len + q1, mask=q_valid, other=0)
        end1 = tl.load(Windows + 3 * windows_len + q1, mask=q_valid, other=0)
        start2 = tl.load(Windows + 4 * windows_len + q2, mask=q_valid, other=0)
        end2 = tl.load(Windows + 5 * windows_len + q2, mask=q_valid, other=0)
        group0, group1, group2 = q0 % D0, q1 % D1, q2 % D2

        m_i = tl.full([T0 * T1 * T2], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([T0 * T1 * T2], dtype=tl.float32)
        acc = tl.zeros([T0 * T1 * T2, BLOCK_D], dtype=tl.float32)

        count = tl.load(KeyTileCounts + query_tile)
        for j in range(0, count):
            entry = tl.load(KeyTiles + query_tile * max_count + j)
            k0, k1, k2 = _tile_coordinates(entry // 2, G1, G2, T0, T1, T2)
            k_valid = (k0 < G0) & (k1 < G1) & (k2 < G2)
            k_token = (k0 * G1 + k1) * G2 + k2
            scores, v = _keys_scores(
                q, K, V, b, h, k_token, k_valid, d, d_valid, skb, sks, skh, skd, svb, svs, svh, svd, scale_log2,
                IEEE, UPCAST,
            )  # fmt: skip
            allowed = k_valid[None, :] & (q_token[:, None] >= 0)
            if entry % 2 == 1:
                inside = (k0[None, :] % D0 == group0[:, None]) & (k0[None, :] // D0 >= start0[:, None])
                inside = inside & (k0[None, :] // D0 < end0[:, None])
                inside = inside & (k1[None, :] % D1 == group1[:, None]) & (k1[None, :] // D1 >= start1[:, None])
                inside = inside & (k1[None, :] // D1 < end1[:, None])
                inside = inside & (k2[None, :] % D2 == group2[:, None]) & (k2[None, :] // D2 >= start2[:, None])
                inside = inside & (k2[None, :] // D2 < end2[:, None])
                allowed = allowed & inside
            m_i, l_i, acc = _online_update(scores, allowed, m_i, l_i, acc, v, IEEE)

        if HAS_TEXT:
            m_i, l_i, acc = _attend_text(
                q, q_token, d, d_valid, b, h, m_i, l_i, acc,
                TK, TV, TMask, stkb, stks, stkh, stkd, stvb, stvs, stvh, stvd, stmb, text_tokens, scale_log2,
                BLOCK_TEXT, HAS_TEXT_MASK, IEEE, UPCAST,
            )  # fmt: skip
        _store_output(
            Out, Lse, acc, l_i, m_i, b, h, batch_head, q_token, q_valid, d, d_valid, sob, sos, soh, sod, tokens
        )

    @triton.jit
    def _attend_text(
        q, q_token, d, d_valid, b, h, m_i, l_i, acc,
        TK, TV, TMask, stkb, stks, stkh, stkd, stvb, stvs, stvh, stvd, stmb, text_tokens, scale_log2,
        BLOCK_TEXT: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """The dense extra keys (text tokens, optional padding mask) every query of the tile attends."""
        for first in range(0, text_tokens, BLOCK_TEXT):
            t = first + tl.arange(0, BLOCK_TEXT)
            t_valid = t < text_tokens
            if HAS_TEXT_MASK:
                t_valid = t_valid & (tl.load(TMask + b * stmb + t, mask=t_valid, other=0) != 0)
            scores, tv = _keys_scores(
                q, TK, TV, b, h, t, t_valid, d, d_valid, stkb, stks, stkh, stkd, stvb, stvs, stvh, stvd, scale_log2,
                IEEE, UPCAST,
            )  # fmt: skip
            allowed = t_valid[None, :] & (q_token[:, None] >= 0)
            m_i, l_i, acc = _online_update(scores, allowed, m_i, l_i, acc, tv, IEEE)
        return m_i, l_i, acc

    @triton.jit
    def _store_output(Out, Lse, acc, l_i, m_i, b, h, batch_head, q_token, q_valid, d, d_valid, sob, sos, soh, sod, tokens):  # fmt: skip
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            _rows(Out, b, h, q_token, sob, soh, sos)[:, None] + d[None, :] * sod,
            out.to(Out.dtype.element_ty),
            mask=q_valid[:, None] & d_valid[None, :],
        )
        # Natural-log LSE, so results can be merged with other attention outputs.
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(Lse + batch_head * tokens + q_token, lse, mask=q_valid)

    @triton.jit
    def _block_select_forward(
        Q, K, V, Out, Lse,
        TK, TV, TMask,
        BlockTokens, Selected, KeyBlocks, KeyBlockCounts,
        sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sos, soh, sod,
        stkb, stks, stkh, stkd, stvb, stvs, stvh, stvd, stmb,
        heads, tokens, text_tokens, blocks, block_size, max_count, scale_log2,
        G0, G1, G2, head_dim,
        T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TEXT: tl.constexpr,
        HAS_TEXT: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """VMoBA: a query tile walks the key blocks any of its queries kept (this head's list); each query attends
        only the blocks it kept itself (its row of the selection), then the text keys."""
        query_tile = tl.program_id(0)
        # int64, so that every offset derived from it (b * stride, the selection's and the LSE's rows) is.
        batch_head = tl.program_id(1).to(tl.int64)
        b = batch_head // heads
        h = batch_head % heads
        query_tiles = tl.num_programs(0)

        q, q0, q1, q2, q_valid, q_token, d, d_valid = _load_query_tile(
            Q, query_tile, b, h, sqb, sqs, sqh, sqd, G0, G1, G2, head_dim, T0, T1, T2, BLOCK_D, UPCAST
        )

        m_i = tl.full([T0 * T1 * T2], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([T0 * T1 * T2], dtype=tl.float32)
        acc = tl.zeros([T0 * T1 * T2, BLOCK_D], dtype=tl.float32)

        unit = batch_head * query_tiles + query_tile
        count = tl.load(KeyBlockCounts + unit)
        for j in range(0, count):
            block = tl.load(KeyBlocks + unit * max_count + j)
            kept = tl.load(Selected + (batch_head * tokens + q_token) * blocks + block, mask=q_valid, other=0) != 0
            for first in range(0, block_size, BLOCK_N):
                n = first + tl.arange(0, BLOCK_N)
                k_token = tl.load(BlockTokens + block * block_size + n, mask=n < block_size, other=-1)
                k_valid = k_token >= 0
                scores, v = _keys_scores(
                    q, K, V, b, h, k_token, k_valid, d, d_valid, skb, sks, skh, skd, svb, svs, svh, svd, scale_log2,
                    IEEE, UPCAST,
                )  # fmt: skip
                allowed = kept[:, None] & k_valid[None, :]
                m_i, l_i, acc = _online_update(scores, allowed, m_i, l_i, acc, v, IEEE)

        if HAS_TEXT:
            m_i, l_i, acc = _attend_text(
                q, q_token, d, d_valid, b, h, m_i, l_i, acc,
                TK, TV, TMask, stkb, stks, stkh, stkd, stvb, stvs, stvh, stvd, stmb, text_tokens, scale_log2,
                BLOCK_TEXT, HAS_TEXT_MASK, IEEE, UPCAST,
            )  # fmt: skip
        _store_output(
            Out, Lse, acc, l_i, m_i, b, h, batch_head, q_token, q_valid, d, d_valid, sob, sos, soh, sod, tokens
        )
