"""Cross-attention maps for the controls: stored only while a control records, differentiable where they are kept.

A `CrossAttentionStore` is shared by the UNet's cross-attention processors of one patch. Outside a recording pass
every layer runs exact attention through SDPA; inside one, the layers at the store's token grid compute their
probabilities explicitly (so gradients reach the latent) and keep the head average, keyed by layer name (never by
call counts).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from accel.processors.dense import AttentionCall, DenseAttnProcessor

# A&E's and A-STAR's maps are 16 x 16 (of SD's 64 x 64 latent); other sizes use the recorded level nearest that.
PREFERRED_MAP_SIDE = 16


@dataclass
class CrossAttentionStore:
    """Head-averaged cross-attention probabilities of the last recording pass.

    Attributes:
        grid: keep only layers at this token grid ``(h, w)``; ``None`` keeps every cross-attention layer (the level
            is chosen when aggregating, so it follows resolution changes such as HiDiffusion's RAU-Net).
        maps: layer name -> ``(grid, [B, h * w, T])``.
    """

    grid: tuple[int, int] | None = None
    recording: bool = False
    maps: dict[str, tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=dict)

    @contextlib.contextmanager
    def record(self):
        self.maps.clear()
        self.recording = True
        try:
            yield self
        finally:
            self.recording = False

    def aggregate(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``[B, h, w, T]``: the mean over the recorded layers at ``grid`` (default: the recorded grid whose larger
        side is nearest `PREFERRED_MAP_SIDE`, the larger on a tie)."""
        grids = {g for g, _ in self.maps.values()}
        if not grids:
            raise RuntimeError("no cross-attention map was recorded in this pass")
        if grid is None:
            grid = min(grids, key=lambda g: (abs(max(g) - PREFERRED_MAP_SIDE), -max(g)))
        chosen = [m for g, m in self.maps.values() if tuple(g) == tuple(grid)]
        if not chosen:
            raise RuntimeError(
                f"no cross-attention map at the token grid {grid} was recorded; recorded: {sorted(grids)}"
            )
        stacked = torch.stack(chosen).mean(dim=0)
        return stacked.view(stacked.shape[0], *grid, stacked.shape[-1])


class StoreAttnProcessor(DenseAttnProcessor):
    """A UNet attention layer that hands its cross-attention probabilities to a store while it records."""

    def __init__(self, context, layer: str, store: CrossAttentionStore):
        super().__init__(context=context, layer=layer)
        self.store = store

    def attend(self, query, key, value, attention_mask, call: AttentionCall):
        if call.kind != "cross" or not self.store.recording:
            return super().attend(query, key, value, attention_mask, call)
        grid = tuple(self.context.layout.level_grid(call.visual_tokens))
        if self.store.grid is not None and grid != tuple(self.store.grid):
            return super().attend(query, key, value, attention_mask, call)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)
        self.store.maps[self.layer] = (grid, probs.mean(dim=1))
        return (probs.to(v.dtype) @ v).transpose(1, 2)

    def __repr__(self) -> str:
        return f"StoreAttnProcessor(layer={self.layer!r}, grid={self.store.grid})"
