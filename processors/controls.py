"""Cross-attention maps for the controls: stored only while a control records, differentiable where they are kept.

A `CrossAttentionStore` is shared by the recording processors of one patch. Every layer's output is always its
ordinary attention (SDPA); inside a recording pass, the UNet's recorded cross-attention layers also compute their
probabilities explicitly beside it (so gradients reach the latent through the maps) and keep the head average, and
FLUX's recorded joint layers add the image-query x text-key map renormalised over the prompt's tokens.
Maps are keyed by layer name (never by call counts).

A pass can also follow a `RecordingPlan` taken from an earlier whole pass at the same latent shape: layers away from
the level the loss reads then run SDPA, and the last layer at that level ends the forward (`RecordingComplete`), since
nothing after it feeds the loss. The plan holds only while the pass meets the same layers at the same grids in the
same order; a pass that strays from it (HiDiffusion's RAU-Net switching the deep levels' resolution) stops with
`RecordingPlanMismatch`, to be run again whole.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from accel.kernels.controls import text_token_maps
from accel.processors.dense import AttentionCall, DenseAttnProcessor, DenseFluxAttnProcessor
from accel.processors.joint import key_padding_mask
from accel.processors.state import PerThread, PerThreadOwner

# A&E's and A-STAR's maps are 16 x 16 (of SD's 64 x 64 latent); other sizes use the recorded level nearest that.
PREFERRED_MAP_SIDE = 16


def nearest_level(grids, side: int) -> tuple[int, ...]:
    """Of the recorded token grids, the one whose larger side is nearest ``side`` (the larger on a tie)."""
    return min((tuple(g) for g in grids), key=lambda g: (abs(max(g) - side), -max(g)))


class RecordingComplete(Exception):
    """Raised by a planned pass's last recorded layer: the rest of the forward cannot change the maps."""


class RecordingPlanMismatch(Exception):
    """Raised when a planned pass meets a layer or grid its plan does not list at that point."""


@dataclass(frozen=True)
class RecordingPlan:
    """What a whole recording pass met: every recording layer in call order with its token grid, the level the loss
    reads (``grid``) and the position in ``order`` of its last layer."""

    order: tuple[tuple[str, tuple[int, ...]], ...]
    grid: tuple[int, ...]
    last: int


class CrossAttentionStore(PerThreadOwner):
    """Head-averaged cross-attention probabilities of the last recording pass.

    Everything but ``grid`` and ``map_side`` is kept per thread (`PerThread`): a pipeline sharing the patched
    denoiser (``from_pipe``) may run it from another thread while this patch records, and its layers must neither
    record into this pass nor end their own forward at this pass's plan.

    Attributes:
        grid: keep only layers at this token grid ``(h, w)``; ``None`` keeps every cross-attention layer (the level
            is chosen when aggregating, so it follows resolution changes such as HiDiffusion's RAU-Net).
        map_side: the level `aggregate` reads by default: the recorded grid whose larger side is nearest this.
        recording: inside `record` or `replay`.
        maps: layer name -> ``(grid, [B, h * w, T])``.
        text_spans: while recording, per batch row the ``(first, end)`` span of the prompt's own tokens, over which
            joint-attention maps are renormalised (``None``: over every text token).
        plan: while recording, the `RecordingPlan` the pass follows (``None``: a whole pass).
        met: the ``(layer, grid)`` of every recording layer the pass has met so far.
        records: per layer met in the last pass, whether it recorded; `replay` repeats these decisions.
        replaying: inside `replay` (the pass's backward).
    """

    recording = PerThread(lambda: False)
    maps = PerThread(dict)
    text_spans = PerThread(lambda: None)
    plan = PerThread(lambda: None)
    met = PerThread(list)
    records = PerThread(dict)
    replaying = PerThread(lambda: False)

    def __init__(self, grid: tuple[int, int] | None = None, map_side: int = PREFERRED_MAP_SIDE):
        self.grid = grid
        self.map_side = map_side
        self._per_thread = threading.local()

    @contextlib.contextmanager
    def record(self, text_spans: list[tuple[int, int]] | None = None, plan: RecordingPlan | None = None):
        self.maps.clear()
        self.met.clear()
        self.records.clear()
        self.recording = True
        self.text_spans = text_spans
        self.plan = plan
        try:
            yield self
        finally:
            self.recording = False
            self.text_spans = None
            self.plan = None

    @contextlib.contextmanager
    def replay(self, text_spans: list[tuple[int, int]] | None = None):
        """Around the backward pass of the last recording pass. Gradient checkpointing runs checkpointed blocks
        again there and needs every operation of the first run again: recorded layers compute their maps as they
        did (same layers, same spans) but keep nothing and never end the pass."""
        self.recording = self.replaying = True
        self.text_spans = text_spans
        try:
            yield self
        finally:
            self.recording = self.replaying = False
            self.text_spans = None

    def meet(self, layer: str, grid: tuple[int, ...]) -> bool:
        """Note that ``layer`` runs at ``grid`` in this pass; whether it records its map."""
        if self.replaying:
            return self.records.get(layer, False)
        position = len(self.met)
        self.met.append((layer, grid))
        if self.plan is None:
            records = self.grid is None or grid == tuple(self.grid)
        elif position >= len(self.plan.order) or self.plan.order[position] != (layer, grid):
            raise RecordingPlanMismatch(
                f"{layer} at {grid} is not what the recording plan lists at position {position}"
            )
        else:
            records = grid == self.plan.grid
        self.records[layer] = records
        return records

    def keep(self, layer: str, grid: tuple[int, ...], maps: torch.Tensor) -> None:
        """Store a layer's map; a planned pass ends at its plan's last layer."""
        if self.replaying:
            return
        self.maps[layer] = (grid, maps)
        if self.plan is not None and len(self.met) - 1 == self.plan.last:
            raise RecordingComplete

    def whole_pass_plan(self) -> RecordingPlan | None:
        """The plan of the pass just recorded whole (``None`` if it recorded nothing)."""
        grids = {g for g, _ in self.maps.values()}
        if not grids:
            return None
        grid = nearest_level(grids, self.map_side)
        order = tuple(self.met)
        last = max(i for i, (layer, g) in enumerate(order) if g == grid and layer in self.maps)
        return RecordingPlan(order, grid, last)

    def text_keep(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor | None:
        """``[B, T]`` booleans: the text tokens inside each row's span, or ``None`` without spans."""
        if self.text_spans is None:
            return None
        if len(self.text_spans) != batch:
            raise RuntimeError(f"{len(self.text_spans)} prompt spans were given for a batch of {batch}")
        index = torch.arange(tokens, device=device)
        bounds = torch.tensor(self.text_spans, device=device)
        return (index >= bounds[:, :1]) & (index < bounds[:, 1:])

    def aggregate(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``[B, h, w, T]``: the mean over the recorded layers at ``grid`` (default: the recorded grid whose larger
        side is nearest ``map_side``, the larger on a tie)."""
        grids = {g for g, _ in self.maps.values()}
        if not grids:
            raise RuntimeError("no cross-attention map was recorded in this pass")
        if grid is None:
            grid = nearest_level(grids, self.map_side)
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
        records = self.store.meet(self.layer, grid)
        # The output stays the layer's own attention, so a recording pass computes what the denoiser call computes
        # and a pass that stops early (`RecordingPlan`) matches a whole one bit for bit up to where it stops.
        out = super().attend(query, key, value, attention_mask, call)
        if not records:
            return out
        q, k = (t.transpose(1, 2) for t in (query, key))  # [B, H, S, D]
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        self.store.keep(self.layer, grid, scores.softmax(dim=-1).mean(dim=1))
        return out

    def __repr__(self) -> str:
        return f"StoreAttnProcessor(layer={self.layer!r}, grid={self.store.grid})"


class FluxStoreAttnProcessor(DenseFluxAttnProcessor):
    """A FLUX joint-attention layer that, while its store records, also hands the store the image-query x
    text-key map (`accel.kernels.controls.text_token_maps`: renormalised over the prompt's tokens, head-averaged).

    The layer's output is always the ordinary joint attention (``attend`` of the dense processor, with its backend
    and parallel config); outside recording nothing else runs, so it is the dense processor bit for bit.
    """

    def __init__(self, context, layer: str, store: CrossAttentionStore):
        super().__init__(context=context, layer=layer)
        self.store = store

    def attend(self, query, key, value, attention_mask, call: AttentionCall):
        out = super().attend(query, key, value, attention_mask, call)
        if not self.store.recording or call.kind != "joint" or not call.text_tokens:
            return out
        if self._parallel_config is not None:
            raise RuntimeError(
                f"{self.layer}: the attention controls record maps over the whole token sequence and do not run under "
                "context parallelism yet; generate on one device (or unpatch)"
            )
        layout = self.context.layout if self.context is not None else None
        grid = None if layout is None else layout.grid
        if grid is None or math.prod(grid) != call.visual_tokens:
            raise RuntimeError(
                f"{self.layer} received {call.visual_tokens} image tokens but the recorded token grid is {grid}; the "
                "attention controls need a plain text-to-image FLUX call (img_ids of the image tokens only)"
            )
        if not self.store.meet(self.layer, tuple(grid)):
            return out
        text = slice(0, call.text_tokens) if call.text_first else slice(call.visual_tokens, None)
        visual = slice(call.text_tokens, None) if call.text_first else slice(0, call.visual_tokens)
        batch = query.shape[0]
        keep = self.store.text_keep(batch, call.text_tokens, query.device)
        if attention_mask is not None:
            # FLUX's optional mask is a key-padding mask; padded text keys stay out of the map too.
            padding = key_padding_mask(attention_mask, batch, key.shape[1])[:, text]
            keep = padding if keep is None else keep & padding
        # Only the columns up to the prompts' last token are computed (FLUX pads T5 to 512 tokens; prompts are
        # short), so the map and its autograd graph stay small; the columns after them are zeros.
        spans = self.store.text_spans
        used = min(max(end for _, end in spans), call.text_tokens) if spans else call.text_tokens
        keep = None if keep is None else keep[:, :used]
        maps = text_token_maps(query[:, visual], key[:, text][:, :used], keep)
        maps = F.pad(maps, (0, call.text_tokens - maps.shape[-1]))
        self.store.keep(self.layer, tuple(grid), maps)
        return out

    def __repr__(self) -> str:
        return f"FluxStoreAttnProcessor(layer={self.layer!r})"
