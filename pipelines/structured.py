"""Structured Diffusion Guidance for SD and FLUX pipelines: the noun-phrase value embeddings of each prompt.

accel wraps the pipeline's ``encode_prompt`` while patched: after the pipeline encodes a prompt, each of its noun
phrases is encoded on its own and spliced into a copy of the prompt embedding at the phrase's token positions; the
average of the prompt embedding and these copies is what the values are projected from.

- SD 1.x / 2.x: every cross-attention layer keeps the prompt's keys and projects its values from the average
  (`accel.processors.structured`), on the conditional half of classifier-free guidance.
- FLUX has no cross-attention: its text tokens form a stream that every double block rewrites, so only the first
  block sees the encoder's embeddings. The average (of T5 embeddings, phrases encoded alone by T5) replaces the
  prompt's ``encoder_hidden_states`` at the transformer's input (`StructuredTextHook`); the context embedder is
  linear, so that is one projection of the averaged embeddings, and every block's text keys and values follow from
  it. A true-CFG negative call (diffusers' ``"uncond"`` cache context) is left alone.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks import ModelHook
from diffusers.utils import logging

from accel.errors import InvalidOptionError
from accel.pipelines.controls import CacheContextName, PromptEncoding, RecentEncodings
from accel.pipelines.hooks import EAGER_HOOK_REASON, STEP_HOOK_NAME
from accel.pipelines.prompts import (
    NounPhrase,
    explicit_phrases,
    noun_phrases,
    observe_encode_prompt,
    prompt_words,
    token_count,
)
from accel.processors.state import PatchContext
from accel.processors.structured import StructuredValues

logger = logging.get_logger(__name__)

TEXT_HOOK_NAME = "accel_structured_text"


def aligned_values(
    prompt_embedding: torch.Tensor,
    phrases: list[NounPhrase],
    phrase_embeddings: list[torch.Tensor],
    word_tokens: list[tuple[int, ...]],
    phrase_offset: int,
    phrase_token_counts: list[int],
    explicit: bool = False,
) -> torch.Tensor:
    """``[1, T, D]``: the mean of the prompt embedding and, per phrase, a copy with the phrase's own encoding
    (``phrase_embeddings[i]``, ``[1, T, D]``, its ``phrase_token_counts[i]`` tokens from ``phrase_offset``) written
    over the phrase's tokens. A phrase past the encoder's limit is skipped, or refused when the user named it
    (``explicit``)."""
    copies = [prompt_embedding]
    for phrase, own, own_count in zip(phrases, phrase_embeddings, phrase_token_counts, strict=True):
        first, last = phrase.words
        covered = [t for word in range(first, min(last, len(word_tokens))) for t in word_tokens[word]]
        if not covered:
            if explicit:
                raise InvalidOptionError(
                    f"structured: the noun phrase {phrase.text!r} lies past the {len(word_tokens)} words the text "
                    "encoder reads of this prompt; shorten the prompt or leave the phrase out"
                )
            continue
        # The phrase's text may drop punctuation its words carry in the prompt ("a red circle," -> "a red circle"):
        # only its own tokens are written, never its EOS over the comma.
        start, count = covered[0], min(len(covered), own_count)
        copy = prompt_embedding.clone()
        copy[:, start : start + count] = own[:, phrase_offset : phrase_offset + count]
        copies.append(copy)
    return torch.stack(copies).mean(dim=0)


def encode_prompt_wrapper(pipe, shared: StructuredValues, phrases_option: list[str] | None, parser: str):
    """The wrapper for ``pipe.encode_prompt`` (StableDiffusionPipeline's signature) that fills ``shared``."""

    def observe(out, arguments, original):
        prompt = arguments["prompt"]
        if prompt is None:
            raise InvalidOptionError(
                "structured guidance needs the prompt text to find its noun phrases; pass prompt=... instead of "
                "prompt_embeds (or unpatch)"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = out[0].shape[0] // len(prompts)

        second = arguments.get("prompt_2")
        if second is not None and second != prompt:
            raise InvalidOptionError(
                "structured guidance on SDXL needs both text encoders to read the same text (the phrases are "
                "spliced in token by token); leave prompt_2 unset (or equal to prompt)"
            )

        def encode_alone(text):
            # By keyword: SD's and SDXL's encode_prompt order their arguments differently.
            return original(
                prompt=text,
                device=arguments["device"],
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                lora_scale=arguments.get("lora_scale"),
                clip_skip=arguments.get("clip_skip"),
            )[0]

        rows = []
        for index, text in enumerate(prompts):
            embedding = out[0][index * per_prompt : index * per_prompt + 1]
            phrases = explicit_phrases(text, phrases_option) if phrases_option else noun_phrases(text, parser)
            words = prompt_words(pipe.tokenizer, text)
            whole = len(text.split())
            # A phrase that is the whole prompt encodes to the prompt itself: its copy is the embedding.
            own = [embedding if p.words == (0, whole) else encode_alone(p.text) for p in phrases]
            offset = 1 if pipe.tokenizer.bos_token_id is not None else 0
            counts = [token_count(pipe.tokenizer, p.text) for p in phrases]
            values = aligned_values(
                embedding, phrases, own, [w.tokens for w in words], offset, counts, bool(phrases_option)
            )
            rows.append(values.expand(per_prompt, -1, -1))
        shared.prompt_embeds = out[0]
        shared.values = torch.cat(rows)

    return observe_encode_prompt(observe)


def flux_encode_prompt_wrapper(pipe, encodings: RecentEncodings, phrases_option: list[str] | None, parser: str):
    """The wrapper for ``FluxPipeline.encode_prompt``: records each encoding with its structured T5 embeddings.

    Errors (no prompt text, a phrase not in the prompt) are raised when the transformer is called with these
    embeddings, not here: FLUX encodes a true-CFG negative prompt through the same function.
    """

    def observe(out, arguments, original):
        prompt = arguments["prompt_2"] if arguments.get("prompt_2") is not None else arguments["prompt"]
        if prompt is None:
            error = InvalidOptionError(
                "structured guidance needs the prompt text to find its noun phrases; pass prompt=... instead of "
                "prompt_embeds (or unpatch)"
            )
            encodings.add(PromptEncoding(out[0], error=error))
            return
        max_length = arguments["max_sequence_length"]

        def encode_alone(text):
            return original(
                prompt=text,
                device=arguments["device"],
                num_images_per_prompt=1,
                max_sequence_length=max_length,
                lora_scale=arguments.get("lora_scale"),
            )[0]

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = out[0].shape[0] // len(prompts)
        rows = []
        try:
            for index, text in enumerate(prompts):
                embedding = out[0][index * per_prompt : index * per_prompt + 1]
                phrases = explicit_phrases(text, phrases_option) if phrases_option else noun_phrases(text, parser)
                words = prompt_words(pipe.tokenizer_2, text, max_length)
                whole = len(text.split())
                own = [embedding if p.words == (0, whole) else encode_alone(p.text) for p in phrases]
                # T5 has no BOS: a phrase encoded alone starts at token 0.
                counts = [token_count(pipe.tokenizer_2, p.text) for p in phrases]
                values = aligned_values(
                    embedding, phrases, own, [w.tokens for w in words], 0, counts, bool(phrases_option)
                )
                rows.append(values.expand(per_prompt, -1, -1))
        except InvalidOptionError as error:
            encodings.add(PromptEncoding(out[0], error=error))
        else:
            encodings.add(PromptEncoding(out[0], data=torch.cat(rows)))

    return observe_encode_prompt(observe)


class StructuredTextHook(ModelHook):
    """On the FLUX transformer: the prompt's ``encoder_hidden_states`` replaced by their structured average."""

    # Stateful so that diffusers hands it the cache context (the name of a true-CFG negative call).
    _is_stateful = True

    def __init__(self, encodings: RecentEncodings, context: PatchContext):
        super().__init__()
        self.encodings = encodings
        self.context = context
        self.call_name = CacheContextName()
        self._warned_unmatched = False

    def initialize_hook(self, module):
        self._signature = inspect.signature(module.forward)
        return module

    def reset_state(self, module):
        return module

    # Eager under torch.compile (one graph break before the transformer's body): matching the prompt compares tensors.
    @torch.compiler.disable(reason=EAGER_HOOK_REASON)
    def pre_forward(self, module, *args, **kwargs):
        if self.call_name.name == "uncond":
            return args, kwargs
        bound = self._signature.bind(*args, **kwargs)
        text = bound.arguments.get("encoder_hidden_states")
        # accel's step hook sits inside this one; let it tell whose call this is first.
        step_hook = module._diffusers_hook.get_hook(STEP_HOOK_NAME)
        if step_hook is not None:
            step_hook.pre_forward(module, *args, **kwargs)
        matched = None if self.context.foreign_call else self.encodings.match(text)
        if matched is None:
            # Not its pipeline's call, or not a prompt it encoded: left as it is, and the user is told once.
            if text is not None and not self._warned_unmatched:
                logger.warning(
                    "structured: the transformer was called by another pipeline sharing it (e.g. one made with "
                    "from_pipe) or with text embeddings its patched pipeline did not encode (a direct call), so "
                    "they are the prompt's own; patch the pipeline you call"
                )
                self._warned_unmatched = True
            return args, kwargs
        encoding, guidance_batch = matched
        if encoding.error is not None:
            raise encoding.error
        values = encoding.data.to(text)
        if guidance_batch:
            values = torch.cat([text[: -values.shape[0]], values])
        bound.arguments["encoder_hidden_states"] = values
        return bound.args, bound.kwargs
