"""accel's joint (FLUX / HunyuanVideo) attention under diffusers' Ulysses context parallelism.

With ``ContextParallelConfig(ulysses_degree=P)`` each rank holds a contiguous 1/P of the text tokens and of the visual
tokens, and diffusers' Ulysses attention exchanges them for all the tokens of 1/P of the heads. A sparse method needs
the same: the whole token grid of a head. So the exchange is diffusers' own (``_all_to_all_dim_exchange``, the helper
its Ulysses attention is built on); accel adds only the layout fact that the exchange leaves the sequence as rank
chunks ``[text_0, visual_0, text_1, visual_1, ...]`` (FLUX's order; HunyuanVideo's has visual first), which is put
back in model order ``[text, visual]`` before the method runs and undone after. Every method then runs unchanged on
its heads: nothing in a sparse pattern crosses heads.

Ring attention splits the keys, which block / window selection needs whole, so it is refused with the fix named.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from accel.errors import AccelError


class UnsupportedParallelismError(AccelError):
    """A parallel layout accel's sparse attention cannot run under."""


def sequence_shards(parallel_config) -> int:
    """How many ranks share the sequence (diffusers splits it over the flattened ring x Ulysses mesh); 1 when off."""
    context = getattr(parallel_config, "context_parallel_config", None)
    if context is None:
        return 1
    return (context.ring_degree or 1) * (context.ulysses_degree or 1)


def ulysses_group(parallel_config, method: str):
    """``(process group, degree, rank)`` of Ulysses context parallelism, or ``None`` when it is off."""
    context = getattr(parallel_config, "context_parallel_config", None)
    if context is None:
        return None
    if (context.ring_degree or 1) > 1:
        raise UnsupportedParallelismError(
            f"{method}: ring attention (ring_degree={context.ring_degree}) splits the keys across ranks, and sparse "
            "attention needs each head's keys whole; use ContextParallelConfig(ulysses_degree=N) instead"
        )
    degree = context.ulysses_degree or 1
    if degree == 1:
        return None
    mesh = context._ulysses_mesh
    return mesh.get_group(), degree, mesh.get_local_rank()


def model_order(call, degree: int, device: torch.device) -> torch.Tensor:
    """Indices turning the rank-chunked sequence after the exchange into the model's full joint order."""
    return _orders(call.text_tokens, call.visual_tokens, call.text_first, degree, torch.device(device))[0]


@functools.lru_cache(maxsize=32)
def _orders(text_tokens: int, visual_tokens: int, text_first: bool, degree: int, device: torch.device):
    """``(order, its inverse)``, once per layout: every joint layer of every step uses the same pair."""
    local = text_tokens + visual_tokens
    starts = torch.arange(degree, device=device)[:, None] * local
    text = torch.arange(text_tokens, device=device)
    visual = torch.arange(visual_tokens, device=device)
    if text_first:
        parts = [starts + text, starts + text_tokens + visual]
    else:
        parts = [starts + visual, starts + visual_tokens + text]
    order = torch.cat([part.flatten() for part in parts])
    return order, torch.argsort(order)


def ulysses_attend(processor, query, key, value, attention_mask, call, group, degree: int):
    """``processor.attend`` over the whole sequence for this rank's heads; returns this rank's tokens, all heads."""
    from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

    heads = query.shape[2]
    if heads % degree:
        raise UnsupportedParallelismError(
            f"{processor.method or 'accel'}: {processor.layer} has {heads} heads, which ulysses_degree={degree} does "
            "not divide; choose a degree that divides the head count"
        )
    local_keys = key.shape[1]
    # [B, S/P, H, D] -> [B, S, H/P, D], rank chunks in order.
    query, key, value = (_all_to_all_dim_exchange(x.contiguous(), 2, 1, group) for x in (query, key, value))
    order, inverse = _orders(call.text_tokens, call.visual_tokens, call.text_first, degree, query.device)
    query, key, value = (x[:, order] for x in (query, key, value))
    if attention_mask is not None and attention_mask.shape[-1] == local_keys:
        # A per-rank key mask is gathered like the keys and put in the same order.
        parts = [torch.empty_like(attention_mask) for _ in range(degree)]
        torch.distributed.all_gather(parts, attention_mask.contiguous(), group=group)
        attention_mask = torch.cat(parts, dim=-1)[..., order]
    whole = dataclasses.replace(call, visual_tokens=call.visual_tokens * degree, text_tokens=call.text_tokens * degree)
    # The method's own dense parts (text queries, dense steps) must not exchange again: the processor runs as on one
    # device for the length of this call.
    parallel_config = processor._parallel_config
    processor._parallel_config = None
    try:
        out = processor.attend(query, key, value, attention_mask, whole)
    finally:
        processor._parallel_config = parallel_config
    out = out[:, inverse].contiguous()
    return _all_to_all_dim_exchange(out, 1, 2, group)
