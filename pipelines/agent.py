"""Agent attention per model: the family's defaults, the layers it patches and the processor for each."""

from __future__ import annotations

from accel.pipelines import hidiffusion
from accel.processors.agent import (
    AgentAttnProcessor,
    AgentFluxAttnProcessor,
    AgentHunyuanVideoAttnProcessor,
    AgentSettings,
)

PROCESSORS = {
    "unet": AgentAttnProcessor,
    "flux": AgentFluxAttnProcessor,
    "hunyuanvideo": AgentHunyuanVideoAttnProcessor,
}


def settings_for(config, family: str) -> AgentSettings:
    """``config`` with ``family``'s defaults: AgentSD's recipe on UNets, grid-pooled agents without merging on DiTs."""
    unet = family == "unet"
    pooling = config.pooling or ("merge" if unet else "grid")
    if unet and config.pooling is None:
        # The config checks an explicit pooling="merge" itself; the default one is known only here, and under it a
        # ratio below one agent per cell would be raised to that silently.
        config.check_merge_pooling()
    if not unet:
        if pooling == "merge":
            raise ValueError(
                "agent: pooling='merge' (token merging) is for UNets; FLUX / HunyuanVideo pool agents over the "
                "token grid: use pooling='grid' or leave it unset"
            )
        for option in ("merge_ratio", "late_merge_ratio"):
            if getattr(config, option):
                raise ValueError(f"agent: {option} is for UNets (token merging); leave it unset on {family}")
        for option in ("cell", "late_cell", "seed"):
            # Cells and their seeded destinations belong to token merging, which FLUX / HunyuanVideo do not run.
            if config.is_set(option):
                raise ValueError(
                    f"agent: {option}={getattr(config, option)!r} is for UNets (token-merging cells and their random "
                    f"destinations); {family} pools agents over the token grid: leave {option} unset"
                )
    merge_ratio = (0.4 if unet else 0.0) if config.merge_ratio is None else config.merge_ratio
    late_merge_ratio = (0.4 if unet else 0.0) if config.late_merge_ratio is None else config.late_merge_ratio
    if unet:
        # Cells and the seeded destinations exist only where tokens are matched: merging, or merge-pooled agents.
        early_matching = merge_ratio > 0 or pooling == "merge"
        unused = {
            "cell": not early_matching,
            "late_cell": late_merge_ratio == 0,
            "seed": not early_matching and late_merge_ratio == 0,
        }
        for option, is_unused in unused.items():
            if is_unused and config.is_set(option):
                raise ValueError(
                    f"agent: {option}={getattr(config, option)!r} shapes token merging, which does not run where it "
                    f"would apply with pooling={pooling!r}, merge_ratio={merge_ratio} and late_merge_ratio="
                    f"{late_merge_ratio}: leave {option} unset, or merge"
                )
    return AgentSettings(
        agent_ratio=config.agent_ratio,
        pooling=pooling,
        agent_steps=config.agent_steps,
        merge_ratio=merge_ratio,
        late_merge_ratio=late_merge_ratio,
        cell=config.cell,
        late_cell=config.late_cell,
        scale_exponent=config.scale_exponent,
        shortcut=config.shortcut,
        seed=config.seed,
    )


def unet_layer_names(unet) -> set[str]:
    """AgentSD's layers: self-attention of the highest-resolution UNet level that has attention."""
    return hidiffusion.window_layer_names(unet)
