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
