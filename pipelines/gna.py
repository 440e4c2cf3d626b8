"""GNA per model: default geometry per token grid, and the processor for each layer of FLUX and HunyuanVideo."""

from __future__ import annotations

import math
import re

from accel.processors.gna import GNAFluxAttnProcessor, GNAHunyuanVideoAttnProcessor, NeighborhoodSettings

# The GNA paper's strides are its kernel's query tiles, 16x16 for FLUX and 16x8x8 for HunyuanVideo: queries of a
# tile then share one window, and the attention is block-sparse (no mask inside a tile), which is what lets a kernel
# reach the speed the window's sparsity promises. The defaults keep those strides at every resolution (capped by the
# window) and scale only the window; the CPU path's tiles are whole stride groups, so they stay mask-free too.
FLUX_TILE = (16, 16)
HUNYUANVIDEO_TILE = (16, 8, 8)


def flux_default_geometry(grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """FLUX: the GNA paper's 4K setting (80x80 window, 16x16 stride on a 256x256 grid): the window scaled to ``grid``
    (5/16 of each side), the stride kept."""
    kernel = tuple(max(1, min(side, math.ceil(side * 5 / 16))) for side in grid)
    stride = tuple(min(k, tile) for k, tile in zip(kernel, FLUX_TILE, strict=True))
    return kernel, stride


def hunyuanvideo_default_geometry(grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """HunyuanVideo: the GNA paper's 18x24x24 window with 16x8x8 stride on 30x48x80 tokens: the window scaled to
    ``grid`` (0.6, 0.5 and 0.3 of frames, rows and columns), the stride kept."""
    kernel = tuple(
        max(1, min(side, math.ceil(side * share))) for side, share in zip(grid, (0.6, 0.5, 0.3), strict=True)
    )
    stride = tuple(min(k, tile) for k, tile in zip(kernel, HUNYUANVIDEO_TILE, strict=True))
    return kernel, stride


PROCESSORS = {
    "flux": (GNAFluxAttnProcessor, flux_default_geometry),
    "hunyuanvideo": (GNAHunyuanVideoAttnProcessor, hunyuanvideo_default_geometry),
}


def layer_settings(config, layer: str) -> NeighborhoodSettings:
    """The geometry of ``layer``: the config's, overridden by the first ``per_layer`` regex matching its name."""
    options = {
        "kernel_size": config.kernel_size,
        "stride": config.stride,
        "dilation": config.dilation,
        "is_causal": config.is_causal,
    }
    for pattern, overrides in (config.per_layer or {}).items():
        if re.fullmatch(pattern, layer):
            options.update(overrides)
            break
    return NeighborhoodSettings(**options)
