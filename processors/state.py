"""Per-patch facts that attention processors read: where the denoiser is in the schedule and how tokens are laid out.

A denoiser hook (see ``accel.pipelines.hooks``) writes them before every forward; processors only read. One
``PatchContext`` exists per patched model, so two pipelines patched with different settings never share state.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class StepState:
    """Where the current denoiser call sits in the sampling schedule.

    Attributes:
        timestep (`float`):
            The timestep in the scheduler's units (0..``num_train_timesteps``; FLUX's ``t / 1000`` is scaled back).
        step_index (`int | None`):
            Index of that timestep in the scheduler's full schedule, found by value, so it is right under classifier-free
            guidance (one call or two per step), img2img with ``strength < 1`` (the schedule starts late) and repeated
            generations. A second-order scheduler's (Heun, KDPM2) two calls of a step share the step's index. ``None``
            when no scheduler is known: a denoiser patched alone and called outside any pipeline.
        num_steps (`int | None`):
            Steps in the scheduler's full schedule, ``None`` without a scheduler.
        progress (`float`):
            Fraction of the schedule already done, in ``[0, 1)``: ``step_index / num_steps``; without a scheduler, the
            noise level ``1 - timestep / num_train_timesteps`` stands in.
        call_in_step (`int`):
            Which of the step's model evaluations this is: 0, or 1 for a second-order scheduler's corrector (latent
            guidance moves the latent once per step, at the first).
    """

    timestep: float
    step_index: int | None
    num_steps: int | None
    progress: float
    call_in_step: int = 0


@dataclass(frozen=True)
class LatentLayout:
    """Token layout of the denoiser's input for the current call.

    Attributes:
        grid (`tuple[int, ...] | None`):
            Visual token grid at full resolution: ``(H, W)`` latent pixels for a UNet, ``(H, W)`` patches for FLUX,
            ``(T, H, W)`` patches for HunyuanVideo. ``None`` when it cannot be told from the inputs (e.g. FLUX with
            extra conditioning tokens).
        text_tokens (`int`):
            Number of text tokens that join the visual ones in joint attention (0 for a UNet).
        text_first (`bool`):
            True where text tokens precede visual tokens in the joint sequence (FLUX), False where they follow
            (HunyuanVideo).
        batch_size (`int`):
            Batch of the denoiser call (doubled under batched classifier-free guidance).
    """

    grid: tuple[int, ...] | None
    text_tokens: int = 0
    text_first: bool = False
    batch_size: int = 1

    def level_grid(self, num_tokens: int) -> tuple[int, ...]:
        """Grid of a UNet level holding ``num_tokens`` tokens.

        UNet down-sampling convolutions use stride 2 with padding 1, so an odd side ``n`` becomes ``ceil(n / 2)``;
        the level is found by halving until the token count matches.
        """
        if self.grid is None:
            raise RuntimeError("the latent grid of this call is unknown; the denoiser hook did not record it")
        grid = self.grid
        for _ in range(8):
            if math.prod(grid) == num_tokens:
                return grid
            grid = tuple(math.ceil(side / 2) for side in grid)
        raise ValueError(f"{num_tokens} tokens do not match any down-sampled level of the latent grid {self.grid}")


class PerThread:
    """An attribute holding per-call state, kept per thread: two pipelines sharing one patched denoiser (``from_pipe``)
    may run it at once from two threads (a server's two tabs), and each call must see its own facts.

    The owner keeps a ``threading.local()`` as ``_per_thread``; a thread that has not set the attribute reads a fresh
    ``default()``, or, while the owner's state is lent (`lend_per_thread_state`) and the thread has set none of its
    own, the lending thread's value.
    """

    def __init__(self, default):
        self.default = default

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, owner_instance, owner_class=None):
        if owner_instance is None:
            return self
        calls = owner_instance._per_thread
        lent = owner_instance.__dict__.get("_lent")
        if lent is not None and not getattr(calls, "_set_here", False):
            return lent[self.name]
        try:
            return getattr(calls, self.name)
        except AttributeError:
            value = self.default()
            setattr(calls, self.name, value)
            return value

    def __set__(self, owner_instance, value) -> None:
        calls = owner_instance._per_thread
        setattr(calls, self.name, value)
        calls._set_here = True


@functools.cache
def _per_thread_names(owner_class: type) -> tuple[str, ...]:
    return tuple(
        sorted({name for klass in owner_class.__mro__ for name, v in vars(klass).items() if isinstance(v, PerThread)})
    )


@contextlib.contextmanager
def lend_per_thread_state(owners):
    """Let threads that hold no state of their own read the calling thread's, while it waits in ``torch.autograd``.

    On a GPU, torch runs the backward pass in device threads of its own, and gradient checkpointing runs checkpointed
    blocks again there: their processors and hooks must see the call's layout, step and stages, not empty defaults. A
    thread that set any state of an owner (a ``from_pipe`` sibling's call) keeps reading its own.
    """
    owners = list(owners)
    for owner in owners:
        owner.__dict__["_lent"] = {name: getattr(owner, name) for name in _per_thread_names(type(owner))}
    try:
        yield
    finally:
        for owner in owners:
            owner.__dict__.pop("_lent", None)


class PerThreadOwner:
    """Base of the classes holding `PerThread` attributes, which are parts of a live patch: a copy or pickle of a
    patched model would share undo steps bound to the original, so it is refused with the order that works."""

    def __getstate__(self) -> dict:
        raise TypeError(
            "accel: a patched model cannot be copied or pickled (its patch is bound to this model); copy it before "
            "accel.patch, or accel.unpatch it first, then patch each copy"
        )


class PatchContext(PerThreadOwner):
    """Mutable per-patch state shared by one model's hook (writer) and processors (readers).

    Attributes:
        family (`str`): the model family's name.
        step (`StepState | None`), layout (`LatentLayout | None`): the running call's facts (see those classes).
        foreign_call (`bool`): the running call comes from another pipeline sharing the denoiser (``from_pipe``);
            controls leave it alone.
        run_start (`float | None`): the progress at which the running generation entered the schedule (above 0 for
            img2img / inpaint with ``strength < 1``), so a method whose phase lies before it can say it has no part.
        scratch (`dict`): method-owned per-generation state (attention stores, caches) keyed by method name.
        warned (`set`): one-time notices already given under this patch (kept across generations).
        companions (`list`): the patch's other holders of per-thread state, lent with this one (see
            `lend_per_thread_state`).

    ``step``, ``layout``, ``foreign_call``, ``run_start`` and ``scratch`` are kept per thread (see `PerThread`); ``reset`` clears
    them for the calling thread.
    """

    step = PerThread(lambda: None)
    layout = PerThread(lambda: None)
    foreign_call = PerThread(lambda: False)
    run_start = PerThread(lambda: None)
    run_caller = PerThread(lambda: None)
    scratch = PerThread(dict)

    def __init__(self, family: str, step: StepState | None = None, layout: LatentLayout | None = None):
        self.family = family
        self._per_thread = threading.local()
        self.warned: set[tuple[str, str]] = set()
        # Other holders of this patch's per-thread state (RAU-Net's, the controls' store), lent with it.
        self.companions: list[PerThreadOwner] = []
        self.step = step
        self.layout = layout

    def enter(self, step: StepState | None, caller: int | None = None, schedule: object | None = None) -> None:
        """Make ``step`` the running call's. A generation starts at a step earlier in the schedule than the last one,
        at a call from another pipeline (``caller``: its id; a refiner taking over at ``denoising_start``), or on a
        schedule the scheduler made anew (``schedule``: its ``timesteps``, which pipelines set at every call, so a
        run entering where the last one stopped is told apart too)."""
        previous, self.step = self.step, step
        previous_caller, self.run_caller = self.run_caller, (caller, schedule)
        if step is not None and (
            self.run_start is None
            or previous is None
            or step.progress < previous.progress
            or previous_caller is None
            or caller != previous_caller[0]
            or schedule is not previous_caller[1]
        ):
            self.run_start = step.progress

    def notice_run_past(self, logger, method: str, phase: str, consequence: str, setting: str) -> None:
        """Say once per patch and entry point that the running generation entered the schedule (img2img / inpaint
        ``strength``, ``denoising_start``) after ``phase`` of ``method`` ended: methods follow the noise level, so
        such a run lacks that phase, which looks like the method doing nothing."""
        notice = (method, f"run past {phase} {self.run_start:.3f}")
        if notice in self.warned:
            return
        self.warned.add(notice)
        logger.warning(
            "%s: this run enters the schedule at %.2f (img2img / inpaint strength or denoising_start), past %s, so "
            "%s (%s above %.2f, or a larger strength, brings it in)",
            method,
            self.run_start,
            phase,
            consequence,
            setting,
            self.run_start,
        )

    def reset(self) -> None:
        self.step = None
        self.layout = None
        self.foreign_call = False
        self.run_start = None
        self.run_caller = None
        self.scratch.clear()
