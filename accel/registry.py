"""The open method registry: config type -> applier. Third-party methods register the same way as built-ins."""

from __future__ import annotations

import dataclasses
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

    ``families`` is a tuple of family names, e.g. ``("unet",)``. Every field of ``config_class`` needs a default, and
    a name is registered once: ``unregister_method(name)`` first to replace a method.
    """
    from accel.pipelines.families import FAMILIES

    if not (isinstance(config_class, type) and issubclass(config_class, MethodConfig)) or not config_class.name:
        raise TypeError(f"{config_class!r} must be a MethodConfig subclass with a non-empty `name`")
    # A bare string is iterable, so "unet" would be read as the families 'u', 'n', 'e', 't'.
    if not isinstance(families, tuple | list):
        raise TypeError(
            f'families must be a tuple of family names, e.g. families=("unet",), not {type(families).__name__} '
            f"{families!r}; known families: {', '.join(FAMILIES)}"
        )
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"families {list(families)} must be a non-empty subset of {list(FAMILIES)}")
    # accel.patch(pipe, name) builds the config with no options (as do the CLI and the demo's form), so an option
    # without a default would fail there with a bare TypeError, far from the method that caused it.
    for option in dataclasses.fields(config_class):
        if option.init and option.default is dataclasses.MISSING and option.default_factory is dataclasses.MISSING:
            raise TypeError(
                f"{config_class.__qualname__}.{option.name} has no default; every option of a method needs one, "
                f"since accel.patch(pipe, {config_class.name!r}) must work with no options: give it a default "
                f"(None can stand for 'the method chooses')"
            )

    def decorator(applier: Applier) -> Applier:
        if not callable(applier):
            raise TypeError(
                f"register_method({config_class.__qualname__}, ...) decorates the applier, a function "
                f"applier(plan, config); got {type(applier).__name__} {applier!r}"
            )
        existing = _METHODS.get(config_class.name)
        # Registering a name twice would silently swap the method for every pipeline (even a built-in one); only
        # the same definitions run again (importlib.reload of the module that registers them) may replace it.
        if existing is not None and not (
            _same_definition(existing.config_class, config_class) and _same_definition(existing.applier, applier)
        ):
            raise ValueError(
                f"method name {config_class.name!r} is already registered ({existing.config_class.__qualname__} "
                f"applied by {_describe(existing.applier)}); register under another name, a MethodConfig subclass "
                f'with e.g. name = "{config_class.name}-2", or call accel.unregister_method({config_class.name!r}) first to '
                "replace it on purpose"
            )
        summary = (config_class.__doc__ or "").strip().split("\n", 1)[0]
        _METHODS[config_class.name] = MethodInfo(config_class.name, config_class, tuple(families), summary, applier)
        return applier

    return decorator


def _same_definition(old: object, new: object) -> bool:
    # After a reload the class and function are new objects of the same module and qualified name.
    if old is new:
        return True
    names = [(getattr(o, "__module__", None), getattr(o, "__qualname__", None)) for o in (old, new)]
    return None not in names[0] and names[0] == names[1]


def _describe(applier: Applier) -> str:
    module, name = getattr(applier, "__module__", None), getattr(applier, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(applier)


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
