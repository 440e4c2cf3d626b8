"""Structured Diffusion Guidance's cross-attention: keys from the prompt, values from its noun phrases.

The attention map is the prompt's own (one key sequence); the values average the prompt embedding with one copy per
noun phrase in which the phrase's tokens are replaced by the phrase encoded on its own. Since ``to_v`` is linear,
averaging the embeddings before one projection equals averaging the n + 1 value products of the reference code.
Only the conditional half of a classifier-free-guidance batch is changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import logging

from accel.processors.dense import DenseAttnProcessor

logger = logging.get_logger(__name__)


@dataclass
class StructuredValues:
    """Shared by a patch's processors: the last prompt embeddings the pipeline encoded and their value embeddings."""

    prompt_embeds: torch.Tensor | None = None
    values: torch.Tensor | None = None
    warned_unmatched: bool = False


class StructuredAttnProcessor(DenseAttnProcessor):
    """A UNet cross-attention layer whose values come from `StructuredValues` when the call's text matches."""

    def __init__(self, context, layer: str, shared: StructuredValues):
        super().__init__(context=context, layer=layer)
        self.shared = shared

    def _value_context(self, context: torch.Tensor, is_cross: bool) -> torch.Tensor:
        prompt_embeds, values = self.shared.prompt_embeds, self.shared.values
        if not is_cross:
            return context
        batch = 0 if prompt_embeds is None else prompt_embeds.shape[0]
        conditional = context[-batch:]
        if (
            not batch
            or (self.context is not None and self.context.foreign_call)
            or conditional.shape != prompt_embeds.shape
            or not torch.equal(conditional, prompt_embeds.to(context))
        ):
            # Not its pipeline's call, or not the text it encoded: exact attention, and the user is told once.
            if not self.shared.warned_unmatched:
                logger.warning(
                    "structured: the UNet was called by another pipeline sharing it (e.g. one made with from_pipe) "
                    "or with text embeddings its patched pipeline did not encode (a direct call), so its values are "
                    "the prompt's own; patch the pipeline you call"
                )
                self.shared.warned_unmatched = True
            return context
        if context.shape[0] == batch:
            return values.to(context)
        return torch.cat([context[:-batch], values.to(context)])

    def __repr__(self) -> str:
        return f"StructuredAttnProcessor(layer={self.layer!r})"
