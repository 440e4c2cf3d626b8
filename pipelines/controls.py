"""The guidance loop of A-STAR and Attend-and-Excite on Stable Diffusion pipelines, run from inside ``pipe(...)``.

Before each UNet call of a guided step, a hook on the UNet runs one extra forward on the conditional latent with
gradients, reads the recorded cross-attention maps, and moves the latent down the loss gradient
(``z ← z − α_t ∇z L``). The UNet call itself then sees the updated latent, and the scheduler steps from it: a shim on
``pipe.scheduler.step`` adds the same update to the latents the pipeline hands it (installed on whichever scheduler
the pipeline holds at the time, so swapping schedulers keeps working; all are restored by unpatch). The subject
tokens are found in the prompt when the pipeline encodes it (``encode_prompt`` is wrapped while patched).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from accel.errors import InvalidOptionError
from accel.kernels import controls
from accel.pipelines.hooks import STEP_HOOK_NAME
from accel.pipelines.prompts import noun_phrases, word_positions
from accel.processors.controls import CrossAttentionStore
from accel.processors.state import PatchContext

GUIDANCE_HOOK_NAME = "accel_latent_guidance"


@dataclass
class GuidanceState:
    """What one patch's guidance loop carries between calls."""

    store: CrossAttentionStore
    loss: str
    step_size: float
    guided_steps: float
    threshold: float
    sharpness: float
    tokens: list[str | int] | None
    prompt_embeds: torch.Tensor | None = None
    positions: list[list[tuple[int, ...]]] = field(default_factory=list)  # per prompt row
    prompt_tokens: list[int] = field(default_factory=list)
    previous_regions: torch.Tensor | None = None
    pending_update: torch.Tensor | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss before the update), last call
    wrapped_schedulers: list[Any] = field(default_factory=list)


def subject_words(prompt: str) -> list[str]:
    """Default subjects: the last word (head noun) of each noun phrase of the prompt."""
    return [phrase.text.split()[-1] for phrase in noun_phrases(prompt)]


def encode_prompt_wrapper(pipe, state: GuidanceState):
    """Wraps ``pipe.encode_prompt``: records the conditional embeddings and the subjects' token positions."""

    def wrap(original):
        signature = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            out = original(*args, **kwargs)
            arguments = signature.bind(*args, **kwargs).arguments
            prompt = arguments.get("prompt")
            if prompt is None:
                raise InvalidOptionError(
                    f"{state.loss}: the subject tokens are found in the prompt text; pass prompt=... instead of "
                    "prompt_embeds (or unpatch)"
                )
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            per_prompt = out[0].shape[0] // len(prompts)
            state.positions, state.prompt_tokens = [], []
            for text in prompts:
                words = state.tokens if state.tokens is not None else subject_words(text)
                positions = word_positions(pipe.tokenizer, text, words)
                tokens = len(pipe.tokenizer(text, truncation=True)["input_ids"]) - 1
                state.positions += [positions] * per_prompt
                state.prompt_tokens += [tokens] * per_prompt
            state.prompt_embeds = out[0]
            state.previous_regions = None
            state.losses = []
            return out

        return encode_prompt

    return wrap


class LatentGuidanceHook(ModelHook):
    """On the UNet: the latent update before each guided call (see the module docstring)."""

    def __init__(self, state: GuidanceState, context: PatchContext, pipeline):
        super().__init__()
        self.state = state
        self.context = context
        self.pipeline = pipeline

    def initialize_hook(self, module):
        self._signature = inspect.signature(module.forward)
        return module

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        state = self.state
        # accel's step hook sits inside this one; let it read this call's step and layout first.
        step_hook = module._diffusers_hook.get_hook(STEP_HOOK_NAME)
        if step_hook is not None:
            step_hook.pre_forward(module, *args, **kwargs)
        step = self.context.step
        arguments = self._signature.bind(*args, **kwargs).arguments
        sample, text = arguments["sample"], arguments.get("encoder_hidden_states")
        rows = 0 if state.prompt_embeds is None else state.prompt_embeds.shape[0]
        guided = (
            state.step_size > 0
            and rows
            and text is not None
            and text.shape[0] in (rows, 2 * rows)
            and torch.equal(text[-rows:], state.prompt_embeds.to(text))
            and step is not None
            and step.step_index is not None
            and step.progress < state.guided_steps
        )
        if not guided:
            return forward(*args, **kwargs)
        if step.step_index == 0:
            state.previous_regions = None
        update = self._update(forward, arguments, rows, step)
        scale = self._input_scale(arguments["timestep"], sample)
        state.pending_update = update / scale
        self._ensure_step_shim()
        repeats = sample.shape[0] // rows
        arguments["sample"] = sample + update.repeat(repeats, *([1] * (sample.ndim - 1)))
        return forward(**arguments)

    def _update(self, forward, arguments: dict, rows: int, step) -> torch.Tensor:
        """The latent step ``−α ∇L`` for the conditional rows (model-input space)."""
        state = self.state
        conditional = {key: _last_rows(value, rows) for key, value in arguments.items()}
        latent = conditional["sample"].detach()
        # Under torch.inference_mode (as accel compare and many apps call pipelines) no tensor can join autograd:
        # leave it for this pass, and take ordinary copies of the inputs.
        with torch.inference_mode(False), torch.enable_grad():
            conditional = {key: _ordinary(value) for key, value in conditional.items()}
            latent = latent.clone().requires_grad_()
            conditional["sample"] = latent
            with state.store.record():
                forward(**conditional)
            maps = state.store.aggregate()
            concepts = torch.cat(
                [
                    controls.concept_maps(maps[i : i + 1], state.positions[i], state.prompt_tokens[i], state.sharpness)
                    for i in range(rows)
                ]
            )
            loss = self._loss(concepts)
            (gradient,) = torch.autograd.grad(loss.sum(), latent)
        state.store.maps.clear()
        state.losses.append((step.step_index, float(loss.sum())))
        alpha = state.step_size * math.sqrt(1 - 0.5 * step.progress)
        return -alpha * gradient.detach()

    def _loss(self, concepts: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.loss == "attend_excite":
            return controls.attend_excite_loss(concepts)
        normalised = controls.normalise(concepts)
        loss = controls.segregation_loss(normalised)
        if state.previous_regions is not None and state.previous_regions.shape == normalised.shape:
            loss = loss + controls.retention_loss(normalised, state.previous_regions)
        # This step's regions are what the next step retains.
        state.previous_regions = controls.binarise(concepts, state.threshold)
        return loss

    def _input_scale(self, timestep, sample) -> float:
        """The scheduler's model-input scaling at ``timestep`` (1 for DDIM / PNDM, 1/sqrt(σ²+1) for Euler)."""
        scheduler = self.pipeline.scheduler
        probe = torch.ones(1, dtype=sample.dtype, device=sample.device)
        return float(scheduler.scale_model_input(probe, timestep))

    def _ensure_step_shim(self) -> None:
        scheduler = self.pipeline.scheduler
        if getattr(scheduler.step, "_accel_guidance", None) is self.state:
            return
        original = scheduler.step
        state = self.state

        def step(model_output, timestep, sample, *args, **kwargs):
            update, state.pending_update = state.pending_update, None
            if update is not None:
                sample = sample + update.to(sample).repeat(sample.shape[0] // update.shape[0], 1, 1, 1)
            return original(model_output, timestep, sample, *args, **kwargs)

        step._accel_guidance = state
        scheduler.step = step
        state.wrapped_schedulers.append(scheduler)


def remove_step_shims(state: GuidanceState) -> None:
    for scheduler in state.wrapped_schedulers:
        vars(scheduler).pop("step", None)
    state.wrapped_schedulers.clear()
    state.pending_update = None


def _last_rows(value, rows: int):
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] in (rows, 2 * rows):
        return value[-rows:]
    if isinstance(value, dict):
        return {key: _last_rows(item, rows) for key, item in value.items()}
    return value


def _ordinary(value):
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {key: _ordinary(item) for key, item in value.items()}
    return value
