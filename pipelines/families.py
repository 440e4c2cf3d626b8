"""Model families accel supports: how to recognise a denoiser, list its attention layers and read its token layout.

A family knows nothing about methods; methods ask it which layers exist (``attention_sites``) and get per-call layout
facts from the hook in ``accel.pipelines.hooks``, which calls ``read_layout`` and ``timestep_of``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from accel.processors.dense import (
    DenseAttentionProcessorBase,
    DenseAttnProcessor,
    DenseFluxAttnProcessor,
    DenseHunyuanVideoAttnProcessor,
)
from accel.processors.state import LatentLayout


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a denoiser.

    Attributes:
        name: module name, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1``.
        kind: ``"self"`` / ``"cross"`` (UNet), ``"joint"`` (FLUX / HunyuanVideo dual-stream blocks) or ``"single"``
            (single-stream blocks, where text and image share projections).
        stage: where the layer sits: ``"down"``, ``"mid"``, ``"up"`` (UNet) or ``"double"``, ``"single"``.
        index: position of the layer among the sites of its family order (0-based), for layer-cyclic methods.
    """

    name: str
    kind: str
    stage: str
    index: int

    @property
    def processor_key(self) -> str:
        return f"{self.name}.processor"


class ModelFamily:
    """Base of the supported families; one instance per family lives in ``FAMILIES``."""

    name: str = ""
    title: str = ""
    denoiser_class_name: str = ""
    dense_processor_class: type[DenseAttentionProcessorBase] = DenseAttentionProcessorBase
    # Processor classes accel may replace: diffusers' plain attention for the family. Anything else (IP-Adapter,
    # a user's own processor) carries behaviour accel would silently drop, so patching it is refused.
    replaceable_processors: frozenset[str] = frozenset()
    # The denoiser receives the timestep divided by this (FLUX gets t / 1000).
    timestep_divisor: float = 1.0

    def denoiser_class(self) -> type:
        raise NotImplementedError

    def matches(self, model: torch.nn.Module) -> bool:
        return isinstance(model, self.denoiser_class())

    def attention_sites(self, denoiser: torch.nn.Module) -> list[AttentionSite]:
        sites = []
        for key in denoiser.attn_processors:
            name = key.removesuffix(".processor")
            described = self.describe(name)
            if described is not None:
                sites.append(AttentionSite(name=name, kind=described[0], stage=described[1], index=len(sites)))
        return sites

    def describe(self, name: str) -> tuple[str, str] | None:
        """``(kind, stage)`` of a layer, or ``None`` for layers accel never touches."""
        raise NotImplementedError

    def read_layout(self, denoiser: torch.nn.Module, inputs: dict[str, Any]) -> LatentLayout:
        raise NotImplementedError

    def timestep_of(self, inputs: dict[str, Any]) -> float | None:
        timestep = inputs.get("timestep")
        if timestep is None:
            return None
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.flatten()[0].item()
        return float(timestep) * self.timestep_divisor


class UNetFamily(ModelFamily):
    name = "unet"
    title = "Stable Diffusion 1.x / 2.x, SDXL"
    denoiser_class_name = "UNet2DConditionModel"
    dense_processor_class = DenseAttnProcessor
    replaceable_processors = frozenset({"AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0"})

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def describe(self, name):
        stage = name.split(".", 1)[0].removesuffix("_blocks").removesuffix("_block")
        if name.endswith(".attn1"):
            return "self", stage
        if name.endswith(".attn2"):
            return "cross", stage
        return "other", stage

    def read_layout(self, denoiser, inputs):
        sample = inputs["sample"]
        return LatentLayout(grid=tuple(sample.shape[-2:]), batch_size=sample.shape[0])


class _DualStreamFamily(ModelFamily):
    """Transformers with dual-stream (``transformer_blocks``) and single-stream (``single_transformer_blocks``) blocks.

    Any other attention layer (HunyuanVideo's text-only token refiner) is never touched.
    """

    def describe(self, name):
        if name.startswith("transformer_blocks."):
            return "joint", "double"
        if name.startswith("single_transformer_blocks."):
            return "single", "single"
        return None


class FluxFamily(_DualStreamFamily):
    name = "flux"
    title = "FLUX.1"
    denoiser_class_name = "FluxTransformer2DModel"
    dense_processor_class = DenseFluxAttnProcessor
    replaceable_processors = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0"})
    timestep_divisor = 1000.0

    def denoiser_class(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def read_layout(self, denoiser, inputs):
        hidden_states = inputs["hidden_states"]
        text = inputs.get("encoder_hidden_states")
        img_ids = inputs.get("img_ids")
        grid = None
        if img_ids is not None:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            # FLUX packs 2x2 latent patches and numbers them (0, row, col); the grid follows from the largest ids.
            rows, cols = (int(v) + 1 for v in ids[:, 1:3].amax(dim=0).tolist())
            if rows * cols == hidden_states.shape[1]:
                grid = (rows, cols)
        return LatentLayout(
            grid=grid,
            text_tokens=0 if text is None else text.shape[1],
            text_first=True,
            batch_size=hidden_states.shape[0],
        )


class HunyuanVideoFamily(_DualStreamFamily):
    name = "hunyuanvideo"
    title = "HunyuanVideo"
    denoiser_class_name = "HunyuanVideoTransformer3DModel"
    dense_processor_class = DenseHunyuanVideoAttnProcessor
    replaceable_processors = frozenset({"HunyuanVideoAttnProcessor2_0"})

    def denoiser_class(self):
        from diffusers import HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel

    def read_layout(self, denoiser, inputs):
        hidden_states = inputs["hidden_states"]
        frames, height, width = hidden_states.shape[-3:]
        patch_t, patch = denoiser.config.patch_size_t, denoiser.config.patch_size
        text = inputs.get("encoder_hidden_states")
        return LatentLayout(
            grid=(frames // patch_t, height // patch, width // patch),
            text_tokens=0 if text is None else text.shape[1],
            text_first=False,
            batch_size=hidden_states.shape[0],
        )


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (UNetFamily(), FluxFamily(), HunyuanVideoFamily())}


def detect_family(model: torch.nn.Module) -> ModelFamily | None:
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    return None
