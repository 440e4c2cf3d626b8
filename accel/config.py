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


@dataclass(kw_only=True)
class HiDiffusionConfig(MethodConfig):
    """HiDiffusion for SD 1.x / 2.x / SDXL UNets: RAU-Net and MSW-MSA, for sizes above the training resolution.

    Args:
        raunet (`bool`, defaults to `True`):
            Resolution-aware down/up-sampling of the deep blocks early in the schedule (fewer duplicated objects,
            less compute). Off by itself at or below the UNet's training size unless a switch is given.
        mswmsa (`bool`, defaults to `True`):
            Shifted-window self-attention in the top attention level (down and up blocks).
        raunet_switch (`float`, *optional*):
            Fraction of the schedule during which RAU-Net stage 1 runs. ``None``: 0.4 below 4x the training size,
            0.7 from 4x.
        raunet_deep_switch (`float`, *optional*):
            Same for stage 2 (extreme sizes). ``None``: 0 below 4x, 0.3 from 4x.
        windows (`int` or `(int, int)`, defaults to `2`):
            Windows per axis (2 gives HiDiffusion's 2x2 windows, 1 gives dense attention).
        window_size (`int` or `(int, int)`, *optional*):
            Window side in tokens instead of a count; an error if larger than the token grid.
        shift (`str`, defaults to `"random"`):
            ``"random"``: each step shifts windows by 0, 1/4, 1/2 or 3/4 of a window, drawn from a hash of
            (``shift_seed``, step, layer), so results are reproducible; ``"none"``: no shift.
        shift_seed (`int`, defaults to `0`): seed of the shift draws.
        layers (`str`, *optional*): narrows the MSW-MSA layers (see `MethodConfig`).
    """

    name: ClassVar[str] = "hidiffusion"

    raunet: bool = True
    mswmsa: bool = True
    raunet_switch: float | None = None
    raunet_deep_switch: float | None = None
    windows: int | tuple[int, int] = 2
    window_size: int | tuple[int, int] | None = None
    shift: str = "random"
    shift_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.raunet or self.mswmsa):
            raise InvalidOptionError("hidiffusion: raunet and mswmsa are both off, so it would do nothing")
        if self.layers is not None and not self.mswmsa:
            raise InvalidOptionError("hidiffusion: layers selects MSW-MSA layers; it has no effect with mswmsa=False")
        for option in ("raunet_switch", "raunet_deep_switch"):
            value = getattr(self, option)
            if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise InvalidOptionError(
                    f"hidiffusion: {option}={value!r} must be a fraction of the schedule in [0, 1] (or None)"
                )
        self.windows = _pair(self, "windows", self.windows)
        if self.window_size is not None:
            self.window_size = _pair(self, "window_size", self.window_size)
        if self.shift not in ("random", "none"):
            raise InvalidOptionError(f"hidiffusion: shift={self.shift!r} must be 'random' or 'none'")
        if not isinstance(self.shift_seed, int):
            raise InvalidOptionError(f"hidiffusion: shift_seed must be an int, got {self.shift_seed!r}")


def _pair(config: MethodConfig, option: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, list | tuple) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise InvalidOptionError(f"{config.name}: {option}={value!r} must be a positive int or a pair of them")
    return pair
