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


@dataclass
class CrossAttentionStore:
    """Head-averaged cross-attention probabilities of the last recording pass.

    Attributes:
        grid: the token grid ``(h, w)`` whose layers are kept (e.g. A&E's 16 x 16).
        maps: layer name -> ``[B, h * w, T]``.
    """

    grid: tuple[int, int]
    recording: bool = False
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    @contextlib.contextmanager
    def record(self):
        self.maps.clear()
        self.recording = True
        try:
            yield self
        finally:
            self.recording = False

    def aggregate(self) -> torch.Tensor:
        """``[B, h, w, T]``: the mean over the kept layers."""
        if not self.maps:
            raise RuntimeError(
                f"no cross-attention map at the token grid {self.grid} was recorded; the UNet has no cross-attention "
                "layer at that resolution for this call"
            )
        stacked = torch.stack(list(self.maps.values())).mean(dim=0)
        return stacked.view(stacked.shape[0], *self.grid, stacked.shape[-1])


class StoreAttnProcessor(DenseAttnProcessor):
    """A UNet attention layer that hands its cross-attention probabilities to a store while it records."""

    def __init__(self, context, layer: str, store: CrossAttentionStore):
        super().__init__(context=context, layer=layer)
        self.store = store

    def attend(self, query, key, value, attention_mask, call: AttentionCall):
        if call.kind != "cross" or not self.store.recording:
            return super().attend(query, key, value, attention_mask, call)
        grid = self.context.layout.level_grid(call.visual_tokens)
        if tuple(grid) != tuple(self.store.grid):
            return super().attend(query, key, value, attention_mask, call)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)
        self.store.maps[self.layer] = probs.mean(dim=1)
        return (probs.to(v.dtype) @ v).transpose(1, 2)

    def __repr__(self) -> str:
        return f"StoreAttnProcessor(layer={self.layer!r}, grid={self.store.grid})"
