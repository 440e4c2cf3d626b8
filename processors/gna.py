"""Generalized neighborhood attention processors for FLUX and HunyuanVideo joint attention.

The joint sequence holds text and visual tokens (text first in FLUX, last in HunyuanVideo). Visual queries attend
their neighborhood of the visual grid plus every text token (HunyuanVideo's padded text keys stay masked); text
queries attend the whole sequence, exactly as dense. Projections, norms and RoPE are the dense processors'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from accel.kernels.neighborhood import (
    Neighborhood,
    neighborhood_attention_reference,
    neighborhood_attention_tiled,
)
from accel.kernels.reference import gradients_tracked
from accel.processors.dense import AttentionCall, DenseFluxAttnProcessor, DenseHunyuanVideoAttnProcessor
from accel.processors.joint import JointVisualAttend
from accel.processors.state import PatchContext


@dataclass(frozen=True)
class NeighborhoodSettings:
    """One layer's GNA geometry; ``None`` entries take the model's defaults for the grid of the call."""

    kernel_size: int | tuple[int, ...] | None = None
    stride: int | tuple[int, ...] | None = None
    dilation: int | tuple[int, ...] = 1
    is_causal: bool | tuple[bool, ...] = False


# grid -> (kernel_size, stride): the model family's defaults for a grid.
DefaultGeometry = Callable[[tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


class _NeighborhoodAttend(JointVisualAttend):
    """GNA for the visual queries of FLUX and HunyuanVideo joint attention (mixed in before the dense processor)."""

    method = "gna"

    def __init__(
        self,
        context: PatchContext,
        layer: str,
        settings: NeighborhoodSettings,
        default_geometry: DefaultGeometry,
        dense_steps: int = 0,
        backend: str = "auto",
    ):
        super().__init__(context=context, layer=layer)
        self.settings = settings
        self.default_geometry = default_geometry
        self.dense_steps = dense_steps
        self.backend = backend
        self._neighborhoods: dict[tuple[int, ...], Neighborhood] = {}

    def _visual_plan(self, call: AttentionCall) -> Neighborhood | None:
        if self._dense_step():
            return None
        neighborhood = self._neighborhood(call.visual_tokens)
        return None if neighborhood.is_dense else neighborhood

    def _visual_attention(self, query, key, value, text_key, text_value, text_mask, neighborhood):
        backend = self._backend_for(query.device, gradients_tracked(query, key, value, text_key, text_value))
        if backend == "triton":
            from accel.kernels.block_sparse import block_sparse_attention

            out, _ = block_sparse_attention(query, key, value, neighborhood, text_key, text_value, text_mask)
            return out
        if backend == "reference":
            self._check_reference_size(query, key, text_key)
            return neighborhood_attention_reference(query, key, value, neighborhood, text_key, text_value, text_mask)
        return neighborhood_attention_tiled(query, key, value, neighborhood, text_key, text_value, text_mask)

    def _neighborhood(self, visual_tokens: int) -> Neighborhood:
        grid = self._visual_grid(visual_tokens)
        cached = self._neighborhoods.get(grid)
        if cached is None:
            default_kernel, default_stride = self.default_geometry(grid)
            kernel = self.settings.kernel_size if self.settings.kernel_size is not None else default_kernel
            stride = self.settings.stride if self.settings.stride is not None else default_stride
            try:
                if self.settings.kernel_size is not None and self.settings.stride is None:
                    # An explicit kernel with the default stride: keep the stride within the kernel.
                    kernels = kernel if isinstance(kernel, tuple) else (kernel,) * len(grid)
                    stride = tuple(min(s, k) for s, k in zip(stride, kernels, strict=True))
                elif self.settings.stride is not None and self.settings.kernel_size is None:
                    # An explicit stride with the default window: widen the window to the stride, since a stride
                    # group must fit in the window it shares. A stride past the grid's side is one group on that axis,
                    # which the side itself says.
                    strides = stride if isinstance(stride, tuple) else (stride,) * len(grid)
                    stride = tuple(min(s, side) for s, side in zip(strides, grid, strict=True))
                    kernel = tuple(max(k, s) for k, s in zip(kernel, stride, strict=True))
                    dilation = self.settings.dilation
                    dilations = dilation if isinstance(dilation, tuple) else (dilation,) * len(grid)
                    for side, window, step, spread in zip(grid, kernel, stride, dilations, strict=True):
                        if window * spread > side:
                            raise ValueError(
                                f"stride {step} needs a window of at least {window}, which dilated by {spread} spans "
                                f"{window * spread} tokens, more than the side {side}; use a smaller stride or "
                                "dilation, or a larger size"
                            )
                cached = Neighborhood.create(grid, kernel, stride, self.settings.dilation, self.settings.is_causal)
            except ValueError as error:
                raise ValueError(f"gna: {self.layer} at token grid {grid}: {error}") from None
            self._neighborhoods[grid] = cached
        return cached

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, settings={self.settings})"


class GNAFluxAttnProcessor(_NeighborhoodAttend, DenseFluxAttnProcessor):
    """GNA over FLUX's 2-D image-token grid (text tokens first, global)."""


class GNAHunyuanVideoAttnProcessor(_NeighborhoodAttend, DenseHunyuanVideoAttnProcessor):
    """GNA over HunyuanVideo's 3-D video-token grid (text tokens last, global, padded keys masked)."""
