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

# Scratch key of the call's ((text input, encoded prompt, foreign call), whether the two match), shared by the layers.
_MATCH_KEY = "structured text match"


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

    def prepare_step(self, device: torch.device, inputs: dict) -> None:
        """Compare the call's text with the encoded prompt once per call, before the denoiser runs (called by the step
        hook, outside any compiled graph, which then reads a boolean instead of comparing tensors in every layer)."""
        text = inputs.get("encoder_hidden_states")
        if not isinstance(text, torch.Tensor):
            return
        # The patch's first layer compares; the others find the same call's facts and take its answer.
        facts = (text, self.shared.prompt_embeds, self.context.foreign_call)
        decided = self.context.scratch.get(_MATCH_KEY)
        if decided is None or any(old is not new for old, new in zip(decided[0], facts, strict=True)):
            self.context.scratch[_MATCH_KEY] = (facts, self._text_matches(text))

    def _text_matches(self, context: torch.Tensor) -> bool:
        prompt_embeds = self.shared.prompt_embeds
        batch = 0 if prompt_embeds is None else prompt_embeds.shape[0]
        conditional = context[-batch:]
        return bool(
            batch
            and not (self.context is not None and self.context.foreign_call)
            and conditional.shape == prompt_embeds.shape
            and torch.equal(conditional, prompt_embeds.to(context))
        )

    def _value_context(self, context: torch.Tensor, is_cross: bool) -> torch.Tensor:
        prompt_embeds, values = self.shared.prompt_embeds, self.shared.values
        if not is_cross:
            return context
        batch = 0 if prompt_embeds is None else prompt_embeds.shape[0]
        decided = self.context.scratch.get(_MATCH_KEY) if self.context is not None else None
        # The step hook compared the denoiser's text input; a layer that receives other text compares its own.
        matches = decided[1] if decided is not None and decided[0][0] is context else self._text_matches(context)
        if not matches:
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
