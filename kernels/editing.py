"""Pure-torch pieces of attention-driven image editing: Prompt-to-Prompt's blend mask and map transfer, Dynamic
Prompt Learning's leakage losses, and the k-means that finds the background from self-attention.

Maps follow `accel.kernels.controls`: cross-attention ``[B, h, w, T]`` (probabilities over the text tokens) and
word maps ``[B, C, h, w]`` (one per word: the sum or mean over its tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def transfer_cross_attention(
    source: torch.Tensor, edited: torch.Tensor, mapper: torch.Tensor, keep_source: torch.Tensor
) -> torch.Tensor:
    """Prompt-to-Prompt's cross-attention injection for one edited prompt.

    ``source`` / ``edited``: ``[..., T_src]`` / ``[..., T_tgt]`` probabilities; ``mapper``: ``[T_src, T_tgt]`` (each
    target token's column averages the source tokens aligned with it); ``keep_source``: ``[T_tgt]``, 1 where the
    target token takes the source's map, 0 where it keeps its own (words the edit adds).
    """
    transferred = source @ mapper.to(source)
    keep = keep_source.to(source)
    return keep * transferred + (1 - keep) * edited


def word_maps(maps: torch.Tensor, words: list[tuple[int, ...]]) -> torch.Tensor:
    """``[B, C, h, w]``: each word's map, the sum over its tokens' columns of ``maps`` (``[B, h, w, T]``)."""
    return torch.stack([maps[..., list(tokens)].sum(dim=-1) for tokens in words], dim=1)


def blend_mask(maps: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Prompt-to-Prompt's local-blend region from word maps ``[B, C, h, w]``: summed over the words, dilated by a
    3 x 3 max-pool (maps are coarse and objects' borders fall between tokens), resized to the latent ``size``,
    min-max scaled per row and thresholded. Returns ``[B, 1, *size]`` of 0 / 1.

    Prompt-to-Prompt scales by the maximum alone; on Stable Diffusion, whose word maps fall to about 0 away from the
    object, that is the same. A model whose attention keeps a floor everywhere (small models do: ``shapes-sd``'s maps
    vary by a factor of 2 across the image) would otherwise pass the threshold everywhere.
    """
    summed = maps.sum(dim=1, keepdim=True)
    dilated = F.max_pool2d(summed, kernel_size=3, stride=1, padding=1)
    resized = F.interpolate(dilated, size=size, mode="bilinear", align_corners=False).flatten(1)
    low, high = resized.amin(dim=1, keepdim=True), resized.amax(dim=1, keepdim=True)
    scaled = (resized - low) / (high - low).clamp_min(1e-12)
    return (scaled >= threshold).to(maps.dtype).view(maps.shape[0], 1, *size)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(-2), b.flatten(-2), dim=-1, eps=1e-8)


def disjoint_loss(maps: torch.Tensor) -> torch.Tensor:
    """``[B]``: DPL's disjoint-object loss, the mean cosine similarity of every pair of word maps (0 without pairs)."""
    count = maps.shape[1]
    pairs = [(m, n) for m in range(count) for n in range(m + 1, count)]
    if not pairs:
        return maps.new_zeros(maps.shape[0])
    return torch.stack([_cosine(maps[:, m], maps[:, n]) for m, n in pairs], dim=-1).mean(dim=-1)


def background_loss(maps: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``[B]``: DPL's background-leakage loss, each word map's mean cosine similarity with the background mask
    ``[B, h, w]`` (0 / 1)."""
    return _cosine(maps, background[:, None].to(maps)).mean(dim=-1)


def kmeans(features: torch.Tensor, clusters: int, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``features`` ``[N, F]`` (k-means++ seeding from a fixed seed); returns each
    row's cluster index ``[N]``."""
    generator = torch.Generator().manual_seed(seed)
    features = features.float().cpu()
    count = features.shape[0]
    clusters = min(clusters, count)
    first = int(torch.randint(count, (1,), generator=generator))
    centres = features[first : first + 1]
    while centres.shape[0] < clusters:
        nearest = torch.cdist(features, centres).amin(dim=1) ** 2
        if float(nearest.sum()) == 0:
            break
        pick = int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator))
        centres = torch.cat([centres, features[pick : pick + 1]])
    labels = torch.cdist(features, centres).argmin(dim=1)
    for _ in range(iterations):
        updated = torch.stack(
            [
                features[labels == c].mean(dim=0) if bool((labels == c).any()) else centres[c]
                for c in range(len(centres))
            ]
        )
        new_labels = torch.cdist(features, updated).argmin(dim=1)
        centres = updated
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def background_from_clusters(
    labels: torch.Tensor, grid: tuple[int, int], word_maps_mean: torch.Tensor, claim: float = 0.2
) -> torch.Tensor:
    """DPL's background: the clusters no word claims. A cluster belongs to the word whose min-max-normalised map has
    the highest mean over the cluster, if that mean exceeds ``claim``; the rest is background. Where every cluster
    is claimed the background is empty and DPL drops its background loss, as the reference does ("no BG maps
    offered"): the least claimed cluster would be part of an object (on ``shapes-sd``, 4 of the editing benchmark's
    32 images, each time on an object, twice the one being edited).

    ``labels``: ``[h * w]`` cluster index per token of ``grid``; ``word_maps_mean``: ``[C, h', w']`` (resized to
    ``grid``). Returns ``[h, w]`` of 0 / 1.
    """
    resized = F.interpolate(word_maps_mean[None].float(), size=grid, mode="bilinear", align_corners=False)[0]
    flat = resized.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    normalised = (flat - low) / (high - low + 1e-8)
    clusters = labels.unique()
    claims = torch.stack([normalised[:, labels == cluster].mean(dim=1).max() for cluster in clusters])
    return torch.isin(labels, clusters[claims <= claim]).float().view(grid)
