"""Generalized neighborhood attention processors for FLUX and HunyuanVideo joint attention.

The joint sequence holds text and visual tokens (text first in FLUX, last in HunyuanVideo). Visual queries attend
their neighborhood of the visual grid plus every text token (HunyuanVideo's padded text keys stay masked); text
queries attend the whole sequence, exactly as dense. Projections, norms and RoPE are the dense processors'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils import logging

from accel.kernels.neighborhood import (
    Neighborhood,
    neighborhood_attention_reference,
    neighborhood_attention_tiled,
)
from accel.processors.dense import AttentionCall, DenseFluxAttnProcessor, DenseHunyuanVideoAttnProcessor
from accel.processors.state import PatchContext

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class NeighborhoodSettings:
    """One layer's GNA geometry; ``None`` entries take the model's defaults for the grid of the call."""

    kernel_size: int | tuple[int, ...] | None = None
    stride: int | tuple[int, ...] | None = None
    dilation: int | tuple[int, ...] = 1
    is_causal: bool | tuple[bool, ...] = False


# grid -> (kernel_size, stride): the model family's defaults for a grid.
DefaultGeometry = Callable[[tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


class _NeighborhoodAttend:
    """The GNA ``attend`` shared by the FLUX and HunyuanVideo processors (mixed in before the dense processor)."""

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
        self._warned_no_schedule = False

    def attend(self, query, key, value, attention_mask, call: AttentionCall):
        if call.kind != "joint" or self._dense_step():
            return super().attend(query, key, value, attention_mask, call)
        neighborhood = self._neighborhood(call.visual_tokens)
        if neighborhood.is_dense:
            return super().attend(query, key, value, attention_mask, call)

        text = call.text_tokens
        visual = slice(text, None) if call.text_first else slice(0, call.visual_tokens)
        text_part = slice(0, text) if call.text_first else slice(call.visual_tokens, None)
        text_mask = None if attention_mask is None else self._text_mask(attention_mask, query.shape[0], text_part)
        visual_out = self._visual_attention(
            query[:, visual],
            key[:, visual],
            value[:, visual],
            neighborhood,
            key[:, text_part] if text else None,
            value[:, text_part] if text else None,
            text_mask,
        )
        if not text:
            return visual_out
        # Text queries see every token: dense attention over the whole joint sequence, with the caller's mask.
        text_out = super().attend(query[:, text_part], key, value, attention_mask, call)
        parts = [text_out, visual_out] if call.text_first else [visual_out, text_out]
        return torch.cat([part.to(query.dtype) for part in parts], dim=1)

    def _text_mask(self, attention_mask: torch.Tensor, batch: int, text_part: slice) -> torch.Tensor | None:
        """The text keys' padding mask, or ``None`` when nothing is padded.

        Every layer of a denoiser call receives the same mask tensor, and ``.all()`` is a host sync on GPUs, so it is
        derived once per call and shared through the patch context (holding the tensor keeps the identity check
        sound).
        """
        cached = self.context.scratch.get("gna_text_mask") if self.context is not None else None
        if cached is not None and cached[0] is attention_mask:
            return cached[1]
        text_mask = _key_mask(attention_mask, batch, attention_mask.shape[-1])[:, text_part]
        if bool(text_mask.all()):
            text_mask = None
        if self.context is not None:
            self.context.scratch["gna_text_mask"] = (attention_mask, text_mask)
        return text_mask

    def _visual_attention(self, query, key, value, neighborhood, text_key, text_value, text_mask):
        backend = self._backend_for(query.device)
        if backend == "triton":
            from accel.kernels.block_sparse import block_sparse_attention

            out, _ = block_sparse_attention(query, key, value, neighborhood, text_key, text_value, text_mask)
            return out
        if backend == "reference":
            return neighborhood_attention_reference(query, key, value, neighborhood, text_key, text_value, text_mask)
        return neighborhood_attention_tiled(query, key, value, neighborhood, text_key, text_value, text_mask)

    def _backend_for(self, device: torch.device) -> str:
        if self.backend != "auto":
            if self.backend == "triton":
                from accel.kernels.block_sparse import triton_usable

                if not triton_usable(device):
                    raise RuntimeError(
                        f"gna: backend='triton' needs a CUDA device and triton (tensors are on {device}); "
                        "use backend='torch' or 'auto'"
                    )
            return self.backend
        if device.type == "cuda":
            from accel.kernels.block_sparse import triton_usable

            if triton_usable(device):
                return "triton"
        return "torch"

    def _dense_step(self) -> bool:
        if not self.dense_steps:
            return False
        step = self.context.step if self.context is not None else None
        if step is None or step.step_index is None:
            if not self._warned_no_schedule:
                logger.warning(
                    "gna: dense_steps=%d is ignored for %s: the model was patched without its pipeline, so the "
                    "step index is unknown; patch the pipeline instead",
                    self.dense_steps,
                    self.layer,
                )
                self._warned_no_schedule = True
            return False
        return step.step_index < self.dense_steps

    def _neighborhood(self, visual_tokens: int) -> Neighborhood:
        layout = self.context.layout if self.context is not None else None
        grid = None if layout is None else layout.grid
        if grid is None or math.prod(grid) != visual_tokens:
            raise RuntimeError(
                f"gna: {self.layer} received {visual_tokens} visual tokens but the recorded token grid is {grid}; "
                "GNA needs the grid (FLUX img_ids / HunyuanVideo latent shape) of the denoiser call"
            )
        cached = self._neighborhoods.get(grid)
        if cached is None:
            default_kernel, default_stride = self.default_geometry(grid)
            kernel = self.settings.kernel_size if self.settings.kernel_size is not None else default_kernel
            stride = self.settings.stride if self.settings.stride is not None else default_stride
            if self.settings.kernel_size is not None and self.settings.stride is None:
                # An explicit kernel with the default stride: keep the stride within the kernel.
                kernels = kernel if isinstance(kernel, tuple) else (kernel,) * len(grid)
                stride = tuple(min(s, k) for s, k in zip(stride, kernels, strict=True))
            try:
                cached = Neighborhood.create(grid, kernel, stride, self.settings.dilation, self.settings.is_causal)
            except ValueError as error:
                raise ValueError(f"gna: {self.layer} at token grid {grid}: {error}") from None
            self._neighborhoods[grid] = cached
        return cached

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, settings={self.settings})"


def _key_mask(attention_mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    """``[B, S_k]`` booleans from a key-padding mask broadcastable to ``[B, 1, 1, S_k]`` (HunyuanVideo's form)."""
    if attention_mask.dtype != torch.bool:
        raise ValueError("gna: only boolean key-padding masks are supported (HunyuanVideo's form)")
    if attention_mask.ndim == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
        return attention_mask[:, 0, 0].expand(batch, keys)
    if attention_mask.ndim == 2:
        return attention_mask.expand(batch, keys)
    raise ValueError(f"gna: attention masks of shape {tuple(attention_mask.shape)} are not key-padding masks")


class GNAFluxAttnProcessor(_NeighborhoodAttend, DenseFluxAttnProcessor):
    """GNA over FLUX's 2-D image-token grid (text tokens first, global)."""


class GNAHunyuanVideoAttnProcessor(_NeighborhoodAttend, DenseHunyuanVideoAttnProcessor):
    """GNA over HunyuanVideo's 3-D video-token grid (text tokens last, global, padded keys masked)."""
