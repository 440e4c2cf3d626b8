"""``PatchPlan``: what a method's applier sees. It records intentions; ``accel.patch`` applies them all or none."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from accel.config import MethodConfig
from accel.errors import InvalidOptionError, PatchConflictError
from accel.pipelines.families import AttentionSite, ModelFamily
from accel.processors.state import PatchContext


class PatchPlan:
    """The layers of one denoiser and the changes methods want to make to them.

    Attributes:
        denoiser: the model being patched (UNet or transformer).
        family: its `ModelFamily` (``family.name`` is ``"unet"``, ``"flux"`` or ``"hunyuanvideo"``).
        context: the `PatchContext` that the step hook fills before every forward; give it to processors.
        pipeline: the pipeline passed to ``accel.patch``, or ``None`` when a bare denoiser was given.
        sites: every attention layer accel may touch, in model order.
    """

    def __init__(self, denoiser: torch.nn.Module, family: ModelFamily, context: PatchContext, pipeline: Any = None):
        self.denoiser = denoiser
        self.family = family
        self.context = context
        self.pipeline = pipeline
        self.sites: list[AttentionSite] = family.attention_sites(denoiser)
        self.processors: dict[str, tuple[str, Any]] = {}
        self.hooks: list[tuple[torch.nn.Module, Any, str]] = []
        self.undo: list[Callable[[], None]] = []
        self.pipeline_wrappers: list[tuple[str, Callable[[Callable], Callable]]] = []
        self._method = ""

    def begin(self, config: MethodConfig) -> None:
        self._method = config.name

    def select(
        self,
        config: MethodConfig,
        kinds: Iterable[str] | None = None,
        where: Callable[[AttentionSite], bool] | None = None,
    ) -> list[AttentionSite]:
        """The method's layers: its default set (``kinds`` and ``where``) narrowed by ``config.layers``."""
        kinds = None if kinds is None else set(kinds)
        candidates = [s for s in self.sites if (kinds is None or s.kind in kinds) and (where is None or where(s))]
        if config.layers is None:
            chosen = candidates
        else:
            pattern = re.compile(config.layers)
            chosen = [s for s in candidates if pattern.fullmatch(s.name)]
        if not chosen:
            examples = ", ".join(s.name for s in candidates[:3]) or "none"
            raise InvalidOptionError(
                f"{config.name}: layers={config.layers!r} matches none of the {len(candidates)} layers it can patch "
                f"on {type(self.denoiser).__name__} (e.g. {examples}); fix the regex (it must match a whole name)"
            )
        return chosen

    def dense_processor(self, site: AttentionSite):
        """A reference processor for ``site``, for methods that leave some layers exact."""
        return self.family.dense_processor_class(context=self.context, layer=site.name)

    def set_processor(self, site: AttentionSite, processor: Any) -> None:
        owner = self.processors.get(site.name)
        if owner is not None and owner[0] != self._method:
            raise PatchConflictError(
                f"methods {owner[0]!r} and {self._method!r} both replace the attention of {site.name}; "
                "restrict one of them with layers=..."
            )
        self.processors[site.name] = (self._method, processor)

    def add_hook(self, module: torch.nn.Module, hook: Any, name: str) -> None:
        """Register a ``diffusers.hooks.ModelHook`` on ``module`` when the patch is applied; removed by unpatch."""
        self.hooks.append((module, hook, name))

    def wrap_pipeline(self, attribute: str, wrapper: Callable[[Callable], Callable]) -> None:
        """Replace the pipeline's method ``attribute`` by ``wrapper(original)`` while patched (e.g. to see the prompt
        in ``encode_prompt``); the instance attribute is removed again by unpatch."""
        if self.pipeline is None or not callable(getattr(self.pipeline, attribute, None)):
            raise InvalidOptionError(
                f"{self._method}: needs the pipeline (its {attribute}); pass the pipeline to accel.patch, not the "
                f"{type(self.denoiser).__name__}"
            )
        self.pipeline_wrappers.append((attribute, wrapper))

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` when the patch is removed (after processors and hooks are restored)."""
        self.undo.append(undo)
