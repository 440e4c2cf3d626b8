"""HiDiffusion's UNet side: which layers get MSW-MSA, and RAU-Net as diffusers hooks (no block forward is copied).

RAU-Net keeps the deep UNet blocks near their training resolution during the early, layout-deciding part of the
schedule: a stride-2 down-sampling convolution runs with stride 4 and dilation 2 (same weights; "conv RAD"), or a
cross-attention down block average-pools after its first layer pair and its mirrored up block resizes back
(bicubic) before the layer pair that meets a full-size skip ("pool RAD"). The up path meets the skips again because
every up block is told its target size, which is what diffusers does itself for latents not divisible by the UNet's
total down-sampling.

Stages and switch points (fractions of the schedule, read from the step hook, never from call counts):

| UNet shape | stage 1 (switch ``raunet_switch``) | stage 2 (switch ``raunet_deep_switch``) | MSW-MSA level |
|---|---|---|---|
| SD 1.x / 2.x: 4 levels, attention from the top | conv RAD, level 0 down-sampler | pool RAD in level 1 | level 0 |
| SDXL: 3 levels, no attention at the top | pool RAD in level 1 | conv RAD, level 1 down-sampler | level 1 |

Default switches by how far the latent exceeds the UNet's training size (``sample_size``): up to 1x, RAU-Net stays
off; below 4x, stage 1 until 0.4 of the schedule; from 4x, stage 1 until 0.7 and stage 2 until 0.3 (HiDiffusion's
per-resolution table).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.utils import logging

from accel.processors.state import PatchContext, PerThread, PerThreadOwner

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class UNetShape:
    kind: str  # "sd" or "sdxl"
    levels: int
    window_level: int
    conv_rad_stage: dict[int, int]  # stage -> down block whose down-sampler conv is strided
    pool_rad_stage: dict[int, int]  # stage -> down block that pools (its mirror resizes back)

    def up_index(self, down_index: int) -> int:
        return self.levels - 1 - down_index


def unet_shape(unet) -> UNetShape:
    types = tuple(unet.config.down_block_types)
    attention = ["CrossAttn" in t for t in types]
    if len(types) == 4 and attention[:3] == [True] * 3:
        return UNetShape("sd", 4, window_level=0, conv_rad_stage={1: 0}, pool_rad_stage={2: 1})
    if len(types) == 3 and not attention[0] and all(attention[1:]):
        return UNetShape("sdxl", 3, window_level=1, conv_rad_stage={2: 1}, pool_rad_stage={1: 1})
    raise ValueError(
        f"HiDiffusion supports SD 1.x/2.x-shaped UNets (4 levels, attention from the top) and SDXL-shaped ones "
        f"(3 levels, none at the top); this UNet has down blocks {types}. Use raunet=False, mswmsa=False on it."
    )


def default_switches(scale: float) -> tuple[float, float]:
    """(stage 1, stage 2) switch fractions for a latent ``scale`` times the training size."""
    if scale <= 1.0:
        return 0.0, 0.0
    if scale < 4.0:
        return 0.4, 0.0
    return 0.7, 0.3


class RAUNetState(PerThreadOwner):
    """Per-call state shared by the RAU-Net hooks of one patch (kept per thread, as `PatchContext`'s is)."""

    skip_sizes: list[torch.Size] = PerThread(list)
    pooled_from: dict[int, torch.Size] = PerThread(dict)
    adapter_residuals: bool = PerThread(lambda: False)
    down_residuals: list[torch.Tensor] | None = PerThread(lambda: None)
    mid_residual: torch.Tensor | None = PerThread(lambda: None)
    stages: tuple[bool, bool] = PerThread(lambda: (False, False))

    def __init__(self, context: PatchContext, training_size: int, switches: tuple[float | None, float | None]):
        self.context = context
        self.training_size = training_size
        self.switches = switches
        self._per_thread = threading.local()

    def prepare_step(self, device, inputs: dict) -> None:
        """Decide which stages run in this denoiser call (the step hook calls this before the call, outside any
        compiled graph, which then reads two booleans instead of the schedule's position)."""
        step, layout = self.context.step, self.context.layout
        if step is None or layout is None:
            self.stages = (False, False)
            return
        defaults = default_switches(max(layout.grid) / self.training_size)
        switches = [d if c is None else c for c, d in zip(self.switches, defaults, strict=True)]
        notice = ("hidiffusion", f"raunet off {layout.grid}")
        if not any(switches) and all(c is None for c in self.switches) and notice not in self.context.warned:
            self.context.warned.add(notice)
            logger.warning(
                "hidiffusion: RAU-Net is off for %s latents, which are not above the UNet's training size (%d); it "
                "acts on larger sizes (raunet_switch=... runs it anyway)",
                "x".join(map(str, layout.grid)),
                self.training_size,
            )
        self.stages = tuple(step.progress < switch for switch in switches)
        run_start = self.context.run_start
        if run_start and any(switches) and run_start >= max(switches):
            self.context.notice_run_past(
                logger,
                "hidiffusion",
                f"RAU-Net's last switch ({max(switches):.2f})",
                "only MSW-MSA acts (RAU-Net shapes the layout in the early, noisy steps)",
                "raunet_switch",
            )

    def begin_forward(self) -> None:
        """Start a denoiser call's bookkeeping (``conv_in`` calls this before any other RAU-Net hook)."""
        self.skip_sizes = []
        self.pooled_from.clear()

    def active(self, stage: int) -> bool:
        return self.stages[stage - 1]


class _RAUNetHook(ModelHook):
    """A hook reading the patch's shared `RAUNetState`."""

    def __init__(self, state: RAUNetState):
        super().__init__()
        self.state = state


class _SkipSizes(_RAUNetHook):
    """On ``conv_in`` (starts a forward) and on each down block: the sizes of the skips the up path will meet."""

    def __init__(self, state: RAUNetState, starts_forward: bool):
        super().__init__(state)
        self.starts_forward = starts_forward

    def post_forward(self, module, output):
        if self.starts_forward:
            self.state.begin_forward()
            if self.state.adapter_residuals and (self.state.active(1) or self.state.active(2)):
                raise ValueError(
                    "hidiffusion: RAU-Net shrinks the UNet's inner features, but this call adds T2I-Adapter residuals "
                    "sized for the full latent, which accel does not resize yet; patch with raunet=False (MSW-MSA "
                    "alone works with them). ControlNet residuals are resized."
                )
            self.state.skip_sizes.append(output.shape[-2:])
        else:
            self.state.skip_sizes.extend(skip.shape[-2:] for skip in output[1])
        return output


class _ExternalResiduals(_RAUNetHook):
    """On the UNet: takes a ControlNet's residuals out of the call; `_AddSkipResiduals` and `_AddMidResidual` add
    them where diffusers would, fitted to the features RAU-Net shrank (area average). T2I-Adapter residuals are only
    noted (refused while RAU-Net is active)."""

    def pre_forward(self, module, *args, **kwargs):
        down, mid = kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual")
        self.state.adapter_residuals = kwargs.get("down_intrablock_additional_residuals") is not None
        self.state.down_residuals = self.state.mid_residual = None
        if down is not None and mid is not None:  # diffusers' own test for ControlNet residuals
            self.state.down_residuals, self.state.mid_residual = list(down), mid
            kwargs["down_block_additional_residuals"] = kwargs["mid_block_additional_residual"] = None
        return args, kwargs

    def post_forward(self, module, output):
        # Held past the call they would keep a ControlNet's full-size residuals alive (hundreds of MB at 2048²).
        self.state.down_residuals = self.state.mid_residual = None
        return output


def _fitted(residual: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if residual.shape[-2:] == like.shape[-2:]:
        return residual
    return F.adaptive_avg_pool2d(residual, like.shape[-2:])


class _AddSkipResiduals(_RAUNetHook):
    """On an up block: adds the ControlNet residuals of the skips it consumes (as the UNet adds them to the skips)."""

    def __init__(self, state: RAUNetState, consumed_through: int):
        super().__init__(state)
        self.consumed_through = consumed_through

    def pre_forward(self, module, *args, **kwargs):
        residuals = self.state.down_residuals
        skips = kwargs.get("res_hidden_states_tuple")
        if residuals is None or skips is None:
            return args, kwargs
        first = len(residuals) - self.consumed_through
        mine = residuals[first : first + len(skips)]
        kwargs["res_hidden_states_tuple"] = tuple(s + _fitted(r, s) for s, r in zip(skips, mine, strict=True))
        return args, kwargs


class _AddMidResidual(_RAUNetHook):
    """On the mid block: adds the ControlNet's mid residual to its output."""

    def post_forward(self, module, output):
        residual = self.state.mid_residual
        return output if residual is None else output + _fitted(residual, output)


class _UpsampleSize(_RAUNetHook):
    """On an up block: up-sample to the size of the skip the next up block meets first."""

    def __init__(self, state: RAUNetState, consumed_through: int):
        super().__init__(state)
        self.consumed_through = consumed_through

    def pre_forward(self, module, *args, **kwargs):
        remaining = len(self.state.skip_sizes) - self.consumed_through
        if remaining > 0:
            kwargs["upsample_size"] = tuple(self.state.skip_sizes[remaining - 1])
        return args, kwargs


class _StridedConv(_RAUNetHook):
    """Conv RAD: the stride-2 down-sampling conv runs with stride 4 and dilation 2 while its stage is active."""

    def __init__(self, state: RAUNetState, stage: int):
        super().__init__(state)
        self.stage = stage

    def new_forward(self, module, hidden_states):
        if not self.state.active(self.stage):
            return self.fn_ref.original_forward(hidden_states)
        stride = tuple(2 * s for s in module.stride)
        padding = tuple(2 * p for p in module.padding)
        return F.conv2d(hidden_states, module.weight, module.bias, stride=stride, padding=padding, dilation=2)


def strided_convs(sampler: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The down-sampler's stride-2 convolutions: its own, or under a LoRA wrapper (peft, LoCon) the base layer's and
    the adapters' down projections, which run at the base's stride; all must take RAU-Net's stride together."""
    return [m for m in sampler.modules() if isinstance(m, torch.nn.Conv2d) and tuple(m.stride) == (2, 2)]


class _ConvsAsPatched(_RAUNetHook):
    """Refuses a down-sampler whose strided convolutions changed after patching (a LoRA loaded since): half of them
    at RAU-Net's stride would not add up."""

    def __init__(self, state: RAUNetState, stage: int, convs: list[torch.nn.Conv2d]):
        super().__init__(state)
        self.stage = stage
        self.convs = {id(conv) for conv in convs}

    def pre_forward(self, module, *args, **kwargs):
        if self.state.active(self.stage) and {id(conv) for conv in strided_convs(module)} != self.convs:
            raise RuntimeError(
                "hidiffusion: the UNet's down-sampling convolutions changed after accel.patch (a LoRA loaded or "
                "unloaded since?); RAU-Net strides them all alike, so call accel.unpatch(pipe) and patch again after "
                "loading adapters"
            )
        return args, kwargs


class _PoolAfter(_RAUNetHook):
    """Pool RAD, down side: average-pool the output of a block's first attention layer (ceil mode)."""

    def __init__(self, state: RAUNetState, stage: int, down_index: int):
        super().__init__(state)
        self.stage = stage
        self.down_index = down_index

    def post_forward(self, module, output):
        if not self.state.active(self.stage):
            return output
        sample = output[0]
        self.state.pooled_from[self.down_index] = sample.shape[-2:]
        return _replace_sample(output, F.avg_pool2d(sample, kernel_size=2, ceil_mode=True))


class _ResizeBack(_RAUNetHook):
    """Pool RAD, up side: resize (bicubic) to the pre-pool size before the layer pair that meets a full-size skip."""

    def __init__(self, state: RAUNetState, down_index: int):
        super().__init__(state)
        self.down_index = down_index

    def post_forward(self, module, output):
        size = self.state.pooled_from.get(self.down_index)
        if size is None:
            return output
        sample = output[0]
        return _replace_sample(output, F.interpolate(sample, size=tuple(size), mode="bicubic", align_corners=False))


def _replace_sample(output, sample):
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


def raunet_hooks(unet, state: RAUNetState) -> list[tuple[torch.nn.Module, ModelHook, str]]:
    """``(module, hook, name)`` triples that implement RAU-Net on ``unet``."""
    shape = unet_shape(unet)
    hooks: list[tuple[torch.nn.Module, ModelHook, str]] = [
        (unet, _ExternalResiduals(state), "accel_raunet"),
        (unet.conv_in, _SkipSizes(state, True), "accel_raunet"),
        (unet.mid_block, _AddMidResidual(state), "accel_raunet_residuals"),
    ]
    for block in unet.down_blocks:
        hooks.append((block, _SkipSizes(state, False), "accel_raunet"))
    consumed = 0
    for block in unet.up_blocks:
        consumed += len(block.resnets)
        hooks.append((block, _AddSkipResiduals(state, consumed), "accel_raunet_residuals"))
        if getattr(block, "upsamplers", None):
            hooks.append((block, _UpsampleSize(state, consumed), "accel_raunet"))
    for stage, index in shape.conv_rad_stage.items():
        sampler = unet.down_blocks[index].downsamplers[0]
        convs = strided_convs(sampler)
        hooks.extend((conv, _StridedConv(state, stage), "accel_raunet") for conv in convs)
        hooks.append((sampler, _ConvsAsPatched(state, stage, convs), "accel_raunet_convs"))
    for stage, index in shape.pool_rad_stage.items():
        down, up = unet.down_blocks[index], unet.up_blocks[shape.up_index(index)]
        hooks.append((down.attentions[0], _PoolAfter(state, stage, index), "accel_raunet"))
        hooks.append((up.attentions[len(up.attentions) - 2], _ResizeBack(state, index), "accel_raunet"))
    return hooks


def window_layer_names(unet) -> set[str]:
    """Module names of the self-attention layers that MSW-MSA windows (the top attention level, down and up)."""
    shape = unet_shape(unet)
    prefixes = (f"down_blocks.{shape.window_level}.", f"up_blocks.{shape.up_index(shape.window_level)}.")
    return {name for name, _ in unet.named_modules() if name.startswith(prefixes) and name.endswith(".attn1")}
