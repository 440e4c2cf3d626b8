"""Method configurations: validated dataclasses, one per method, all keyword-only with documented defaults."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from accel.errors import InvalidOptionError


@dataclass(kw_only=True)
class MethodConfig:
    """Base of every method's configuration.

    Subclasses set the class attribute ``name`` (the registry name, e.g. ``"dense"``) and add their own fields.

    Args:
        layers (`str`, *optional*, defaults to `None`):
            Regular expression restricting the method to attention layers whose module name it fully matches
            (e.g. ``r"up_blocks\\..*attn1"``). ``None`` keeps the method's default layer set. A pattern matching no
            layer is an error, never a silent no-op.
        version (`int`, defaults to `1`):
            Version of the config schema, stored with ``to_dict`` so saved configs stay readable.
    """

    name: ClassVar[str] = ""

    layers: str | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if self.layers is not None:
            if not isinstance(self.layers, str):
                raise InvalidOptionError(f"{self.name}: layers must be a regex string or None, got {self.layers!r}")
            try:
                re.compile(self.layers)
            except re.error as error:
                raise InvalidOptionError(
                    f"{self.name}: layers={self.layers!r} is not a valid regex ({error})"
                ) from None
        if self.version != 1:
            raise InvalidOptionError(f"{self.name}: config version {self.version} is not known; this accel reads 1")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "version"]

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build from keyword options, naming unknown options and the closest known one."""
        known = cls.option_names()
        for option in options:
            if option not in known:
                close = difflib.get_close_matches(option, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise InvalidOptionError(
                    f"method {cls.name!r} has no option {option!r}; its options are: {', '.join(known)}.{hint}"
                )
        return cls(**options)

    def replace(self, **options: Any) -> MethodConfig:
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merged.update(options)
        merged.pop("version")
        return type(self).from_options(**merged)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}


@dataclass(kw_only=True)
class DenseConfig(MethodConfig):
    """Exact attention through accel's reference processors (UNet, FLUX, HunyuanVideo).

    It computes what diffusers computes (fp32 difference ≤ 1e-5, bit-identical on the default backend) and is the
    baseline every other method is measured against. It touches every attention layer of the denoiser except
    HunyuanVideo's text-only token refiner.

    Args:
        layers (`str`, *optional*, defaults to `None`): see `MethodConfig`.
    """

    name: ClassVar[str] = "dense"
