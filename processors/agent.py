"""Agent attention processors: AgentSD on UNet self-attention, grid-pooled agents on FLUX / HunyuanVideo.

UNet layers merge their tokens (ToMe) before the projections and spread the result back after the output
projection, all inside the processor: the block around it is diffusers' own. The agents are projected with the
layer's ``to_q`` (and ``norm_q``), so they are pooled queries, as in AgentSD.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass

import torch
from diffusers.utils import logging

from accel.kernels.agent import agent_attention, bipartite_merge, grid_pool, pooled_grid
from accel.processors.dense import (
    AttentionCall,
    DenseAttnProcessor,
    DenseFluxAttnProcessor,
    DenseHunyuanVideoAttnProcessor,
)
from accel.processors.joint import JointVisualAttend
from accel.processors.state import PatchContext, PerThread, PerThreadOwner

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class AgentSettings:
    """An `AgentConfig` with the model family's defaults filled in."""

    agent_ratio: float
    pooling: str
    agent_steps: float
    merge_ratio: float
    late_merge_ratio: float
    cell: tuple[int, int]
    late_cell: tuple[int, int]
    scale_exponent: float
    shortcut: float
    seed: int | None


class _AgentSchedule:
    """Which part of the schedule a call is in (shared by the UNet and DiT processors)."""

    def __init__(self, context: PatchContext, layer: str, settings: AgentSettings):
        super().__init__(context=context, layer=layer)
        self.settings = settings

    def prepare_step(self, device: torch.device, inputs: dict) -> None:
        """Decide this call's phase before the denoiser runs (called by the step hook, outside any compiled graph,
        which then reads a boolean instead of the schedule's position)."""
        self.context.scratch[self._phase_key] = self._decide_phase()

    @property
    def _phase_key(self) -> tuple[str, str]:
        return ("agent phase", self.layer)

    def _agent_phase(self) -> bool:
        decided = self.context.scratch.get(self._phase_key) if self.context is not None else None
        return self._decide_phase() if decided is None else decided

    def _decide_phase(self) -> bool:
        step = self.context.step if self.context is not None else None
        # Without a recorded step (a bare call outside any pipeline) the layer behaves as at the schedule's start.
        progress = 0.0 if step is None else step.progress
        early = progress < self.settings.agent_steps
        run_start = self.context.run_start if self.context is not None else None
        if not early and run_start and run_start >= self.settings.agent_steps > 0:
            late_merging = "; late token merging still acts" if self.settings.late_merge_ratio > 0 else ""
            self.context.notice_run_past(
                logger,
                "agent",
                f"agent_steps={self.settings.agent_steps:.2f}",
                f"no layer uses agents in it{late_merging}",
                "agent_steps",
            )
        return early

    def _scales(self, head_dim: int) -> tuple[float, float]:
        scale = head_dim**-0.5
        return scale, scale**self.settings.scale_exponent

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, settings={self.settings})"


class AgentAttnProcessor(_AgentSchedule, PerThreadOwner, DenseAttnProcessor):
    """AgentSD on a UNet self-attention layer: token merging plus agent attention early, token merging late."""

    # Set by ``__call__`` for the duration of one call: (attention module, agent hidden states); per thread, since
    # pipelines sharing the UNet may call it at once.
    _agent_inputs: tuple[torch.nn.Module, torch.Tensor] | None = PerThread(lambda: None)

    def __init__(self, context: PatchContext, layer: str, settings: AgentSettings):
        super().__init__(context=context, layer=layer, settings=settings)
        self._per_thread = threading.local()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Merging commutes with the per-token projections but not with residuals or norms over the whole sequence.
        reducible = (
            encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.ndim == 3
            and attn.spatial_norm is None
            and attn.group_norm is None
            and not attn.residual_connection
        )
        if not reducible:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        settings = self.settings
        early = self._agent_phase()
        merge_ratio = settings.merge_ratio if early else settings.late_merge_ratio
        tokens = hidden_states.shape[1]
        grid = self.context.layout.level_grid(tokens)
        cell = settings.cell if early else settings.late_cell
        merge_cells = all(side >= size for side, size in zip(grid, cell, strict=True))

        agents_wanted = early and 2 * round(settings.agent_ratio * tokens) < tokens
        merging = merge_ratio > 0 and merge_cells
        if not (merging or agents_wanted):
            return super().__call__(attn, hidden_states, None, None, temb)

        matching = None
        if merging or (agents_wanted and settings.pooling == "merge"):
            if not merge_cells:
                return super().__call__(attn, hidden_states, None, None, temb)
            matching = bipartite_merge(
                hidden_states,
                grid,
                cell,
                removed=int(merge_ratio * tokens) if merging else 0,
                agent_removed=tokens - round(settings.agent_ratio * tokens) if agents_wanted else None,
                draws=self._destination_draws(grid),
            )
        merged = matching.merge(hidden_states) if merging else hidden_states
        agents = None
        if agents_wanted:
            if settings.pooling == "merge":
                agents = matching.agents(hidden_states)
            else:
                agents, _ = grid_pool(hidden_states, grid, pooled_grid(grid, settings.agent_ratio))
            # AgentSD's rule: agents only where they are fewer than half the (merged) tokens.
            if 2 * agents.shape[1] >= merged.shape[1]:
                agents = None
        self._agent_inputs = None if agents is None else (attn, agents)
        try:
            out = super().__call__(attn, merged, None, None, temb)
        finally:
            self._agent_inputs = None
        return matching.unmerge(out) if merging else out

    def attend(self, query, key, value, attention_mask, call: AttentionCall):
        if self._agent_inputs is None or call.kind != "self":
            return super().attend(query, key, value, attention_mask, call)
        attn, agent_states = self._agent_inputs
        agents = attn.to_q(agent_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            agents = attn.norm_q(agents)
        scale, agent_scale = self._scales(query.shape[-1])
        return agent_attention(
            query, key, value, agents, scale=scale, agent_scale=agent_scale, shortcut=self.settings.shortcut
        )

    def prepare_step(self, device: torch.device, inputs: dict) -> None:
        super().prepare_step(device, inputs)
        layout = self.context.layout
        if self.settings.seed is None or layout is None or layout.grid is None:
            return
        early = self.context.scratch[self._phase_key]
        settings = self.settings
        matches_tokens = (
            (settings.merge_ratio > 0 or settings.pooling == "merge") if early else settings.late_merge_ratio > 0
        )
        if not matches_tokens:
            return
        # Drawn for the latent's grid, the largest any level has: a level reads the start, as it would draw itself.
        cell = settings.cell if early else settings.late_cell
        self.context.scratch[self._draws_key] = (layout.grid, cell, self._draw(layout.grid, cell).to(device))

    @property
    def _draws_key(self) -> tuple[str, str]:
        return ("agent destinations", self.layer)

    def _destination_draws(self, grid: tuple[int, ...]) -> torch.Tensor | None:
        """This step's random destination of each cell (see `destination_mask`); ``None`` without a seed."""
        if self.settings.seed is None:
            return None
        cell = self.settings.cell if self._agent_phase() else self.settings.late_cell
        prepared = self.context.scratch.get(self._draws_key)
        if (
            prepared is not None
            and prepared[1] == cell
            and all(side <= full for side, full in zip(grid, prepared[0], strict=True))
        ):
            return prepared[2]
        return self._draw(grid, cell)  # called outside the step hook (a processor driven by hand)

    def _draw(self, grid: tuple[int, ...], cell: tuple[int, ...]) -> torch.Tensor:
        step = self.context.step
        position = -1 if step is None else step.step_index if step.step_index is not None else round(step.timestep)
        digest = hashlib.blake2b(f"{self.settings.seed}/{position}/{self.layer}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        cells = math.prod([side // size for side, size in zip(grid, cell, strict=True)])
        return torch.randint(math.prod(cell), (cells,), generator=generator)


class _AgentJointAttend(_AgentSchedule, JointVisualAttend):
    """Grid-pooled agents for the visual queries of FLUX / HunyuanVideo joint attention; text stays exact."""

    method = "agent"
    plans_from_data = False  # pooling and two SDPA calls: traced whole

    def _visual_plan(self, call: AttentionCall):
        if not self._agent_phase():
            return None
        grid = self._visual_grid(call.visual_tokens)
        pooled = pooled_grid(grid, self.settings.agent_ratio)
        if 2 * torch.Size(pooled).numel() >= call.visual_tokens:
            return None
        return grid, pooled

    def _visual_attention(self, query, key, value, text_key, text_value, text_mask, plan):
        grid, pooled = plan
        agents, log_counts = grid_pool(query, grid, pooled)
        scale, agent_scale = self._scales(query.shape[-1])
        return agent_attention(
            query,
            key,
            value,
            agents,
            scale=scale,
            agent_scale=agent_scale,
            shortcut=self.settings.shortcut,
            extra_key=text_key,
            extra_value=text_value,
            extra_mask=text_mask,
            agent_log_counts=None if text_key is None else log_counts.to(query.device),
        )


class AgentFluxAttnProcessor(_AgentJointAttend, DenseFluxAttnProcessor):
    """Agent attention over FLUX's 2-D image-token grid (text tokens first, exact)."""


class AgentHunyuanVideoAttnProcessor(_AgentJointAttend, DenseHunyuanVideoAttnProcessor):
    """Agent attention over HunyuanVideo's 3-D video-token grid (text tokens last, exact, padded keys masked)."""
