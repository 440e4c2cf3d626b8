"""Context-parallel split plans: diffusers' own where a model has one, accel's for HunyuanVideo, which has none.

HunyuanVideo's plan splits the video tokens (``x_embedder``'s output), their RoPE tables (``rope``'s outputs) and the
refined text tokens (``context_embedder``'s output) into contiguous chunks, one per rank, and gathers ``proj_out``;
the text refiner itself runs whole on every rank (its token mean must see every token; its attention, given the
config too, is exact on duplicated keys). The model builds its attention mask inside ``forward`` from sequence
lengths, which after the split are the local ones, so every rank but the first would mask the wrong text tokens:
a hook gives each block its rank's own slice of the real text mask instead (``TextMaskShardHook``). Image-to-video
(token replacement) is not covered by the plan.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

from accel.pipelines.hooks import install_hook

HUNYUANVIDEO_CP_PLAN = {
    "rope": {
        0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
    },
    "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "context_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}

TEXT_MASK_HOOK_NAME = "accel_text_mask_shard"


class _TextMaskRecorder(ModelHook):
    """On the transformer: keeps the call's full ``encoder_attention_mask`` for the block hooks."""

    def __init__(self, shared: dict[str, Any]):
        super().__init__()
        self.shared = shared

    def pre_forward(self, module, *args, **kwargs):
        mask = kwargs.get("encoder_attention_mask")
        if mask is None and len(args) > 3:
            mask = args[3]
        self.shared["text_mask"] = mask
        return args, kwargs


class TextMaskShardHook(ModelHook):
    """On each HunyuanVideo block: replaces the attention mask with ``[video chunk (all kept), text chunk r]``."""

    def __init__(self, shared: dict[str, Any], rank: int):
        super().__init__()
        self.shared = shared
        self.rank = rank

    def pre_forward(self, module, hidden_states, encoder_hidden_states, temb, attention_mask=None, *args, **kwargs):
        text_mask = self.shared.get("text_mask")
        if attention_mask is not None and text_mask is not None:
            local_text = encoder_hidden_states.shape[1]
            text = text_mask[:, self.rank * local_text : (self.rank + 1) * local_text].to(torch.bool)
            video = torch.ones(text.shape[0], hidden_states.shape[1], dtype=torch.bool, device=text.device)
            attention_mask = torch.cat([video, text.to(video.device)], dim=1)[:, None, None, :]
        return (hidden_states, encoder_hidden_states, temb, attention_mask, *args), kwargs


def install_text_mask_sharding(transformer, rank: int):
    """Register the mask hooks on a HunyuanVideo transformer; returns a function that removes them."""
    shared: dict[str, Any] = {}
    undo = [install_hook(transformer, _TextMaskRecorder(shared), TEXT_MASK_HOOK_NAME)]
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        undo.append(install_hook(block, TextMaskShardHook(shared, rank), TEXT_MASK_HOOK_NAME))

    def remove():
        for step in reversed(undo):
            step()

    return remove


def context_parallel_plan(denoiser) -> dict | None:
    """The split plan for ``denoiser``: diffusers' own where it has one, accel's for HunyuanVideo."""
    if type(denoiser).__name__ == "HunyuanVideoTransformer3DModel":
        return HUNYUANVIDEO_CP_PLAN
    return getattr(denoiser, "_cp_plan", None)
