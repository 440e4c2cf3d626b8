"""Readable pure-PyTorch attention that every accel kernel is tested against.

Tensors are ``[B, S, H, D]`` (heads last, as diffusers' dispatcher and flash-attention use). No diffusers import.
"""

from __future__ import annotations

import torch


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Softmax attention written out with einsum.

    Args:
        query: ``[B, S_q, H, D]``.
        key, value: ``[B, S_k, H, D]`` (``value`` may have its own last dim).
        attn_mask: broadcastable to ``[B, H, S_q, S_k]``; boolean (True = attend) or additive float.
        scale: softmax scale, ``1 / sqrt(D)`` by default.
        upcast: compute in fp32 (the "truth" for kernel tests); ``False`` keeps the input dtype, which measures the
            error PyTorch itself makes at that precision (flash-attention's test bound is relative to it).

    Returns:
        ``[B, S_q, H, D_v]`` in the input dtype. Rows whose keys are all masked give zeros, not NaN.
    """
    dtype = query.dtype
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", query * scale, key)
    masked_rows = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
            masked_rows = ~attn_mask.any(dim=-1, keepdim=True)
        else:
            scores = scores + attn_mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    if masked_rows is not None:
        probs = probs.masked_fill(masked_rows, 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, value).to(dtype)


def gradients_tracked(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records this call (latent guidance differentiating through attention)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention_with_lse(query, key, value, mask=None, key_padding=None):
    """``[N, H, Sq, Dv]`` attention and its ``[N, H, Sq]`` fp32 log-sum-exp, for merging partial results exactly.

    Tensors are ``[N, H, S, D]``. ``mask`` is additive (``-inf`` = not attended), broadcastable to the scores, and
    must leave every row a key. ``key_padding`` is ``[N, Sk]`` booleans (False = padding) and may leave a sample
    none: its rows come back as output 0 and lse ``-inf``, so they weigh nothing in a merge, with finite gradients.
    A fused kernel on CPU; written out elsewhere and wherever gradients are tracked, where it keeps fp32 scores for
    the backward pass: callers under autograd bound how many (GNA recomputes one tile row at a time).
    """
    if key_padding is not None:
        # A sample without keys attends its padding here and is zeroed below: masking all of its keys made its rows'
        # log-sum-exp -inf and, under autograd, every gradient that reached them NaN.
        attended = key_padding.to(torch.bool)
        attended = attended | ~attended.any(dim=-1, keepdim=True)
        mask = torch.zeros(key_padding.shape[0], 1, 1, key_padding.shape[1], dtype=query.dtype, device=query.device)
        mask.masked_fill_(~attended[:, None, None, :], float("-inf"))
    # The fused kernel's autograd treats its lse as a constant, and merges differentiate through it: under autograd
    # (latent guidance composed with a sparse method) the written-out form runs instead.
    if query.device.type == "cpu" and not gradients_tracked(query, key, value):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask
        )
    else:
        scores = (query.float() @ key.float().transpose(-1, -2)) * query.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask.float()
        lse = torch.logsumexp(scores, dim=-1)
        out = (torch.exp(scores - lse[..., None]) @ value.float()).to(query.dtype)
    if key_padding is not None:
        empty = ~key_padding.to(torch.bool).any(dim=-1)
        if bool(empty.any()):
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
            out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse
