"""Agent attention and the token reductions around it (AgentSD's token merging, plain grid pooling).

Agent attention (Han et al., ECCV 2024) routes attention through ``n`` agent tokens pooled from the queries:

    agent_values = softmax(A Kᵀ · scale) V                      (the agents aggregate, n x N)
    out          = softmax(Q Aᵀ · agent_scale) agent_values + shortcut · V    (the queries broadcast, N x n)

with AgentSD's ``agent_scale = scale ** scale_exponent`` (0.3: d^-0.15, sharper than the first softmax) and
``shortcut`` 0.075. Both products run on SDPA, so nothing of size ``N x N`` or ``N x n`` is ever materialised.

Token merging (ToMe, as AgentSD uses it) splits the grid into cells with one "destination" token each, matches every
other token to its most similar destination (cosine) and averages the best-matched ones into their destinations.
The same matching, taken further, gives AgentSD's agents: each destination averaged with every token that chose it.
The similarity is computed in chunks of source tokens, so its memory stays linear in the number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Similarity entries computed at once per token of the call (source rows x destinations <= this x tokens): the
# matching's extra memory stays linear in the tokens, about as much as 32 channels of them.
_SIMILARITY_PER_TOKEN = 32


def agent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float,
    agent_scale: float,
    shortcut: float,
    extra_key: torch.Tensor | None = None,
    extra_value: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    agent_log_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Agent attention on ``[B, S, H, D]`` tensors (``agents``: ``[B, n, H, D]``); returns ``[B, S_q, H, D]``.

    ``extra_key`` / ``extra_value`` (``[B, T, H, D]``, e.g. text tokens) join the agents in the second softmax with
    the first softmax's ``scale``, as exact keys; ``extra_mask`` (``[B, T]`` booleans) drops padded ones.
    ``agent_log_counts`` (``[n]``) adds ``log(tokens an agent stands for)`` to its logits, so the agents weigh as
    much against the extra keys as the tokens they pool (it cancels in a softmax over agents alone).
    """
    q, k, v, a = (t.transpose(1, 2) for t in (query, key, value, agents))
    agent_values = F.scaled_dot_product_attention(a, k, v, scale=scale)
    if extra_key is None and agent_log_counts is None:
        out = F.scaled_dot_product_attention(q, a, agent_values, scale=agent_scale)
    else:
        # One softmax over agents and extra keys: the agents are rescaled so that a single ``scale`` gives each
        # side its own temperature, and their log counts / the padding enter as an additive bias.
        keys, values = a * (agent_scale / scale), agent_values
        bias = torch.zeros(a.shape[0], a.shape[2], dtype=q.dtype, device=q.device)
        if agent_log_counts is not None:
            bias = bias + agent_log_counts.to(q.dtype)
        if extra_key is not None:
            keys = torch.cat([keys, extra_key.transpose(1, 2)], dim=2)
            values = torch.cat([values, extra_value.transpose(1, 2)], dim=2)
            extra_bias = torch.zeros(extra_key.shape[0], extra_key.shape[1], dtype=q.dtype, device=q.device)
            if extra_mask is not None:
                extra_bias = extra_bias.masked_fill(~extra_mask, float("-inf"))
            bias = torch.cat([bias, extra_bias.expand(a.shape[0], -1)], dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias[:, None, None, :], scale=scale)
    return (out + shortcut * v).transpose(1, 2)


def agent_attention_reference(
    query,
    key,
    value,
    agents,
    *,
    scale,
    agent_scale,
    shortcut,
    extra_key=None,
    extra_value=None,
    extra_mask=None,
    agent_log_counts=None,
) -> torch.Tensor:
    """The same product written out in fp32 with explicit score matrices: the truth for small tests."""
    q, k, v, a = (t.float().transpose(1, 2) for t in (query, key, value, agents))
    agent_values = torch.softmax(a @ k.transpose(-1, -2) * scale, dim=-1) @ v
    logits = q @ a.transpose(-1, -2) * agent_scale
    if agent_log_counts is not None:
        logits = logits + agent_log_counts.float()
    values = agent_values
    if extra_key is not None:
        text_logits = q @ extra_key.float().transpose(1, 2).transpose(-1, -2) * scale
        if extra_mask is not None:
            text_logits = text_logits.masked_fill(~extra_mask[:, None, None, :], float("-inf"))
        logits = torch.cat([logits, text_logits], dim=-1)
        values = torch.cat([agent_values, extra_value.float().transpose(1, 2)], dim=2)
    out = torch.softmax(logits, dim=-1) @ values + shortcut * v
    return out.transpose(1, 2)


def pooled_grid(grid: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    """Grid of about ``ratio * prod(grid)`` agents: every axis shrunk by the same factor where it can be.

    Sides are settled one at a time, the most shrunk first, and the rest shrink by what is still to go: an axis that
    cannot go below one agent (a video's few latent frames) keeps one and the others take its share, and a side's
    rounding is made up by the next, so the ratio holds.
    """
    pooled = list(grid)
    left = ratio * math.prod(grid)
    free = list(range(len(grid)))
    while free:
        factor = (left / math.prod([grid[axis] for axis in free])) ** (1.0 / len(free))
        axis = min(free, key=lambda a: (grid[a] * factor, a))
        pooled[axis] = max(1, min(grid[axis], math.floor(grid[axis] * factor + 0.5)))
        left /= pooled[axis]
        free.remove(axis)
    return tuple(pooled)


def grid_pool(tokens: torch.Tensor, grid: tuple[int, ...], pooled: tuple[int, ...]):
    """Average ``[B, N, ...]`` tokens laid out on ``grid`` over the cells of ``pooled`` (adaptive pooling).

    Returns the ``[B, n, ...]`` pooled tokens and ``[n]`` log counts of the tokens each one averages.
    """
    batch, trailing = tokens.shape[0], tokens.shape[2:]
    channels = math.prod(trailing)
    spatial = tokens.reshape(batch, *grid, channels).movedim(-1, 1)
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(grid) - 1]
    pooled_tokens = pool(spatial, pooled).movedim(1, -1).reshape(batch, -1, *trailing)
    counts = None
    for side, out in zip(grid, pooled, strict=True):
        # Adaptive pooling's cells: [floor(i L / n), ceil((i + 1) L / n)).
        index = torch.arange(out)
        sizes = (-((-(index + 1) * side) // out)) - (index * side) // out
        counts = sizes if counts is None else (counts[..., None] * sizes)
    return pooled_tokens, counts.flatten().double().log().to(torch.float32)


def destination_mask(
    grid: tuple[int, ...], cell: tuple[int, ...], draws: torch.Tensor | torch.Generator | None
) -> torch.Tensor:
    """``[N]`` booleans: one destination token per whole ``cell`` of the grid (random within it, or its first).

    ``draws``: each cell's destination as an offset into the cell (row-major), for the whole cells in row-major
    order; a longer tensor is read from its start (one draw serves every level of a UNet). A generator draws them;
    ``None`` takes every cell's first token. Tokens of the partial cells at the far borders are all sources, as in
    ToMe.
    """
    counts = [side // size for side, size in zip(grid, cell, strict=True)]
    cell_volume = math.prod(cell)
    if draws is None:
        choice = torch.zeros(counts, dtype=torch.long)
    elif isinstance(draws, torch.Generator):
        choice = torch.randint(cell_volume, counts, generator=draws)
    else:
        choice = draws[: math.prod(counts)].reshape(counts)
    offsets = torch.stack(torch.unravel_index(choice, cell), dim=-1)  # [*counts, ndim]
    axes = [torch.arange(count, device=choice.device) * size for count, size in zip(counts, cell, strict=True)]
    starts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    coords = (starts + offsets).reshape(-1, len(grid))
    mask = torch.zeros(grid, dtype=torch.bool, device=choice.device)
    mask[tuple(coords.unbind(-1))] = True
    return mask.flatten()


def destination_split(is_dst: torch.Tensor, cell_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dst_index, src_index)``: the positions of ``is_dst``'s ``cell_count`` destinations and of its sources, each
    in increasing order. A stable sort instead of ``nonzero``, so the sizes are known without reading the mask
    (under torch.compile, a graph of fixed shapes)."""
    order = torch.argsort((~is_dst).to(torch.int8), stable=True)
    return order[:cell_count], order[cell_count:]


@dataclass
class TokenMerge:
    """A bipartite matching of one call's tokens: merges them to fewer and spreads results back.

    Attributes:
        src_index, dst_index: ``[N_src]`` / ``[N_dst]`` positions of source and destination tokens.
        order: ``[B, N_src]`` sources by decreasing similarity to their best destination.
        best_dst: ``[B, N_src]`` that destination (an index into ``dst_index``).
        removed: sources merged away by `merge` (the first ``removed`` of ``order``).
        agent_removed: sources merged away by `agents` (more than ``removed``), or ``None`` without agents.
    """

    src_index: torch.Tensor
    dst_index: torch.Tensor
    order: torch.Tensor
    best_dst: torch.Tensor
    removed: int
    agent_removed: int | None

    @property
    def num_tokens(self) -> int:
        return self.src_index.numel() + self.dst_index.numel()

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, N - removed, C]``: unmerged sources, then destinations averaged with their merges."""
        return self._merged(tokens, self.removed)

    def agents(self, tokens: torch.Tensor) -> torch.Tensor:
        """AgentSD's agents: the same merge, ``agent_removed`` deep."""
        if self.agent_removed is None:
            raise RuntimeError("this matching was made without agents")
        return self._merged(tokens, self.agent_removed)

    def _merged(self, tokens: torch.Tensor, removed: int) -> torch.Tensor:
        channels = tokens.shape[-1]
        src, dst = tokens[:, self.src_index], tokens[:, self.dst_index]
        kept = _take(src, self.order[:, removed:])
        if removed:
            moved = _take(src, self.order[:, :removed])
            target = torch.gather(self.best_dst, 1, self.order[:, :removed])
            dst = dst.scatter_reduce(1, target[..., None].expand(-1, -1, channels), moved, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, merged: torch.Tensor) -> torch.Tensor:
        """``[B, N - removed, C]`` -> ``[B, N, C]``: every merged source takes its destination's result."""
        batch, channels = merged.shape[0], merged.shape[-1]
        kept_count = self.src_index.numel() - self.removed
        kept, dst = merged[:, :kept_count], merged[:, kept_count:]
        out = merged.new_empty(batch, self.num_tokens, channels)
        out[:, self.dst_index] = dst
        positions = self.src_index[self.order]  # [B, N_src] token positions in matching order
        out.scatter_(1, positions[:, self.removed :, None].expand(-1, -1, channels), kept)
        if self.removed:
            target = torch.gather(self.best_dst, 1, self.order[:, : self.removed])
            out.scatter_(1, positions[:, : self.removed, None].expand(-1, -1, channels), _take(dst, target))
        return out


def bipartite_merge(
    metric: torch.Tensor,
    grid: tuple[int, ...],
    cell: tuple[int, ...],
    removed: int,
    agent_removed: int | None = None,
    draws: torch.Tensor | torch.Generator | None = None,
) -> TokenMerge:
    """Match ``[B, N, C]`` tokens on ``grid`` (one destination per ``cell``) by cosine similarity of ``metric``.

    ``removed`` / ``agent_removed`` are capped at the number of sources. The destination pattern (``draws``, see
    `destination_mask`) is shared by the batch (so the two halves of a classifier-free-guidance batch merge alike);
    the matches are per sample.
    """
    is_dst = destination_mask(grid, cell, draws).to(metric.device)
    cell_count = math.prod([side // size for side, size in zip(grid, cell, strict=True)])
    dst_index, src_index = destination_split(is_dst, cell_count)
    with torch.no_grad():
        normed = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        dst = normed[:, dst_index]
        best, best_dst = [], []
        rows = max(1, _SIMILARITY_PER_TOKEN * metric.shape[1] // max(1, dst_index.numel()))
        for start in range(0, src_index.numel(), rows):
            scores = normed[:, src_index[start : start + rows]] @ dst.transpose(1, 2)
            value, index = scores.max(dim=-1)
            best.append(value)
            best_dst.append(index)
        best = torch.cat(best, dim=1)
        order = best.argsort(dim=1, descending=True)
    sources = src_index.numel()
    return TokenMerge(
        src_index=src_index,
        dst_index=dst_index,
        order=order,
        best_dst=torch.cat(best_dst, dim=1),
        removed=min(removed, sources),
        agent_removed=None if agent_removed is None else min(agent_removed, sources),
    )


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
