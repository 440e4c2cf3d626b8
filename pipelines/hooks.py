"""The denoiser hook that tells processors where they are: timestep, place in the schedule, token layout.

It is a ``diffusers.hooks.ModelHook`` registered on the denoiser under ``STEP_HOOK_NAME``: it reads the denoiser's
own inputs before every forward, so the facts are right under classifier-free guidance, img2img, any step count,
second-order schedulers and repeated generations, without globals and without counting calls.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from accel.pipelines.families import ModelFamily
from accel.processors.state import PatchContext, StepState

STEP_HOOK_NAME = "accel_step_state"
# What a fullgraph=True compile prints when it meets accel's eager hooks: Dynamo's own hint there ("remove the
# torch.compiler.disable call") is not the fix.
EAGER_HOOK_REASON = (
    "accel's patch prepares each denoiser call eagerly (the step, the schedule, per-step draws, guidance), one graph "
    "break before the compiled body: compile the patched denoiser without fullgraph=True"
)
# Frames between a pipeline's ``__call__`` and this hook: torch's module call, diffusers' hook wrappers, accelerate's
# offload hooks, the guidance loops of accel's controls.
_CALLER_SEARCH_DEPTH = 40
_DENOISER_NAMES = ("unet", "transformer")


class StepStateHook(ModelHook):
    _is_stateful = True

    def __init__(
        self,
        family: ModelFamily,
        context: PatchContext,
        pipeline: Any | None = None,
        installed: list[tuple[str, torch.nn.Module, Any]] = (),
    ):
        super().__init__()
        self.family = family
        self.context = context
        # (layer, attention module, accel's processor): diffusers' own switches (fuse_qkv_projections,
        # enable_attention_slicing, load_ip_adapter) replace every processor, which would leave a half-patched model.
        self.installed = list(installed)
        # Weak, so a patched denoiser never keeps its pipeline alive; the scheduler is looked up at call time because
        # users swap ``pipe.scheduler``.
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(module.forward)
        return module

    # Under torch.compile this runs eagerly (one graph break before the denoiser's body): it reads the call stack and
    # the scheduler, which Dynamo cannot trace, and it only sets the Python facts the compiled body reads.
    @torch.compiler.disable(reason=EAGER_HOOK_REASON)
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self._check_processors()
        inputs = self._signature.bind_partial(*args, **kwargs).arguments
        self.context.layout = self.family.read_layout(module, inputs)
        timestep = self.family.timestep_of(inputs)
        patched = self._pipeline() if self._pipeline is not None else None
        running = _pipeline_on_stack(module)
        # Controls guide only their own pipeline's calls; a sibling made with from_pipe may encode the same prompt.
        self.context.foreign_call = running is not None and patched is not None and running is not patched
        pipeline = running if running is not None else patched
        step = None if timestep is None else self._step_state(timestep, pipeline)
        schedule = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        self.context.enter(step, caller=None if pipeline is None else id(pipeline), schedule=schedule)
        self._prepare_step(inputs)
        return args, kwargs

    def _prepare_step(self, inputs: dict[str, Any]) -> None:
        """Let the patch's processors and hooks turn this call's step and inputs (``prepare_step(device, inputs)``,
        the denoiser's arguments by name) into what their compiled code reads.

        Under torch.compile a Python value read from the step (a progress, a step index, a random shift) becomes a
        guard, and the denoiser would recompile at every step; decisions (a phase, a stage) change a few times per
        generation, and per-step draws are handed over as tensors.
        """
        owners = [processor for _, _, processor in self.installed] + self.context.companions
        preparers = [owner.prepare_step for owner in owners if hasattr(owner, "prepare_step")]
        if preparers:
            # The latents' device, not the parameters': with sequential CPU offload those are elsewhere until used.
            device = next(value.device for value in inputs.values() if isinstance(value, torch.Tensor))
            for prepare in preparers:
                prepare(device, inputs)

    def _check_processors(self) -> None:
        replaced = [
            (name, attention.processor) for name, attention, own in self.installed if attention.processor is not own
        ]
        if replaced:
            name, processor = replaced[0]
            raise RuntimeError(
                f"accel: the attention processors of {len(replaced)} patched layers were replaced after accel.patch "
                f"(e.g. {name} now has {type(processor).__name__}), by pipe.fuse_qkv_projections(), "
                "enable_attention_slicing(), load_ip_adapter() or set_attn_processor(); call accel.unpatch(pipe), make "
                "that change, then patch again"
            )

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.reset()
        return module

    def _step_state(self, timestep: float, pipeline: Any | None) -> StepState:
        scheduler = getattr(pipeline, "scheduler", None)
        schedule = getattr(scheduler, "timesteps", None)
        num_train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
        if schedule is None or len(schedule) == 0:
            return StepState(timestep, None, None, min(max(1.0 - timestep / num_train, 0.0), 1.0))
        # FLUX and HunyuanVideo hand the denoiser the timestep in the latents' dtype: in bf16 neighbouring steps of
        # a long schedule round together. The pipeline keeps the exact one; take it when it is this call's.
        exact = getattr(pipeline, "_current_timestep", None)
        if exact is not None:
            exact = float(exact.flatten()[0]) if isinstance(exact, torch.Tensor) else float(exact)
            if abs(exact - timestep) <= 0.01 * max(1.0, abs(timestep)):
                timestep = exact
        # Found by value: robust to CFG (several calls per step), img2img (schedule entered late) and restarts.
        distances = (torch.as_tensor(schedule).detach().float().cpu() - timestep).abs()
        order = int(getattr(scheduler, "order", 1) or 1)
        if order == 1:
            index = int(distances.argmin())
            return StepState(timestep, index, len(schedule), index / len(schedule))
        # Second-order schedulers (Heun, KDPM2, DPM-Solver SDE) list each step's predictor and corrector timesteps,
        # and Heun lists a timestep twice (the corrector of one step, the predictor of the next). Entries are
        # counted in steps so both calls of a step get the step's settings, and a repeated value is told apart by
        # the scheduler's own phase.
        matches = torch.nonzero(distances <= distances.min() + 1e-6).flatten().tolist()
        phase = 0 if getattr(scheduler, "state_in_first_order", True) else order - 1
        entry = next((m for m in matches if m % order == phase), matches[0])
        num_steps = -(-len(schedule) // order)
        index = min(entry // order, num_steps - 1)
        return StepState(timestep, index, num_steps, index / num_steps, call_in_step=entry % order)


def _pipeline_on_stack(module: torch.nn.Module) -> Any | None:
    """The pipeline whose call is running this denoiser: the patched one, or another sharing the denoiser
    (``from_pipe``, a ControlNet variant built from its components) with a scheduler of its own; ``None`` for a
    denoiser driven by the user's own loop.

    Nothing hands a denoiser its caller, so the call stack is read.
    """
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    for _ in range(_CALLER_SEARCH_DEPTH):
        if frame is None:
            break
        caller = frame.f_locals.get("self")
        if isinstance(caller, DiffusionPipeline) and any(
            getattr(caller, name, None) is module for name in _DENOISER_NAMES
        ):
            return caller
        frame = frame.f_back
    return None


def install_hook(module: torch.nn.Module, hook: ModelHook, name: str):
    """Register a diffusers ``hook`` and return an undo function that leaves no trace of it.

    diffusers' registry stays on the module and pins an instance-level ``forward`` even when emptied; undo removes
    what was not there before, so the module is exactly as before.
    """
    had_registry = hasattr(module, "_diffusers_hook")
    had_forward_attribute = "forward" in vars(module)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)

    def remove() -> None:
        # accelerate (``enable_model_cpu_offload`` after ``patch``) wraps whatever forward it finds and calls it
        # through ``module._old_forward``: unwind the registry underneath that wrapper and leave the wrapper on top.
        accelerate_outer = _accelerate_wrapper_over_registry(module)
        if accelerate_outer is not None:
            module.forward = module._old_forward
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            # With no hooks left the pinned forward is the class's own again; diffusers may have created the
            # registry itself (``cache_context`` does), so only a registry that was ours is deleted.
            if not had_forward_attribute:
                vars(module).pop("forward", None)
            if not had_registry:
                del module._diffusers_hook
        if accelerate_outer is not None:
            module._old_forward = module.forward
            module.forward = accelerate_outer

    return remove


def _accelerate_wrapper_over_registry(module: torch.nn.Module):
    """accelerate's forward wrapper when it was added over a diffusers hook registry's forward, else ``None``."""
    inner = vars(module).get("_old_forward")
    outer = vars(module).get("forward")
    if inner is None or outer is None or getattr(module, "_hf_hook", None) is None:
        return None
    wrapped = getattr(inner, "func", None)
    return outer if getattr(wrapped, "__module__", None) == HookRegistry.__module__ else None
