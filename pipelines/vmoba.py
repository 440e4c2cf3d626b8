"""VMoBA per model: the layer-cyclic block shapes and the processor for each layer of FLUX and HunyuanVideo."""

from __future__ import annotations

import math

from accel.processors.vmoba import VMoBAFluxAttnProcessor, VMoBAHunyuanVideoAttnProcessor

PROCESSORS = {"flux": VMoBAFluxAttnProcessor, "hunyuanvideo": VMoBAHunyuanVideoAttnProcessor}

# Blocks per axis of VMoBA's Wan 2.1 settings (20x30x52 tokens: 2-frame, 3x4 and 4x6x4 blocks), as shares of the grid,
# so that they scale to any resolution: frames (1-D), patches through all frames (2-D), cubes (3-D).
_VIDEO_CYCLE = ((10, None, None), (None, 10, 13), (5, 5, 13))
_IMAGE_CYCLE = ((16, 16),)


# Blocks smaller than this are grown (their bounded sides scaled alike): tiny blocks make every query be gathered for
# many blocks on CPU and leave GPU tiles half empty, and VMoBA's own kernel pays only with large blocks.
MIN_BLOCK_TOKENS = 1024


def default_block_shape(family: str, layer_index: int):
    """The block shape (a function of the grid) of the ``layer_index``-th patched layer when none is configured."""
    cycle = _VIDEO_CYCLE if family == "hunyuanvideo" else _IMAGE_CYCLE
    counts = cycle[layer_index % len(cycle)]

    def shape(grid: tuple[int, ...]) -> tuple[int | None, ...]:
        sides = [side if count is None else math.ceil(side / count) for side, count in zip(grid, counts, strict=True)]
        bounded = [axis for axis, count in enumerate(counts) if count is not None]
        for _ in range(4):
            tokens = math.prod(sides)
            growable = [axis for axis in bounded if sides[axis] < grid[axis]]
            if tokens >= MIN_BLOCK_TOKENS or not growable:
                break
            factor = (MIN_BLOCK_TOKENS / tokens) ** (1 / len(growable))
            for axis in growable:
                sides[axis] = min(grid[axis], math.ceil(sides[axis] * factor))
        return tuple(None if count is None else side for side, count in zip(sides, counts, strict=True))

    return shape


def configured_block_shape(blocks: list[tuple[int | None, ...]], layer_index: int):
    """The ``layer_index``-th patched layer's shape from the config's cycle (validated against the grid per call)."""
    fixed = blocks[layer_index % len(blocks)]
    return lambda grid: fixed
