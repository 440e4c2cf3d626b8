"""``accel.patch`` / ``accel.unpatch``: swap a diffusers denoiser's attention, and restore it bit for bit."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from accel.config import MethodConfig
from accel.errors import InvalidOptionError, PatchConflictError, UnsupportedModelError
from accel.pipelines.families import FAMILIES, ModelFamily, detect_family
from accel.pipelines.hooks import STEP_HOOK_NAME, StepStateHook, install_hook
from accel.plan import PatchPlan
from accel.processors.state import PatchContext
from accel.registry import method_info, methods

DEFAULT_METHOD = "dense"
_HANDLE_ATTRIBUTE = "_accel_patch"
MethodSpec = str | MethodConfig


class PatchHandle:
    """A live patch on one denoiser. ``remove()`` (or ``accel.unpatch``) restores the model exactly.

    Attributes:
        configs: the method configs applied, in order.
        family: the model family name (``"unet"``, ``"flux"``, ``"hunyuanvideo"``).
        context: the per-patch `PatchContext` (step and layout facts of the latest denoiser call).
        layers: module names of the attention layers whose processor was replaced, with the method that owns each.
    """

    def __init__(self, denoiser, family: ModelFamily, configs, context, originals, layers, undo, pipeline=None):
        self._denoiser = denoiser
        # Weak, like the step hook's: a handle on the denoiser must not keep its pipeline alive.
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.family = family.name
        self.configs: tuple[MethodConfig, ...] = tuple(configs)
        self.context: PatchContext = context
        self.layers: dict[str, str] = layers
        self._originals: dict[str, Any] = originals
        self._undo = undo
        self._installed: dict[str, Any] = {}
        self.active = True

    def remove(self) -> None:
        """Restore the original processors, remove accel's hooks and attributes. Idempotent."""
        if not self.active:
            return
        denoiser = self._denoiser
        denoiser.set_attn_processor(self._processors_without_accel())
        # fuse_qkv_projections while patched saved accel's processors for unfuse_qkv_projections to put back.
        saved = getattr(denoiser, "original_attn_processors", None)
        if isinstance(saved, dict):
            for key, processor in saved.items():
                if processor is self._installed.get(key):
                    saved[key] = self._originals[key]
        for undo in reversed(self._undo):
            undo()
        if getattr(denoiser, _HANDLE_ATTRIBUTE, None) is self:
            delattr(denoiser, _HANDLE_ATTRIBUTE)
        self.context.reset()
        self.active = False

    def _processors_without_accel(self) -> dict[str, Any]:
        """The denoiser's processors with accel's replaced by those it found; a processor set since (an IP-Adapter,
        attention slicing, the user's own) is the user's, and stays."""
        installed = self._installed
        restored = {}
        for key, now in self._denoiser.attn_processors.items():
            original = self._originals.get(key, now)
            if now is not installed.get(key, original):
                restored[key] = now
                continue
            # diffusers' switches used while patched (set_attention_backend, enable_parallelism) reached accel's
            # processors; the restored ones must keep them, or a context-parallel model would attend locally.
            for attribute in _CARRIED_ATTRIBUTES:
                value = getattr(now, attribute, None)
                if value is not None and getattr(original, attribute, None) is None and hasattr(original, attribute):
                    setattr(original, attribute, value)
            restored[key] = original
        return restored

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        methods = ", ".join(repr(c) for c in self.configs)
        state = "active" if self.active else "removed"
        return f"PatchHandle({self.family}, [{methods}], {len(self.layers)} layers, {state})"


def patch(target: Any, method: MethodSpec | Sequence[MethodSpec] | None = None, **options: Any) -> PatchHandle:
    """Replace the attention of a diffusers pipeline's denoiser (or of a bare denoiser) with an accel method.

    Args:
        target: a ``DiffusionPipeline`` with a ``unet`` or ``transformer``, or the denoiser itself
            (``UNet2DConditionModel``, ``FluxTransformer2DModel``, ``HunyuanVideoTransformer3DModel``).
        method: a registered method name (see ``accel.methods()``), a config instance (e.g. ``accel.DenseConfig()``),
            or a list of them applied together. Defaults to ``"dense"``.
        **options: fields of the method's config, e.g. ``layers=r".*attn1"``; only with a single method.

    Returns:
        A `PatchHandle`; ``handle.remove()`` or ``accel.unpatch(target)`` restores the model bit for bit.
        Patching an already patched model replaces the previous patch (it never stacks).

    Example::

        pipe = accel.load_pipeline("sd15-tiny")
        with accel.patch(pipe, "dense"):
            image = pipe("a red circle", num_inference_steps=4).images[0]
    """
    pipeline, denoiser = _resolve_target(target)
    family = detect_family(denoiser)
    compiled = getattr(denoiser, "_orig_mod", None)
    if family is None and isinstance(compiled, torch.nn.Module) and detect_family(compiled) is not None:
        # torch.compile's wrapper: the processors live on the module it wraps, and a graph already traced would not
        # see them change.
        raise UnsupportedModelError(
            f"the denoiser is torch.compile's wrapper around a {type(compiled).__name__}; patch before compiling: "
            "accel.patch(pipe, ...) first, then compile (e.g. pipe.transformer = torch.compile(pipe.transformer))"
        )
    if family is None:
        supported = "; ".join(f"{f.denoiser_class_name} ({f.title})" for f in FAMILIES.values())
        raise UnsupportedModelError(
            f"accel does not support {type(denoiser).__name__}; supported denoisers: {supported}"
        )
    configs = _resolve_configs(method, options)

    context = PatchContext(family=family.name)
    plan = PatchPlan(denoiser, family, context, pipeline)
    for config in configs:
        info = method_info(config)
        if family.name not in info.families:
            # Family keys ("unet") are accel's internal names; users know their pipelines by model name.
            *others, last = [FAMILIES[name].title for name in info.families]
            supported = f"{', '.join(others)} and {last}" if others else last
            alternatives = [other.name for other in methods() if family.name in other.families]
            raise UnsupportedModelError(
                f"method {config.name!r} supports {supported} pipelines, not this one ({family.title}: "
                f"{type(denoiser).__name__}); methods that support it: {', '.join(alternatives)}"
            )
        plan.begin(config)
        info.applier(plan, config)

    previous = getattr(denoiser, _HANDLE_ATTRIBUTE, None)
    originals = previous._processors_without_accel() if previous is not None else denoiser.attn_processors
    _check_replaceable(plan, family, originals)
    if previous is not None:
        previous.remove()
    try:
        return _commit(plan, configs, originals)
    except Exception:
        if previous is not None:
            # All or nothing: a re-patch that fails while installing leaves the earlier patch on.
            earlier = previous._pipeline() if previous._pipeline is not None else None
            patch(earlier if earlier is not None else denoiser, list(previous.configs))
        raise


def unpatch(target: Any) -> None:
    """Undo ``accel.patch`` on a pipeline or denoiser. A model that was never patched is left as it is."""
    _, denoiser = _resolve_target(target)
    handle = getattr(denoiser, _HANDLE_ATTRIBUTE, None)
    if handle is not None:
        handle.remove()


def get_patch(target: Any) -> PatchHandle | None:
    """The active `PatchHandle` of a pipeline or denoiser, or ``None``."""
    _, denoiser = _resolve_target(target)
    return getattr(denoiser, _HANDLE_ATTRIBUTE, None)


@contextlib.contextmanager
def patched(
    target: Any, method: MethodSpec | Sequence[MethodSpec] | None = None, **options: Any
) -> Iterator[PatchHandle]:
    """Patch for the duration of a ``with`` block; on exit the previous state (patched or not) comes back."""
    previous = get_patch(target)
    previous_configs = previous.configs if previous is not None else None
    # A patch made on the pipeline comes back on the pipeline, even when this block named the bare denoiser: the
    # controls' wrappers need it.
    previous_pipeline = previous._pipeline() if previous is not None and previous._pipeline is not None else None
    handle = patch(target, method, **options)
    try:
        yield handle
    finally:
        handle.remove()
        # A nested block (or a patch call) inside this one replaced this handle, and restoring on its own exit made
        # yet another; whatever is patched now belongs to this block's span and goes.
        leftover = get_patch(target)
        if leftover is not None:
            leftover.remove()
        if previous_configs is not None:
            patch(previous_pipeline if previous_pipeline is not None else target, list(previous_configs))


def _resolve_target(target: Any) -> tuple[Any, torch.nn.Module]:
    from diffusers import DiffusionPipeline

    if isinstance(target, DiffusionPipeline):
        components = target.components
        for name in ("unet", "transformer"):
            if isinstance(components.get(name), torch.nn.Module):
                return target, components[name]
        raise UnsupportedModelError(
            f"{type(target).__name__} has no `unet` or `transformer` component for accel to patch"
        )
    if isinstance(target, torch.nn.Module):
        return None, target
    raise UnsupportedModelError(
        f"accel.patch expects a diffusers pipeline or denoiser model, got {type(target).__name__}; "
        "pass e.g. a StableDiffusionPipeline, FluxPipeline, HunyuanVideoPipeline or their unet / transformer"
    )


def _resolve_configs(method, options: dict[str, Any]) -> list[MethodConfig]:
    if method is None:
        method = DEFAULT_METHOD
    if isinstance(method, (list, tuple)):
        if options:
            raise InvalidOptionError(
                "keyword options are ambiguous with several methods; pass config objects instead, "
                "e.g. accel.patch(pipe, [accel.DenseConfig(layers=...)])"
            )
        if not method:
            raise InvalidOptionError("method list is empty; pass at least one method name or config")
        configs = [_resolve_configs(m, {})[0] for m in method]
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise InvalidOptionError(f"method list {names} names a method twice; give each method once")
        return configs
    if isinstance(method, MethodConfig):
        method_info(method)
        return [method.replace(**options) if options else method]
    if isinstance(method, str):
        return [method_info(method).config_class.from_options(**options)]
    raise InvalidOptionError(
        f"method must be a method name, a MethodConfig or a list of them, got {type(method).__name__}"
    )


def _check_replaceable(plan: PatchPlan, family: ModelFamily, originals: dict[str, Any]) -> None:
    for name in plan.processors:
        current = originals[f"{name}.processor"]
        kind = type(current).__name__
        if kind not in family.replaceable_processors:
            # diffusers' own switches set these on every layer, so excluding layers cannot help: name the switch off.
            switch_off = next((fix for prefix, fix in _SWITCHES_OFF if kind.startswith(prefix)), None)
            remedy = (
                f"turn it off first ({switch_off}), then patch"
                if switch_off is not None
                else "remove it first (e.g. pipe.unload_ip_adapter()) or exclude the layer with layers=..."
            )
            raise PatchConflictError(
                f"{name} uses {kind}, which accel would replace and whose behaviour would be lost (accel replaces "
                f"only {', '.join(sorted(family.replaceable_processors))}); {remedy}"
            )


# Processors that diffusers' pipeline switches install on every layer, and the call that removes them.
_SWITCHES_OFF = (
    ("SlicedAttnProcessor", "pipe.disable_attention_slicing()"),
    ("XFormersAttnProcessor", "pipe.disable_xformers_memory_efficient_attention(); accel's own kernels replace it"),
    ("AttnProcessorNPU", "pipe.unet.set_default_attn_processor()"),
)


def _wrap_attribute(owner: Any, attribute: str, wrapper) -> Any:
    """Set ``owner.attribute = wrapper(current)``; return the undo, which leaves the instance as it was.

    The undo holds ``owner`` weakly: it is kept on the denoiser's handle, and a denoiser shared with a ``from_pipe``
    sibling must not keep the patched pipeline alive."""
    had_own = attribute in vars(owner)
    previous = vars(owner).get(attribute)
    setattr(owner, attribute, wrapper(getattr(owner, attribute)))
    owner_ref = weakref.ref(owner)

    def restore() -> None:
        owner = owner_ref()
        if owner is None:
            return
        if had_own:
            setattr(owner, attribute, previous)
        else:
            vars(owner).pop(attribute, None)

    return restore


# What diffusers' own switches set on processors (set_attention_backend, enable_parallelism): carried across patching.
_CARRIED_ATTRIBUTES = ("_attention_backend", "_parallel_config")


def _commit(plan: PatchPlan, configs: list[MethodConfig], originals: dict[str, Any]) -> PatchHandle:
    denoiser = plan.denoiser
    replaced = dict(originals)
    for name, (_, processor) in plan.processors.items():
        original = originals[f"{name}.processor"]
        # Keep what diffusers' own switches set on the processor being replaced (set_attention_backend, context
        # parallelism), so a patched model keeps its backend and parallel config.
        for attribute in _CARRIED_ATTRIBUTES:
            value = getattr(original, attribute, None)
            if value is not None:
                setattr(processor, attribute, value)
        replaced[f"{name}.processor"] = processor

    undo = []
    attention_modules = {name: module for name, module in denoiser.named_modules() if hasattr(module, "set_processor")}
    installed = [(name, attention_modules[name], processor) for name, (_, processor) in plan.processors.items()]
    try:
        denoiser.set_attn_processor(replaced)
        step_hook = StepStateHook(plan.family, plan.context, plan.pipeline, installed)
        undo.append(install_hook(denoiser, step_hook, STEP_HOOK_NAME))
        for module, hook, name in plan.hooks:
            undo.append(install_hook(module, hook, name))
        for attribute, wrapper in plan.pipeline_wrappers:
            undo.append(_wrap_attribute(plan.pipeline, attribute, wrapper))
    except Exception:
        denoiser.set_attn_processor(dict(originals))
        for step in reversed(undo):
            step()
        raise
    undo.extend(plan.undo)
    layers = {name: owner for name, (owner, _) in plan.processors.items()}
    handle = PatchHandle(denoiser, plan.family, configs, plan.context, originals, layers, undo, plan.pipeline)
    handle._installed = {f"{name}.processor": processor for name, _, processor in installed}
    setattr(denoiser, _HANDLE_ATTRIBUTE, handle)
    return handle
