"""Structured Diffusion Guidance for Stable Diffusion pipelines: the noun-phrase value embeddings of each prompt.

accel wraps the pipeline's ``encode_prompt`` while patched: after the pipeline encodes a prompt, each of its noun
phrases is encoded on its own and spliced into a copy of the prompt embedding at the phrase's token positions; the
average of the prompt embedding and these copies is what the cross-attention values are projected from.
"""

from __future__ import annotations

import inspect

import torch

from accel.errors import InvalidOptionError
from accel.pipelines.prompts import NounPhrase, explicit_phrases, noun_phrases, prompt_words
from accel.processors.structured import StructuredValues


def aligned_values(
    prompt_embedding: torch.Tensor,
    phrases: list[NounPhrase],
    phrase_embeddings: list[torch.Tensor],
    word_tokens: list[tuple[int, ...]],
    phrase_offset: int,
) -> torch.Tensor:
    """``[1, T, D]``: the mean of the prompt embedding and, per phrase, a copy with the phrase's own encoding
    (``phrase_embeddings[i]``, ``[1, T, D]``, its tokens from ``phrase_offset``) written over the phrase's tokens."""
    copies = [prompt_embedding]
    for phrase, own in zip(phrases, phrase_embeddings, strict=True):
        first, last = phrase.words
        covered = [t for word in range(first, min(last, len(word_tokens))) for t in word_tokens[word]]
        if not covered:
            continue  # the phrase lies past the tokenizer's limit
        start, count = covered[0], len(covered)
        copy = prompt_embedding.clone()
        copy[:, start : start + count] = own[:, phrase_offset : phrase_offset + count]
        copies.append(copy)
    return torch.stack(copies).mean(dim=0)


def encode_prompt_wrapper(pipe, shared: StructuredValues, phrases_option: list[str] | None, parser: str):
    """The wrapper for ``pipe.encode_prompt`` (StableDiffusionPipeline's signature) that fills ``shared``."""

    def wrap(original):
        signature = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            out = original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            prompt = arguments["prompt"]
            if prompt is None:
                raise InvalidOptionError(
                    "structured guidance needs the prompt text to find its noun phrases; pass prompt=... instead of "
                    "prompt_embeds (or unpatch)"
                )
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            per_prompt = out[0].shape[0] // len(prompts)

            def encode_alone(text):
                return original(
                    text,
                    arguments["device"],
                    1,
                    False,
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
                values = aligned_values(embedding, phrases, own, [w.tokens for w in words], offset)
                rows.append(values.expand(per_prompt, -1, -1))
            shared.prompt_embeds = out[0]
            shared.values = torch.cat(rows)
            return out

        return encode_prompt

    return wrap
