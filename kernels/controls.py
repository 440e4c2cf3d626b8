"""The losses of the cross-attention controls, on aggregated cross-attention maps (pure torch, differentiable).

Maps are ``[B, h, w, T]`` probabilities over the T text tokens (head- and layer-averaged): a UNet's
cross-attention probabilities, or on joint attention (FLUX) the visual-query x text-key logits renormalised over the
prompt's tokens (`text_token_maps`). Concept maps are ``[B, C, h, w]``: one per concept (subject word), the mean
over the word's tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def concept_maps(
    maps: torch.Tensor,
    positions: list[tuple[int, ...]],
    prompt_tokens: int | tuple[int, int],
    sharpness: float = 100.0,
) -> torch.Tensor:
    """Attend-and-Excite's per-pixel token softmax (``sharpness`` x the probabilities of the prompt's own tokens,
    BOS, EOS and padding left out), then each concept's map as the mean over its tokens.

    ``prompt_tokens``: the span ``(first, end)`` of the prompt's own tokens in the text sequence (T5 has no BOS: its
    prompt starts at 0); an int ``n`` is CLIP's span ``(1, n)`` (BOS at 0, EOS at ``n``). ``positions`` are
    positions in the text sequence and must lie in the span.
    """
    first, end = (1, prompt_tokens) if isinstance(prompt_tokens, int) else prompt_tokens
    outside = sorted({p for tokens in positions for p in tokens if not first <= p < end})
    if outside:
        raise ValueError(f"token positions {outside} lie outside the prompt's own tokens {first}..{end - 1}")
    text = maps[..., first:end]
    weights = torch.softmax(sharpness * text, dim=-1)
    columns = [weights[..., [p - first for p in tokens]].mean(dim=-1) for tokens in positions]
    return torch.stack(columns, dim=1)


def text_token_maps(
    visual_query: torch.Tensor, text_key: torch.Tensor, text_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, V, T]``: the visual queries' attention over the text keys alone, head-averaged (LORE's maps on joint
    attention).

    The logits ``q · kᵀ / √d`` of the visual-query x text-key block are softmax-normalised over the text tokens only
    (in a joint softmax a pixel's text share is small and varies with its image self-attention mass), in float32.
    ``visual_query`` is ``[B, V, H, D]``, ``text_key`` ``[B, T, H, D]``; ``text_keep`` (``[B, T]`` booleans) limits
    the softmax to the kept tokens (the prompt's own tokens), the others get probability 0.
    """
    q, k = visual_query.float().transpose(1, 2), text_key.float().transpose(1, 2)  # [B, H, S, D]
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if text_keep is not None:
        logits = logits.masked_fill(~text_keep[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def gaussian_smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """``[B, C, h, w]`` smoothed per map with a normalised Gaussian (reflect padding at the borders; a side too
    short to reflect, as at tiny image sizes, repeats its edge)."""
    offsets = torch.arange(size, dtype=maps.dtype, device=maps.device) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (line[:, None] * line[None, :]) / (line.sum() ** 2)
    channels = maps.shape[1]
    padded = F.pad(maps, (size // 2,) * 4, mode="reflect" if min(maps.shape[-2:]) > size // 2 else "replicate")
    return F.conv2d(padded, kernel.expand(channels, 1, size, size), groups=channels)


def attend_excite_loss(concepts: torch.Tensor) -> torch.Tensor:
    """``[B]``: the most neglected concept's shortfall, ``max_c (1 - max_ij smoothed map_c)``."""
    peaks = gaussian_smooth(concepts).flatten(2).amax(dim=-1)  # [B, C]
    return (1 - peaks).clamp_min(0).amax(dim=-1)


def segregation_maps(concepts: torch.Tensor) -> torch.Tensor:
    """A-STAR's maps for its overlaps: each concept map smoothed with A&E's kernel, then min-max scaled."""
    return normalise(gaussian_smooth(concepts))


def normalise(concepts: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each map min-max scaled to [0, 1], so that soft overlaps compare shapes, not magnitudes."""
    flat = concepts.flatten(2)
    low, high = flat.amin(dim=-1, keepdim=True), flat.amax(dim=-1, keepdim=True)
    return ((flat - low) / (high - low + eps)).view_as(concepts)


def soft_overlap(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """A-STAR's overlap ratio ``Σ min(a, b) / Σ (a + b)`` over the last two axes (0.5 for equal maps, 0 for
    disjoint ones)."""
    return torch.minimum(a, b).sum(dim=(-2, -1)) / ((a + b).sum(dim=(-2, -1)) + eps)


def segregation_loss(concepts: torch.Tensor) -> torch.Tensor:
    """``[B]``: A-STAR's segregation loss, the soft overlap summed over unordered concept pairs."""
    count = concepts.shape[1]
    if count < 2:
        return concepts.new_zeros(concepts.shape[0])
    pairs = [(m, n) for m in range(count) for n in range(m + 1, count)]
    return sum(soft_overlap(concepts[:, m], concepts[:, n]) for m, n in pairs)


def binarise(maps: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """A-STAR's retained regions: where each of `segregation_maps` is at least ``threshold`` (no gradient)."""
    return (maps.detach() >= threshold).to(maps.dtype)


def retention_loss(concepts: torch.Tensor, previous_regions: torch.Tensor) -> torch.Tensor:
    """``[B]``: A-STAR's retention loss, ``Σ_c 1 - overlap(map_c, region_c of the previous step)``."""
    return (1 - soft_overlap(concepts, previous_regions)).sum(dim=-1)


def step_size(scale: float, progress: float) -> float:
    """Attend-and-Excite's decaying step, ``scale · sqrt(1 - progress / 2)``, at ``progress`` (step index / steps).

    A&E writes it as ``sqrt(linspace(1, 0.5, T))``, index over ``T - 1``; by the schedule's progress it holds under
    img2img ``strength`` (the schedule entered late) and any step count, and ends at ``1 - (T - 1) / 2T`` rather than
    0.5.
    """
    return scale * math.sqrt(1 - 0.5 * progress)
