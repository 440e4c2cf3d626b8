"""GNA per model: default geometry per token grid, and the processor for each layer of FLUX and HunyuanVideo."""

from __future__ import annotations

import math
import re

from accel.processors.gna import GNAFluxAttnProcessor, GNAHunyuanVideoAttnProcessor, NeighborhoodSettings


def flux_default_geometry(grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """FLUX: the GNA paper's 4K setting (80x80 window, 16x16 stride on a 256x256 grid) scaled to ``grid``."""
    kernel = tuple(max(1, min(side, math.ceil(side * 5 / 16))) for side in grid)
    stride = tuple(max(1, k // 5) for k in kernel)
    return kernel, stride


def hunyuanvideo_default_geometry(grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """HunyuanVideo: the GNA paper's 18x24x24 window with 16x8x8 stride on 30x48x80 tokens, scaled to ``grid``."""
    kernel = tuple(
        max(1, min(side, math.ceil(side * share))) for side, share in zip(grid, (0.6, 0.5, 0.3), strict=True)
    )
    stride = (max(1, kernel[0] * 8 // 9), max(1, kernel[1] // 3), max(1, kernel[2] // 3))
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
