"""Structured Diffusion Guidance's cross-attention: keys from the prompt, values from its noun phrases.

The attention map is the prompt's own (one key sequence); the values average the prompt embedding with one copy per
noun phrase in which the phrase's tokens are replaced by the phrase encoded on its own. Since ``to_v`` is linear,
averaging the embeddings before one projection equals averaging the n + 1 value products of the reference code.
Only the conditional half of a classifier-free-guidance batch is changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.processors.dense import DenseAttnProcessor


@dataclass
class StructuredValues:
    """Shared by a patch's processors: the last prompt embeddings the pipeline encoded and their value embeddings."""

    prompt_embeds: torch.Tensor | None = None
    values: torch.Tensor | None = None


class StructuredAttnProcessor(DenseAttnProcessor):
    """A UNet cross-attention layer whose values come from `StructuredValues` when the call's text matches."""

    def __init__(self, context, layer: str, shared: StructuredValues):
        super().__init__(context=context, layer=layer)
        self.shared = shared

    def _value_context(self, context: torch.Tensor, is_cross: bool) -> torch.Tensor:
        prompt_embeds, values = self.shared.prompt_embeds, self.shared.values
        if not is_cross or prompt_embeds is None:
            return context
        batch = prompt_embeds.shape[0]
        conditional = context[-batch:]
        if conditional.shape != prompt_embeds.shape or not torch.equal(conditional, prompt_embeds.to(context)):
            return context  # not this prompt's text (another call, another prompt): exact attention
        if context.shape[0] == batch:
            return values.to(context)
        return torch.cat([context[:-batch], values.to(context)])

    def __repr__(self) -> str:
        return f"StructuredAttnProcessor(layer={self.layer!r})"
