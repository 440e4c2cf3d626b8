"""A method's settings form, read off its config dataclass: field types pick the widget, the docstring gives help.

Nothing here names a method, so a method registered with ``accel.register_method`` gets its form for free.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from accel.config import MethodConfig
from accel.errors import InvalidOptionError

# How a field is edited: a checkbox, a number, a menu, free text, or JSON for anything structured (tuples, lists,
# dicts, unions of several types).
Kind = typing.Literal["bool", "int", "float", "choice", "text", "json"]
DEFAULT_CHOICE = "(default)"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: Kind
    default: Any
    optional: bool
    help: str
    choices: tuple[str, ...] = ()

    def initial(self) -> Any:
        """The widget's starting value, showing the config's default."""
        if self.kind == "json":
            return json.dumps(self.default)
        if self.kind == "choice":
            return DEFAULT_CHOICE if self.default is None else self.default
        if self.kind == "bool" and self.optional:
            # A checkbox has no third state: None would show, and be sent back, as False.
            return DEFAULT_CHOICE if self.default is None else str(self.default).lower()
        if self.kind == "text":
            return self.default or ""
        return self.default

    def parse(self, raw: Any) -> Any:
        """A widget's value back to the option's value; raises `InvalidOptionError` (a ``ValueError``, which the
        demo shows as a message) naming the field and what it expects."""
        if self.kind == "json":
            if raw is not None and not isinstance(raw, str):
                raise InvalidOptionError(
                    f"{self.name}: expected JSON text such as 4, [4, 4] or null, got {type(raw).__name__} {raw!r}"
                )
            text = (raw or "").strip()
            if not text:
                return None
            try:
                return json.loads(text)
            except json.JSONDecodeError as error:
                raise InvalidOptionError(
                    f"{self.name}: {text!r} is not JSON ({error.msg}); e.g. 4, [4, 4] or null"
                ) from None
        if self.kind == "choice":
            return None if raw in (None, DEFAULT_CHOICE) else raw
        if self.kind == "text":
            return raw if raw else (None if self.optional else "")
        if self.kind in ("int", "float"):
            return self._number(raw)
        return self._bool(raw)

    def _number(self, raw: Any) -> int | float | None:
        # An emptied number box reads as None; the config then says whether the option may be None.
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        whole = self.kind == "int"
        expected = "a whole number, e.g. 4" if whole else "a number, e.g. 0.5"
        # bool is an int to Python: True would read as 1.
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise InvalidOptionError(f"{self.name}: expected {expected}, got {type(raw).__name__} {raw!r}")
        if whole and isinstance(raw, int):
            return raw
        if whole and isinstance(raw, str):
            try:
                return int(raw.strip())  # exact for digits that a float would round (2**53 + 1)
            except ValueError:
                pass
        try:
            number = float(raw)
        except (ValueError, OverflowError):  # float(10**400) overflows
            raise InvalidOptionError(f"{self.name}: {raw!r} is not a number; expected {expected}") from None
        if not whole:
            return number  # the config refuses inf and nan where the option needs a finite value
        # int(inf) raises OverflowError and int(nan) a ValueError that names no field; 4.5 would truncate to 4.
        if not math.isfinite(number) or number != int(number):
            raise InvalidOptionError(f"{self.name}: {raw!r} is not {expected}")
        return int(number)

    def _bool(self, raw: Any) -> bool | None:
        # bool("false") is True, so a text value must be read, not converted.
        if isinstance(raw, bool):
            return raw
        if raw in (None, DEFAULT_CHOICE) and self.optional:
            return None
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise InvalidOptionError(f"{self.name}: expected True or False (or the text 'true' / 'false'), got {raw!r}")


def config_fields(config_class: type[MethodConfig]) -> list[FieldSpec]:
    """One `FieldSpec` per option of ``config_class`` (``version`` is not an option)."""
    hints = typing.get_type_hints(config_class)
    docs = field_docs(config_class)
    specs = []
    for field in dataclasses.fields(config_class):
        if field.name == "version":
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind, optional = _kind(hints[field.name], field.metadata)
        specs.append(
            FieldSpec(
                name=field.name,
                kind=kind,
                default=default,
                optional=optional,
                help=docs.get(field.name, ""),
                choices=tuple(field.metadata.get("choices", ())),
            )
        )
    return specs


def options_from_form(specs: list[FieldSpec], values: list[Any]) -> dict[str, Any]:
    """The options whose value differs from the config's default (so results list only what the user changed)."""
    options = {}
    for spec, raw in zip(specs, values, strict=True):
        value = spec.parse(raw)
        if _normalised(value) != _normalised(spec.default):
            options[spec.name] = value
    return options


def _normalised(value: Any) -> Any:
    # JSON has no tuples: [4, 4] typed in a box equals a (4, 4) default.
    return json.loads(json.dumps(value)) if isinstance(value, list | tuple | dict) else value


def _kind(hint: Any, metadata) -> tuple[Kind, bool]:
    members = (
        typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    )
    optional = type(None) in members
    concrete = [m for m in members if m is not type(None)] if members else [hint]
    if metadata.get("choices"):
        return "choice", optional
    if len(concrete) == 1:
        (only,) = concrete
        if only is bool:
            return "bool", optional
        if only is int:
            return "int", optional
        if only is float:
            return "float", optional
        if only is str:
            return "text", optional
    return "json", optional


# "name (`type`, defaults to `x`): text"; the type may itself hold parentheses, e.g. `(int, int)`.
_ARG_LINE = re.compile(r"^(?P<indent>\s+)(?P<name>\w+) \((?P<type>.*?)\):(?:\s+(?P<text>.*))?$")


def field_docs(config_class: type[MethodConfig]) -> dict[str, str]:
    """Each option's description from the ``Args:`` sections of the class and its bases (the class wins, except
    where it only refers to a base with "see ...")."""
    docs: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        for name, text in _args_section(cls.__doc__ or "").items():
            if name in docs and text.lower().startswith("see "):
                continue
            docs[name] = text
    return docs


def _args_section(doc: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return entries
    current, indent = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        match = _ARG_LINE.match(line)
        if match and (indent is None or len(match["indent"]) == indent):
            indent = len(match["indent"])
            current = match["name"]
            entries[current] = (match["text"] or "").strip()
        elif current is not None and len(line) - len(line.lstrip()) > indent:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            break
    return entries
