"""The guidance loop of A-STAR and Attend-and-Excite, run from inside ``pipe(...)`` (SD 1.x / 2.x and FLUX).

Before each denoiser call of a guided step, a hook on the denoiser runs one extra forward of the prompt's rows with
gradients, reads the recorded text-attention maps, and moves the latent down the loss gradient
(``z ← z − α_t ∇z L``). The denoiser call itself then sees the updated latent, and the scheduler steps from it: a shim
on ``pipe.scheduler.step`` adds the same update to the latents the pipeline hands it (installed on whichever
scheduler the pipeline holds at the time, so swapping schedulers keeps working; all are restored by unpatch). The
subject tokens are found in the prompt when the pipeline encodes it (``encode_prompt`` is wrapped while patched).

What differs between the families:
- SD's UNet takes ``sample`` and, under classifier-free guidance, one batch ``[negative, prompt]``: the update is
  computed on the prompt rows and added to every row. Its cross-attention layers record probabilities.
- FLUX's transformer takes packed latents ``hidden_states`` ``[B, S, C]`` and no guidance batch (guidance-distilled);
  the flow-matching scheduler does not scale the model input. Its recorded joint layers hand over the image-query x
  text-key map renormalised over the prompt's T5 tokens (no BOS; EOS and padding follow). With true CFG
  (``true_cfg_scale > 1``) FLUX encodes the negative prompt in a second ``encode_prompt`` call and runs it in a
  second transformer call, named ``"uncond"`` by diffusers' cache context: that call is never guided but gets the
  step's update too, so both calls see the same latent.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils import logging

from accel.errors import InvalidOptionError
from accel.kernels import controls
from accel.pipelines.hooks import EAGER_HOOK_REASON, STEP_HOOK_NAME
from accel.pipelines.prompts import (
    head_noun_positions,
    noun_phrases,
    observe_encode_prompt,
    phrase_positions,
    prompt_span,
    prompt_words,
    word_positions,
)
from accel.processors.controls import (
    CrossAttentionStore,
    RecordingComplete,
    RecordingPlan,
    RecordingPlanMismatch,
)
from accel.processors.state import PatchContext, lend_per_thread_state

GUIDANCE_HOOK_NAME = "accel_latent_guidance"

# Attend-and-Excite's iterative refinement: at the first step at or past each fraction of the schedule (its steps 0,
# 10 and 20 of 50), the update repeats until every subject's smoothed peak reaches the threshold, at most 20 times.
REFINEMENT_THRESHOLDS = ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8))
MAX_REFINEMENTS = 20

logger = logging.get_logger(__name__)


@dataclass
class PromptEncoding:
    """One ``encode_prompt`` call: its prompt embeddings and what a method derived from the prompt text.

    ``error`` is raised when a denoiser call uses these embeddings (not at encoding: FLUX encodes a true-CFG
    negative prompt through the same function, and the subjects need not be in it).
    """

    embeds: torch.Tensor
    data: Any = None
    error: Exception | None = None


class RecentEncodings:
    """The last few encodings of a pipeline (FLUX with true CFG encodes prompt and negative prompt separately)."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.items: list[PromptEncoding] = []

    def add(self, encoding: PromptEncoding) -> None:
        self.items = [*self.items, encoding][-self.keep :]

    def match(self, text: torch.Tensor | None) -> tuple[PromptEncoding, bool] | None:
        """The latest encoding whose embeddings are ``text`` (or its last rows, under a classifier-free-guidance
        batch), with whether ``text`` holds a guidance batch."""
        if text is None:
            return None
        for encoding in reversed(self.items):
            embeds = encoding.embeds
            rows = embeds.shape[0]
            if text.shape[0] not in (rows, 2 * rows) or text.shape[1:] != embeds.shape[1:]:
                continue
            if torch.equal(text[-rows:], embeds.to(text)):
                return encoding, text.shape[0] == 2 * rows
        return None


class CacheContextName(StateManager):
    """Receives the name diffusers pipelines give a denoiser call (``"cond"`` / ``"uncond"``) through
    ``model.cache_context(...)``; a hook holding one must be stateful (``_is_stateful = True``)."""

    def __init__(self):
        super().__init__(BaseState)
        self.name: str | None = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.name = getattr(context, "name", context)

    def reset(self, *args, **kwargs) -> None:
        super().reset(*args, **kwargs)
        self.name = None


@dataclass(frozen=True)
class DenoiserInputs:
    """Where a family's denoiser takes its latent, and the tokenizer its prompt positions are counted in."""

    latent: str  # the latent argument of the denoiser's forward
    tokenizer: str  # the pipeline component whose tokens the text-attention maps index
    text_argument: str  # encode_prompt's argument holding that tokenizer's text (FLUX: prompt_2, else prompt)
    max_length: str | None  # encode_prompt's argument with the encoded length (FLUX: max_sequence_length)
    joint: bool  # joint attention: maps renormalised over the prompt's own tokens while recording


DENOISER_INPUTS = {
    "unet": DenoiserInputs(
        latent="sample", tokenizer="tokenizer", text_argument="prompt", max_length=None, joint=False
    ),
    "flux": DenoiserInputs(
        latent="hidden_states",
        tokenizer="tokenizer_2",
        text_argument="prompt_2",
        max_length="max_sequence_length",
        joint=True,
    ),
}


@dataclass
class GuidanceState:
    """What one patch's guidance loop carries between calls."""

    store: CrossAttentionStore
    loss: str
    step_size: float
    guided_steps: float
    refine: bool
    threshold: float
    sharpness: float
    tokens: list[str | int] | None
    subjects: str
    encodings: RecentEncodings = field(default_factory=RecentEncodings)
    # The prompt rows of the latest guided call: subjects' token positions and the prompt's own token span.
    positions: list[list[tuple[int, ...]]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    previous_regions: dict[int, torch.Tensor] = field(default_factory=dict)  # per prompt row
    # (model timestep, latent-space update) for the scheduler step of the guided call's own step
    pending_update: tuple[Any, torch.Tensor] | None = None
    step_update: tuple[int, torch.Tensor] | None = None  # (step index, model-input update) for further calls
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss before the update), last call
    # (step, repeats, loss where the last update was taken) at A&E's refinement steps, last call
    refinements: list[tuple[int, int, float]] = field(default_factory=list)
    wrapped_schedulers: list[Any] = field(default_factory=list)
    # (latent shape, plan) from the latest whole recording pass; later passes stop where the plan's maps end
    recording_plan: tuple[tuple[int, ...], RecordingPlan | None] | None = None
    stop_passes_early: bool = True


@dataclass(frozen=True)
class PromptRows:
    """Per prompt row of an encoding: the subjects' token positions and the prompt's own token span."""

    positions: list[list[tuple[int, ...]]]
    spans: list[tuple[int, int]]


def encoded_text(arguments: dict, inputs: DenoiserInputs) -> str | list[str] | None:
    """The text the denoiser's text tokens come from (FLUX: ``prompt_2`` for T5 when given, else ``prompt``)."""
    text = arguments.get(inputs.text_argument)
    return arguments.get("prompt") if text is None else text


def encode_prompt_wrapper(pipe, state: GuidanceState, inputs: DenoiserInputs):
    """Wraps ``pipe.encode_prompt``: records the prompt embeddings with the subjects' token positions."""

    def observe(out, arguments, original):
        state.previous_regions.clear()
        state.losses = []
        state.refinements = []
        # A call interrupted between its guided forward and the scheduler step leaves an update behind; a new call
        # must not start from it.
        state.pending_update = None
        state.step_update = None
        text = encoded_text(arguments, inputs)
        if text is None:
            error = InvalidOptionError(
                f"{state.loss}: the subject tokens are found in the prompt text; pass prompt=... instead of "
                "prompt_embeds (or unpatch)"
            )
            state.encodings.add(PromptEncoding(out[0], error=error))
            return
        second = arguments.get("prompt_2")
        if inputs.text_argument == "prompt" and second is not None and second != text:
            # SDXL concatenates its two encoders' features token by token: the maps' token positions are one
            # text's only when both encoders read the same text.
            error = InvalidOptionError(
                f"{state.loss}: on SDXL both text encoders must read the same text for the subjects' token "
                "positions to hold; leave prompt_2 unset (or equal to prompt)"
            )
            state.encodings.add(PromptEncoding(out[0], error=error))
            return
        max_length = arguments.get(inputs.max_length) if inputs.max_length else None
        try:
            tokenizer = getattr(pipe, inputs.tokenizer)
            rows = prompt_rows(tokenizer, text, out[0].shape[0], state.tokens, max_length, state.subjects)
        except InvalidOptionError as error:
            state.encodings.add(PromptEncoding(out[0], error=error))
        else:
            state.encodings.add(PromptEncoding(out[0], data=rows))

    return observe_encode_prompt(observe)


def prompt_rows(
    tokenizer,
    text: str | list[str],
    rows: int,
    tokens: list[str | int] | None,
    max_length: int | None,
    subjects: str = "nouns",
) -> PromptRows:
    prompts = [text] if isinstance(text, str) else list(text)
    per_prompt = rows // len(prompts)
    positions, spans = [], []
    for prompt in prompts:
        # The defaults give [] for a prompt without noun phrases.
        if tokens is not None:
            found = word_positions(tokenizer, prompt, tokens, max_length)
        else:
            found = (phrase_positions if subjects == "phrases" else head_noun_positions)(tokenizer, prompt, max_length)
            phrases = noun_phrases(prompt)
            fitting = len(prompt_words(tokenizer, prompt, max_length))
            cut = sum(phrase.words[1] > fitting for phrase in phrases)
            if cut:
                logger.warning(
                    "%d of the %d noun phrases of %r lie past the %d tokens the text encoder reads and are not "
                    "guided; shorten the prompt or name the subjects with tokens=[...]",
                    cut,
                    len(phrases),
                    prompt,
                    max_length or tokenizer.model_max_length,
                )
        span = prompt_span(tokenizer, prompt, max_length)
        positions += [found] * per_prompt
        spans += [span] * per_prompt
    return PromptRows(positions, spans)


class LatentGuidanceHook(ModelHook):
    """On the denoiser: the latent update before each guided call (see the module docstring)."""

    # Stateful so that diffusers hands it the cache context (the name of FLUX's true-CFG negative call).
    _is_stateful = True
    _warned_no_subjects = False
    _warned_unmatched = False

    def __init__(self, state: GuidanceState, context: PatchContext, pipeline, inputs: DenoiserInputs):
        super().__init__()
        self.state = state
        self.context = context
        # Weak, so a patched denoiser (which a from_pipe sibling may hold) never keeps its pipeline alive.
        self._pipeline = weakref.ref(pipeline)
        self.inputs = inputs
        self.call_name = CacheContextName()

    @property
    def pipeline(self):
        return self._pipeline()

    def initialize_hook(self, module):
        self._signature = inspect.signature(module.forward)
        return module

    def reset_state(self, module):
        self.state.pending_update = None
        self.state.step_update = None
        return module

    def new_forward(self, module, *args, **kwargs):
        args, kwargs = self._guided_inputs(module, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    # Under torch.compile the guidance (prompt matching, the guided passes with their autograd.grad, the latent
    # update) runs eagerly, as one graph break before the denoiser's compiled forward: its passes stop early and record
    # maps, which a compiled graph cannot do.
    @torch.compiler.disable(reason=EAGER_HOOK_REASON)
    def _guided_inputs(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments of this denoiser call: as given, or with the latent moved by this step's update."""
        forward = self.fn_ref.original_forward
        state = self.state
        # accel's step hook sits inside this one; let it read this call's step and layout first.
        step_hook = module._diffusers_hook.get_hook(STEP_HOOK_NAME)
        if step_hook is not None:
            step_hook.pre_forward(module, *args, **kwargs)
        step = self.context.step
        arguments = self._signature.bind(*args, **kwargs).arguments
        latent, text = arguments[self.inputs.latent], arguments.get("encoder_hidden_states")
        # A call from a sibling, or after the patched pipeline itself is gone, is not this patch's to guide.
        foreign = self.context.foreign_call or self.pipeline is None
        matched = None if self.call_name.name == "uncond" or foreign else state.encodings.match(text)
        if matched is None:
            if not foreign and self._follows_step_update(arguments, step):
                return (), arguments
            if self.call_name.name != "uncond" and text is not None and not self._warned_unmatched:
                logger.warning(
                    "%s: the denoiser was called by another pipeline sharing it (e.g. one made with from_pipe) or "
                    "with text embeddings its patched pipeline did not encode (a direct call), so nothing is "
                    "guided; patch the pipeline you call",
                    state.loss,
                )
                self._warned_unmatched = True
            return args, kwargs
        encoding, guidance_batch = matched
        if encoding.error is not None:
            raise encoding.error
        state.positions, state.spans = encoding.data.positions, encoding.data.spans
        guided = (
            state.step_size > 0
            and step is not None
            and step.step_index is not None
            and step.call_in_step == 0
            and step.progress < state.guided_steps
        )
        if not guided:
            run_start = self.context.run_start
            if state.step_size > 0 and run_start and run_start >= state.guided_steps > 0:
                self.context.notice_run_past(
                    logger, state.loss, f"guided_steps={state.guided_steps:.2f}", "no step is guided", "guided_steps"
                )
            return args, kwargs
        if not any(state.positions):
            if not self._warned_no_subjects:
                logger.warning(
                    "%s: the prompt has no noun phrase to take subjects from, so nothing is guided; name them with "
                    "tokens=[...]",
                    state.loss,
                )
                self._warned_no_subjects = True
            return args, kwargs
        if step.step_index == 0:
            state.previous_regions.clear()
        rows = encoding.embeds.shape[0]
        update = self._update(forward, arguments, rows, guidance_batch, step)
        scale = self._input_scale(arguments["timestep"], latent)
        timestep = arguments["timestep"]
        if self.inputs.joint:
            state.pending_update = (timestep, update / scale)
        else:
            # An inpainting UNet's input is the latent plus mask and masked-image channels: only the latent moves.
            update[:, module.config.out_channels :] = 0
            state.pending_update = (timestep, update[:, : module.config.out_channels] / scale)
        state.step_update = (step.step_index, update)
        self._ensure_step_shim()
        arguments[self.inputs.latent] = latent + _repeat_rows(update, latent)
        return (), arguments

    def _follows_step_update(self, arguments: dict, step) -> bool:
        """Another call of a guided step (FLUX's true-CFG negative pass) gets the same moved latent."""
        moved = self.state.step_update
        latent = arguments[self.inputs.latent]
        if moved is None or step is None or moved[0] != step.step_index or moved[1].shape[1:] != latent.shape[1:]:
            return False
        if step.call_in_step:  # a second-order corrector starts from the moved latent's prediction already
            return False
        if latent.shape[0] % moved[1].shape[0]:
            return False
        arguments[self.inputs.latent] = latent + _repeat_rows(moved[1].to(latent), latent)
        return True

    def _update(self, forward, arguments: dict, rows: int, guidance_batch: bool, step) -> torch.Tensor:
        """The latent step ``−α ∇L`` for the prompt rows (model-input space); at A&E's refinement steps, repeated
        until the loss meets the step's target (see `refinement_target`)."""
        state = self.state
        name = self.inputs.latent
        conditional = {key: _last_rows(value, rows) for key, value in arguments.items()} if guidance_batch else {}
        conditional = {**arguments, **conditional}
        start = conditional[name].detach()
        alpha = controls.step_size(state.step_size, step.progress)
        target = refinement_target(step) if state.refine else None
        # Under torch.inference_mode (as accel compare and many apps call pipelines) no tensor can join autograd:
        # leave it for this pass, and take ordinary copies of the inputs.
        with torch.inference_mode(False), torch.enable_grad():
            conditional = {key: _ordinary(value) for key, value in conditional.items()}
            start = _ordinary(start)
            update = torch.zeros_like(start)
            for repeat in range(MAX_REFINEMENTS + 1):
                losses, gradient, regions = self._guided_loss(forward, conditional, start + update, rows)
                if repeat == 0:
                    state.losses.append((step.step_index, sum(losses)))
                update = update - alpha * gradient
                # Every prompt row must meet the target, as each would in a run of its own.
                if target is None or max(losses) <= target or repeat == MAX_REFINEMENTS:
                    break
        if target is not None:
            state.refinements.append((step.step_index, repeat, max(losses)))
        # This step's regions (from the point the update was taken at) are what the next step retains.
        state.previous_regions.update(regions)
        return update

    def _guided_loss(self, forward, conditional: dict, latent: torch.Tensor, rows: int):
        """The loss at ``latent`` of each prompt row with subjects, the gradient of their sum, and the retention
        regions each row yields (A-STAR's). Runs with gradients enabled."""
        state = self.state
        latent = latent.detach().requires_grad_()
        # Joint attention (FLUX) renormalises its maps over the prompt's own tokens; a UNet's are probabilities.
        spans = state.spans if self.inputs.joint else None
        maps = self._recorded_maps(forward, {**conditional, self.inputs.latent: latent}, spans)
        regions = {}
        # Row by row: prompts of one batch may name different numbers of subjects (or none).
        losses = []
        for i in range(rows):
            if state.positions[i]:
                concepts = controls.concept_maps(maps[i : i + 1], state.positions[i], state.spans[i], state.sharpness)
                row_loss, row_regions = self._loss(concepts, i)
                losses.append(row_loss)
                if row_regions is not None:
                    regions[i] = row_regions
        loss = torch.cat(losses).sum()
        # One subject and nothing retained yet (A-STAR's first step): the loss is a constant 0.
        gradient = torch.zeros_like(latent)
        if loss.requires_grad:
            # For blocks that gradient checkpointing runs again, on a GPU in torch's own threads.
            with state.store.replay(text_spans=spans), lend_per_thread_state([self.context, *self.context.companions]):
                gradient = torch.autograd.grad(loss, latent)[0]
        return [float(row_loss.detach()) for row_loss in losses], gradient.detach(), regions

    def _recorded_maps(self, forward, arguments: dict, spans: list[tuple[int, int]] | None) -> torch.Tensor:
        """The aggregated maps of one forward with gradients. The first pass at a latent shape runs whole and leaves
        a plan; later passes at that shape (this call's and later calls') follow it: the levels the loss does not
        read run SDPA, and the pass ends after the last layer it reads (SD 1.5 at 512²: up_blocks.1, so half the
        forward and its activations are skipped). A pass that strays from the plan runs again whole and replaces it.
        """
        state, store = self.state, self.state.store
        shape = tuple(arguments[self.inputs.latent].shape)
        planned = state.recording_plan
        plan = planned[1] if planned is not None and planned[0] == shape and state.stop_passes_early else None
        if plan is not None:
            with store.record(text_spans=spans, plan=plan):
                try:
                    forward(**arguments)
                except RecordingComplete:
                    maps = store.aggregate(plan.grid)
                    store.maps.clear()
                    return maps
                except RecordingPlanMismatch:
                    pass
        with store.record(text_spans=spans):
            forward(**arguments)
        maps = store.aggregate()
        state.recording_plan = (shape, store.whole_pass_plan())
        store.maps.clear()
        return maps

    def _loss(self, concepts: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt row's loss, and the regions A-STAR's retention keeps from it (``None`` for A&E)."""
        state = self.state
        if state.loss == "attend_excite":
            return controls.attend_excite_loss(concepts), None
        maps = controls.segregation_maps(concepts)
        loss = controls.segregation_loss(maps)
        previous = state.previous_regions.get(row)
        if previous is not None and previous.shape == maps.shape:
            loss = loss + controls.retention_loss(maps, previous)
        return loss, controls.binarise(maps, state.threshold)

    def _input_scale(self, timestep, sample) -> float:
        """The scheduler's model-input scaling at ``timestep`` (1 for DDIM / PNDM and flow matching, which has no
        ``scale_model_input``; 1/sqrt(σ²+1) for Euler)."""
        scheduler = self.pipeline.scheduler
        if not hasattr(scheduler, "scale_model_input"):
            return 1.0
        probe = torch.ones(1, dtype=sample.dtype, device=sample.device)
        return float(scheduler.scale_model_input(probe, timestep))

    def _ensure_step_shim(self) -> None:
        scheduler = self.pipeline.scheduler
        if getattr(scheduler.step, "_accel_guidance", None) is self.state:
            return
        original = scheduler.step
        state = self.state
        # A step the user set on the instance (a wrapper of their own) comes back on unpatch, not the class's.
        own_step = vars(scheduler).get("step", _NO_OWN_STEP)

        scheduler.step = _GuidedStep(original, state, own_step)
        state.wrapped_schedulers.append((scheduler, own_step))


class _GuidedStep:
    """The scheduler's step, adding the guided call's latent update first.

    The original's signature shows through (``__wrapped__``): pipelines pass ``eta`` and ``generator`` only to a step
    that names them (``prepare_extra_step_kwargs`` reads it). A deep copy of the scheduler (taken mid-run, e.g. to
    restart from it) gets a plain step of its own, not this one, which would step the original scheduler.
    """

    def __init__(self, original, state: GuidanceState, own_step):
        functools.update_wrapper(self, original)
        self._original = original
        self._accel_guidance = state
        self._own_step = own_step

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        state = self._accel_guidance
        pending, state.pending_update = state.pending_update, None
        # The step ends here: no later call (another pipeline's, a direct one) may follow its update.
        state.step_update = None
        if pending is not None and _same_timestep(pending[0], timestep):
            sample = sample + _repeat_rows(pending[1].to(sample), sample)
        return self._original(model_output, timestep, sample, *args, **kwargs)

    def __deepcopy__(self, memo):
        scheduler = getattr(self._original, "__self__", None)
        copied = memo.get(id(scheduler)) if scheduler is not None else None
        if self._own_step is not _NO_OWN_STEP or copied is None:
            return self._own_step if self._own_step is not _NO_OWN_STEP else self._original
        return type(copied).step.__get__(copied)


def refinement_target(step) -> float | None:
    """The A&E loss a refinement step repeats its update down to (``1 − threshold``), or ``None`` for an ordinary
    step. Each refinement falls on the first step at or past its fraction of the schedule, so any step count (and an
    img2img run that enters late, which skips the earlier ones) keeps A&E's timing."""
    for fraction, threshold in REFINEMENT_THRESHOLDS:
        if step.step_index == math.ceil(fraction * step.num_steps - 1e-9):
            return 1.0 - threshold
    return None


def default_recorded_layers(sites: list) -> set[str]:
    """FLUX: the middle third of all blocks, double and single stream together in model order (LORE reads 8-43 of
    FLUX's 57); at least one."""
    count = len(sites)
    first, end = round(count / 3), round(2 * count / 3)
    chosen = sites[first:end] or sites[count // 2 : count // 2 + 1]
    return {site.name for site in chosen}


_NO_OWN_STEP = object()


def remove_step_shims(state: GuidanceState) -> None:
    for scheduler, own_step in reversed(state.wrapped_schedulers):
        if own_step is _NO_OWN_STEP:
            vars(scheduler).pop("step", None)
        else:
            scheduler.step = own_step
    state.wrapped_schedulers.clear()
    state.pending_update = None
    state.step_update = None


def _same_timestep(model_timestep, step_timestep) -> bool:
    """Whether the scheduler step is the guided call's (FLUX hands the model ``t / 1000``, the scheduler ``t``; in
    bf16 the model's is rounded, hence the 1 %)."""
    model = float(torch.as_tensor(model_timestep).flatten()[0])
    stepped = float(torch.as_tensor(step_timestep).flatten()[0])
    return any(abs(model * scale - stepped) <= 0.01 * max(1.0, abs(stepped)) for scale in (1.0, 1000.0))


def _repeat_rows(update: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``update`` (the prompt rows) repeated over ``like``'s batch (a guidance batch holds them twice)."""
    return update.repeat(like.shape[0] // update.shape[0], *([1] * (like.ndim - 1)))


def _last_rows(value, rows: int):
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] in (rows, 2 * rows):
        return value[-rows:]
    if isinstance(value, dict):
        return {key: _last_rows(item, rows) for key, item in value.items()}
    if isinstance(value, list | tuple):  # ControlNet's residuals
        return type(value)(_last_rows(item, rows) for item in value)
    return value


def _ordinary(value):
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {key: _ordinary(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_ordinary(item) for item in value)
    return value
