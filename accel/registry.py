"""The open method registry: config type -> applier. Third-party methods register the same way as built-ins."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from accel.config import MethodConfig
from accel.errors import UnknownMethodError

if TYPE_CHECKING:
    from accel.plan import PatchPlan

Applier = Callable[["PatchPlan", MethodConfig], None]


@dataclass(frozen=True)
class MethodInfo:
    """What ``accel.methods()`` lists for one method."""

    name: str
    config_class: type[MethodConfig]
    families: tuple[str, ...]
    summary: str
    applier: Applier


_METHODS: dict[str, MethodInfo] = {}


def register_method(config_class: type[MethodConfig], *, families: tuple[str, ...] | list[str]):
    """Decorator registering ``applier(plan, config)`` for ``config_class``.

    The applier receives a `PatchPlan` and asks it for layers and installs processors or hooks through it; it must
    not modify the model directly, so that a failed patch leaves the model untouched. Returns the applier unchanged.
    """
    from accel.pipelines.families import FAMILIES

    if not (isinstance(config_class, type) and issubclass(config_class, MethodConfig)) or not config_class.name:
        raise TypeError(f"{config_class!r} must be a MethodConfig subclass with a non-empty `name`")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"families {list(families)} must be a non-empty subset of {list(FAMILIES)}")

    def decorator(applier: Applier) -> Applier:
        existing = _METHODS.get(config_class.name)
        if existing is not None and existing.config_class is not config_class:
            raise ValueError(
                f"method name {config_class.name!r} is already registered by {existing.config_class.__qualname__}"
            )
        summary = (config_class.__doc__ or "").strip().split("\n", 1)[0]
        _METHODS[config_class.name] = MethodInfo(config_class.name, config_class, tuple(families), summary, applier)
        return applier

    return decorator


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def methods() -> list[MethodInfo]:
    """The registered methods, with the model families each supports."""
    return sorted(_METHODS.values(), key=lambda info: info.name)


def method_info(method: str | MethodConfig) -> MethodInfo:
    name = method.name if isinstance(method, MethodConfig) else method
    info = _METHODS.get(name)
    if info is None:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}.{hint}")
    if isinstance(method, MethodConfig) and not isinstance(method, info.config_class):
        raise UnknownMethodError(
            f"{type(method).__qualname__} claims the name {name!r}, which is registered to "
            f"{info.config_class.__qualname__}; register it with accel.register_method first"
        )
    return info
