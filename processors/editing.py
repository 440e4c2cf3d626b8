"""The UNet attention of attention-driven editing (Prompt-to-Prompt, Dynamic Prompt Learning).

One `EditController` is shared by every attention layer of the UNet for the length of one ``accel.edit`` call. It
has three modes:

- ``"off"``: exact attention (SDPA), as diffusers computes it.
- ``"record"``: cross-attention layers also compute their probabilities explicitly and keep the head average per
  layer (with gradients, for DPL's losses), while their output stays exact attention; after the first recording only
  the level whose maps are read does, and a learning pass ends after its last layer. Self-attention at
  ``self_grid`` is added to a running mean (no gradient: it only locates the background).
- ``"edit"``: the batch is ``[unconditional source, unconditional edit, source, edit]``. While ``progress`` is below
  ``cross_replace`` the edit row's cross-attention takes the source row's maps through the prompts' token alignment
  (and is re-weighted by ``equalizer``); below ``self_replace`` the edit row's self-attention in the coarse layers is
  the source row's. The unconditional rows are never changed. The conditional rows' cross maps are summed over the
  steps for the local blend.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from accel.kernels.editing import transfer_cross_attention
from accel.processors.controls import PREFERRED_MAP_SIDE, RecordingComplete, nearest_level
from accel.processors.dense import AttentionCall, DenseAttnProcessor
from accel.processors.state import LatentLayout


@dataclass
class EditController:
    """State shared by one edit's attention layers (see the module docstring)."""

    layout: LatentLayout
    map_side: int = PREFERRED_MAP_SIDE  # cross maps are read at the recorded grid whose larger side is nearest this
    mode: str = "off"
    progress: float = 0.0
    # "record"
    maps: dict[str, tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=dict)
    # Only one level's maps are read. The first whole recording finds it and its last layer; later recordings compute
    # probabilities at that level only, and a pass that may stop early (DPL's learning passes, whose output is
    # unused) ends after that layer: nothing after it reaches the losses. On SD 1.5 at 512² that skips the two top up
    # blocks, forward and backward.
    read_grid: tuple[int, ...] | None = None
    last_read_layer: str | None = None
    stopping: bool = False
    stop_passes_early: ClassVar[bool] = True
    self_grid: tuple[int, ...] | None = None
    self_sum: torch.Tensor | None = None
    self_count: int = 0
    # "edit"
    mapper: torch.Tensor | None = None
    keep_source: torch.Tensor | None = None
    equalizer: torch.Tensor | None = None
    cross_replace: float = 0.0
    self_replace: float = 0.0
    self_replace_side: int = 0
    blend_sums: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @contextlib.contextmanager
    def recording(self, stop_early: bool = False):
        """Record the cross maps of the forward passes inside; with ``stop_early`` a pass may end after the last layer
        whose maps are read (its output is then never made: only for passes that need the maps alone)."""
        self.maps.clear()
        self.mode = "record"
        self.stopping = stop_early and self.stop_passes_early and self.last_read_layer is not None
        try:
            yield self
        except RecordingComplete:
            pass
        else:
            if self.read_grid is None and self.maps:
                self.read_grid = nearest_grid(self.maps.values(), None, self.map_side)
                self.last_read_layer = [name for name, (g, _) in self.maps.items() if g == self.read_grid][-1]
        finally:
            self.mode, self.stopping = "off", False

    @contextlib.contextmanager
    def editing(self, progress: float):
        self.mode, self.progress = "edit", progress
        try:
            yield self
        finally:
            self.mode = "off"

    def cross_maps(self, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        """``[B, h, w, T]``: the last recording's cross maps averaged over the layers at ``grid`` (default: the
        recorded grid whose larger side is nearest ``map_side``, as the controls choose)."""
        return _mean_at(nearest_grid(self.maps.values(), grid, self.map_side), self.maps.values())

    def blend_maps(self) -> torch.Tensor:
        """``[2, h, w, T]``: source and edit rows' cross maps summed over the edit steps so far, at the grid nearest
        ``map_side`` (Prompt-to-Prompt blends at 16 x 16 of SD's 64 x 64 latent)."""
        grid = nearest_grid(((g, None) for g in self.blend_sums), None, self.map_side)
        summed = self.blend_sums[grid]
        return summed.view(summed.shape[0], *grid, summed.shape[-1])

    def self_attention_mean(self) -> torch.Tensor:
        """``[N, N]``: the mean recorded self-attention at ``self_grid`` (rows: query tokens)."""
        if self.self_sum is None:
            raise RuntimeError(f"no self-attention at the grid {self.self_grid} was recorded")
        return self.self_sum / self.self_count


def nearest_grid(entries, grid, side: int = PREFERRED_MAP_SIDE):
    grids = {tuple(g) for g, _ in entries}
    if not grids:
        raise RuntimeError("no cross-attention map was recorded")
    if grid is not None:
        if tuple(grid) not in grids:
            raise RuntimeError(f"no cross-attention map at {grid} was recorded; recorded: {sorted(grids)}")
        return tuple(grid)
    return nearest_level(grids, side)


def _mean_at(grid, entries) -> torch.Tensor:
    chosen = torch.stack([m for g, m in entries if tuple(g) == grid]).mean(dim=0)
    return chosen.view(chosen.shape[0], *grid, chosen.shape[-1])


class EditAttnProcessor(DenseAttnProcessor):
    """A UNet attention layer under an `EditController`."""

    def __init__(self, controller: EditController, layer: str):
        super().__init__(context=None, layer=layer)
        self.controller = controller

    def attend(self, query, key, value, attention_mask, call: AttentionCall):
        controller = self.controller
        if controller.mode == "off":
            return super().attend(query, key, value, attention_mask, call)
        grid = controller.layout.level_grid(call.visual_tokens)
        if call.kind == "cross":
            return self._cross(query, key, value, attention_mask, grid, call)
        return self._self(query, key, value, attention_mask, grid, call)

    def _probabilities(self, query, key, attention_mask) -> torch.Tensor:
        q, k = query.transpose(1, 2).float(), key.transpose(1, 2).float()  # [B, H, S, D]
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        return scores.softmax(dim=-1)

    @staticmethod
    def _apply(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return (probs.to(value.dtype) @ value.transpose(1, 2)).transpose(1, 2)

    def _cross(self, query, key, value, attention_mask, grid, call):
        controller = self.controller
        if controller.mode == "record" and controller.read_grid not in (None, grid):
            return super().attend(query, key, value, attention_mask, call)
        probs = self._probabilities(query, key, attention_mask)
        if controller.mode == "record":
            # The maps carry the gradients; the output stays diffusers' SDPA, so recording never moves the latents.
            controller.maps[self.layer] = (grid, probs.mean(dim=1))
            if controller.stopping and self.layer == controller.last_read_layer:
                raise RecordingComplete
            return super().attend(query, key, value, attention_mask, call)
        source, edited = probs[2], probs[3]
        if controller.progress < controller.cross_replace:
            edited = transfer_cross_attention(source, edited, controller.mapper, controller.keep_source)
            if controller.equalizer is not None:
                edited = edited * controller.equalizer.to(edited)
            probs = torch.cat([probs[:3], edited[None]])
        rows = probs[2:].mean(dim=1).detach()
        previous = controller.blend_sums.get(grid)
        controller.blend_sums[grid] = rows if previous is None else previous + rows
        return self._apply(probs, value)

    def _self(self, query, key, value, attention_mask, grid, call):
        controller = self.controller
        if controller.mode == "record":
            if grid == controller.self_grid:
                with torch.no_grad():
                    probs = self._probabilities(query, key, attention_mask).mean(dim=1).sum(dim=0)
                controller.self_sum = probs if controller.self_sum is None else controller.self_sum + probs
                controller.self_count += query.shape[0]
            return super().attend(query, key, value, attention_mask, call)
        if controller.progress >= controller.self_replace or max(grid) > controller.self_replace_side:
            return super().attend(query, key, value, attention_mask, call)
        # The edited row attends as the source row does, to its own values: its query and keys become the
        # source's. SDPA does this without the [rows, heads, N, N] probabilities (4 GB a layer at 1024²).
        rows = torch.tensor([0, 1, 2, 2], device=query.device)
        if attention_mask is not None and attention_mask.shape[0] == query.shape[0]:
            attention_mask = attention_mask[rows]
        return super().attend(query[rows], key[rows], value, attention_mask, call)

    def __repr__(self) -> str:
        return f"EditAttnProcessor(layer={self.layer!r})"
