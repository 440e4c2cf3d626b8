"""Method configurations: validated dataclasses, one per method, all keyword-only with documented defaults."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from accel.errors import InvalidOptionError


class _KnowsGivenOptions:
    """A config that can tell the options its constructor was given from defaults left alone."""

    def __new__(cls, *args: Any, **options: Any):
        config = super().__new__(cls)
        # A dataclass field cannot tell a value the user passed from its default, and the conflict checks (e.g.
        # raunet=False with raunet_switch) must refuse what was asked for, not a default restated; the constructor's
        # keywords can tell, and __new__ sees them before __post_init__ runs.
        config._given_options = frozenset(options)
        return config

    def is_set(self, option: str) -> bool:
        """Whether ``option`` was passed rather than left at its default (``None`` passed for an option whose
        default is ``None`` counts as left)."""
        if option not in getattr(self, "_given_options", ()):
            return False
        default = next(f.default for f in dataclasses.fields(self) if f.name == option)
        return not (default is None and getattr(self, option) is None)

    def changed_options(self) -> dict[str, Any]:
        """The options that make this config differ from the default one (also those assigned after construction),
        as values its constructor accepts; ``version`` left out."""
        defaults = type(self)()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "version" and getattr(self, f.name) != getattr(defaults, f.name)
        }


@dataclass(kw_only=True)
class MethodConfig(_KnowsGivenOptions):
    """Base of every method's configuration.

    Subclasses set the class attribute ``name`` (the registry name, e.g. ``"dense"``) and add their own fields,
    documented in the class docstring's ``Args:`` section. A string option with a fixed set of values declares them
    as ``field(metadata={"choices": (...)})``, so that user interfaces (the demo) can offer them as a menu.

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
        if isinstance(self.version, bool) or self.version != 1:
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
        # Only the options that were set or changed carry over: restating every default would mark it as set, and
        # e.g. replace(window_size=8) on a config that never named windows would then conflict with windows=2.
        given = {name: getattr(self, name) for name in getattr(self, "_given_options", ()) if name != "version"}
        return type(self).from_options(**{**given, **self.changed_options(), **options})

    def to_dict(self) -> dict[str, Any]:
        """``{"method": name, "version": 1, **options that differ from the defaults}``; `from_dict` reads it back."""
        return {"method": self.name, "version": self.version, **self.changed_options()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """The config `to_dict` wrote (its ``method`` must be this class's)."""
        options = dict(data)
        method = options.pop("method", cls.name)
        if method != cls.name:
            raise InvalidOptionError(f"{cls.__name__}.from_dict: the data is for method {method!r}, not {cls.name!r}")
        version = options.pop("version", 1)
        if version != 1:
            raise InvalidOptionError(f"{cls.name}: config version {version} is not known; this accel reads 1")
        return cls.from_options(**options)


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


HIDIFFUSION_BACKENDS = ("auto", "torch", "triton")


@dataclass(kw_only=True)
class HiDiffusionConfig(MethodConfig):
    """HiDiffusion for SD 1.x / 2.x / SDXL UNets: RAU-Net and MSW-MSA, for sizes above the training resolution.

    RAU-Net's switches need ``raunet=True`` and the window options (windows, window_size, shift, shift_seed, backend,
    layers) need ``mswmsa=True``: set where they have no effect, they are refused rather than ignored.

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
            Window side in tokens instead of a count (give ``windows`` or ``window_size``, not both); an error if
            larger than the token grid.
        shift (`str`, defaults to `"random"`):
            ``"random"``: each step shifts windows by 0, 1/4, 1/2 or 3/4 of a window, drawn from a hash of
            (``shift_seed``, step, layer), so results are reproducible; ``"none"``: no shift.
        shift_seed (`int`, defaults to `0`): seed of the shift draws (an error with ``shift="none"``).
        backend (`str`, defaults to `"auto"`): MSW-MSA's kernel. ``"torch"``: batched SDPA over the windows (any
            device, any size: sides that do not divide are padded and masked); ``"triton"``: the block-sparse kernel
            shared with GNA (GPU), for windows that divide the token grid (other grids take SDPA, with a warning);
            ``"auto"``: Triton on CUDA when available, else torch.
        layers (`str`, *optional*): narrows the MSW-MSA layers (see `MethodConfig`).
    """

    name: ClassVar[str] = "hidiffusion"

    raunet: bool = True
    mswmsa: bool = True
    raunet_switch: float | None = None
    raunet_deep_switch: float | None = None
    windows: int | tuple[int, int] = 2
    window_size: int | tuple[int, int] | None = None
    shift: str = field(default="random", metadata={"choices": ("random", "none")})
    shift_seed: int = 0
    backend: str = field(default="auto", metadata={"choices": HIDIFFUSION_BACKENDS})

    def __post_init__(self) -> None:
        super().__post_init__()
        for option in ("raunet", "mswmsa"):
            _require_bool(self, option)
        if not (self.raunet or self.mswmsa):
            raise InvalidOptionError("hidiffusion: raunet and mswmsa are both off, so it would do nothing")
        if self.layers is not None and not self.mswmsa:
            raise InvalidOptionError("hidiffusion: layers selects MSW-MSA layers; it has no effect with mswmsa=False")
        for option in ("raunet_switch", "raunet_deep_switch"):
            value = getattr(self, option)
            if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
                raise InvalidOptionError(
                    f"hidiffusion: {option}={value!r} must be a fraction of the schedule in [0, 1] (or None)"
                )
            if value is not None and not self.raunet:
                raise InvalidOptionError(
                    f"hidiffusion: {option}={value!r} sets RAU-Net's schedule; it has no effect with raunet=False: "
                    f"drop {option} or turn raunet on"
                )
        self.windows = _pair(self, "windows", self.windows)
        if self.window_size is not None:
            self.window_size = _pair(self, "window_size", self.window_size)
        if self.shift not in ("random", "none"):
            raise InvalidOptionError(f"hidiffusion: shift={self.shift!r} must be 'random' or 'none'")
        if not isinstance(self.shift_seed, int) or isinstance(self.shift_seed, bool):
            raise InvalidOptionError(f"hidiffusion: shift_seed must be an int, got {self.shift_seed!r}")
        if not self.mswmsa:
            for option in ("windows", "window_size", "shift", "shift_seed"):
                if self.is_set(option):
                    raise InvalidOptionError(
                        f"hidiffusion: {option}={getattr(self, option)!r} shapes MSW-MSA's windows; it has no effect "
                        f"with mswmsa=False: drop {option} or turn mswmsa on"
                    )
        if self.is_set("windows") and self.is_set("window_size"):
            raise InvalidOptionError(
                f"hidiffusion: windows={self.windows!r} (a count per axis) and window_size={self.window_size!r} (a "
                "side in tokens) both set the windows; give only one of them"
            )
        if self.shift == "none" and self.is_set("shift_seed"):
            raise InvalidOptionError(
                f"hidiffusion: shift_seed={self.shift_seed!r} seeds the random window shifts, which shift='none' turns "
                "off: drop shift_seed or use shift='random'"
            )
        if self.backend not in HIDIFFUSION_BACKENDS:
            raise InvalidOptionError(
                f"hidiffusion: backend={self.backend!r} must be one of {', '.join(HIDIFFUSION_BACKENDS)}"
            )
        if self.backend != "auto" and not self.mswmsa:
            raise InvalidOptionError(
                "hidiffusion: backend selects MSW-MSA's kernel; it has no effect with mswmsa=False"
            )


GNA_GEOMETRY_OPTIONS = ("kernel_size", "stride", "dilation", "is_causal")
GNA_BACKENDS = ("auto", "torch", "triton", "reference")


@dataclass(kw_only=True)
class GNAConfig(MethodConfig):
    r"""Generalized neighborhood attention for FLUX (2-D image grid) and HunyuanVideo (3-D video grid).

    Image / video queries attend a window of their grid (NATTEN's semantics: clamped at the borders, stride groups
    share their leader's window, ``stride == kernel_size`` is blocked attention) plus every text token; text queries
    attend everything. Each geometry option is an int (all axes) or one value per axis (``(rows, cols)`` for FLUX,
    ``(frames, rows, cols)`` for HunyuanVideo).

    Args:
        kernel_size (`int` or `tuple`, *optional*):
            Window per axis. ``None`` scales with the grid, after the GNA paper's 4K settings: FLUX 5/16 of each side
            (80 of 256); HunyuanVideo 0.6 x frames, 0.5 x rows, 0.3 x cols (18x24x24 of 30x48x80). A kernel as large
            as the grid is dense attention.
        stride (`int` or `tuple`, *optional*):
            Stride per axis. ``None``: the GNA paper's strides at every size, 16x16 for FLUX and 16x8x8 for
            HunyuanVideo, each capped by the window (they are its kernel's tiles, so the attention stays
            block-sparse). An explicit stride with the default window widens the window to it where it is smaller.
        dilation (`int` or `tuple`, defaults to `1`): dilation per axis.
        is_causal (`bool` or `tuple`, defaults to `False`): causal windows per axis (e.g. along frames).
        dense_steps (`int`, defaults to `0`): the first denoising steps run dense (layout forms there).
        dense_layers (`str`, *optional*): regex of layers left dense (fully matching module names).
        per_layer (`dict`, *optional*): ``{regex: {option: value}}`` overriding geometry options for the layers
            whose name the regex fully matches (first match wins), e.g. ``{r"single_transformer_blocks\.3.*": {
            "kernel_size": 32}}``.
        backend (`str`, defaults to `"auto"`): ``"triton"`` (the fused block-sparse kernel, GPU), ``"torch"`` (tiled
            SDPA, any device), ``"reference"`` (explicit mask, small sizes only), ``"auto"``: Triton on CUDA when
            available, else torch.
        layers (`str`, *optional*): see `MethodConfig`.
    """

    name: ClassVar[str] = "gna"

    kernel_size: int | tuple[int, ...] | None = None
    stride: int | tuple[int, ...] | None = None
    dilation: int | tuple[int, ...] = 1
    is_causal: bool | tuple[bool, ...] = False
    dense_steps: int = 0
    dense_layers: str | None = None
    per_layer: dict[str, dict[str, Any]] | None = None
    backend: str = field(default="auto", metadata={"choices": GNA_BACKENDS})

    def __post_init__(self) -> None:
        super().__post_init__()
        for option in ("kernel_size", "stride", "dilation"):
            value = getattr(self, option)
            if value is None and option != "dilation":
                continue
            setattr(self, option, _positive_ints(self, option, value))
        if isinstance(self.is_causal, list | tuple):
            self.is_causal = tuple(self.is_causal)
        # Checked by type before iterating: is_causal=1 or None is not iterable, and 1 is no bool (nor is "yes").
        if not (
            isinstance(self.is_causal, bool)
            or (
                isinstance(self.is_causal, tuple)
                and self.is_causal
                and all(isinstance(v, bool) for v in self.is_causal)
            )
        ):
            raise InvalidOptionError(
                f"gna: is_causal={self.is_causal!r} must be a bool or one bool per axis, e.g. True or (True, False)"
            )
        if not isinstance(self.dense_steps, int) or isinstance(self.dense_steps, bool) or self.dense_steps < 0:
            raise InvalidOptionError(f"gna: dense_steps={self.dense_steps!r} must be a non-negative int")
        if self.dense_layers is not None:
            _check_regex(self, "dense_layers", self.dense_layers)
        if self.per_layer is not None:
            if not isinstance(self.per_layer, dict):
                raise InvalidOptionError("gna: per_layer must be a dict {layer regex: {option: value}}")
            for pattern, options in self.per_layer.items():
                _check_regex(self, "per_layer", pattern)
                unknown = set(options) - set(GNA_GEOMETRY_OPTIONS) if isinstance(options, dict) else None
                if unknown is None or unknown:
                    raise InvalidOptionError(
                        f"gna: per_layer[{pattern!r}] must be a dict of {', '.join(GNA_GEOMETRY_OPTIONS)}; "
                        f"got {options!r}"
                    )
            # JSON has no tuples: a config saved and loaded back holds lists, which must compare equal to the tuples.
            self.per_layer = {
                pattern: {option: tuple(v) if isinstance(v, list) else v for option, v in options.items()}
                for pattern, options in self.per_layer.items()
            }
        if self.backend not in GNA_BACKENDS:
            raise InvalidOptionError(f"gna: backend={self.backend!r} must be one of {', '.join(GNA_BACKENDS)}")


AGENT_POOLINGS = ("merge", "grid")


@dataclass(kw_only=True)
class AgentConfig(MethodConfig):
    r"""Agent attention (AgentSD) for SD 1.x / 2.x / SDXL UNets, and for FLUX and HunyuanVideo visual tokens.

    Queries are pooled into ``agent_ratio`` x tokens agents; the agents attend the keys, and the queries attend the
    agents: ``softmax(Q Aᵀ · d^(-scale_exponent/2)) softmax(A Kᵀ · d^-1/2) V + shortcut · V``, two products whose
    cost is linear in the tokens. Where agent attention would cost as much as dense (``2 x agents ≥ tokens``) the
    layer runs exact attention instead, so ``agent_ratio=1`` reproduces dense attention.

    UNets (AgentSD's recipe): self-attention of the highest-resolution level that has attention (level 0 in SD 1.x /
    2.x, level 1 in SDXL). For the first ``agent_steps`` of the schedule tokens are merged (ToMe, ``merge_ratio``,
    one destination per ``cell``) and the agents are ToMe's destinations averaged with every token matched to them
    (``pooling="merge"``); afterwards only token merging runs (``late_merge_ratio`` with ``late_cell``; 0 for exact
    attention). FLUX / HunyuanVideo: every joint attention layer; agents are the queries average-pooled over the
    2-D / 3-D token grid (``pooling="grid"``), text tokens stay exact (text queries attend everything; image / video
    queries attend the agents and the text keys in one softmax, each agent weighted by the tokens it pools); no
    token merging.

    Args:
        agent_ratio (`float`, defaults to `1/16`):
            Agents per token, in (0, 1]. With ``pooling="merge"`` (also the UNet default) at least
            ``1 / cell area`` (one agent per cell).
        pooling (`str`, *optional*):
            ``"merge"`` (similarity-guided, AgentSD; UNets only) or ``"grid"`` (adaptive average pooling over the
            token grid; every axis shrinks alike, but one that cannot, such as a video's single latent frame, keeps
            one agent and the others take its share). ``None``: ``"merge"`` on UNets, ``"grid"`` on FLUX /
            HunyuanVideo.
        agent_steps (`float`, defaults to `0.4`):
            Fraction of the schedule, from its start, that uses agent attention (AgentSD: 20 of 50 steps). Read from
            the scheduler's timesteps, so it holds under classifier-free guidance and img2img ``strength`` (a run
            entering the schedule past it has no agent step, and says so once).
        merge_ratio (`float`, *optional*):
            Share of tokens merged away while agents run (UNets). ``None``: 0.4 on UNets, 0 elsewhere.
        late_merge_ratio (`float`, *optional*):
            Share merged away after ``agent_steps`` (UNets). ``None``: 0.4 on UNets, 0 elsewhere.
        cell (`int` or `(int, int)`, defaults to `4`): token-merging cell (one destination each) while agents run.
            UNets only, like ``late_cell`` and ``seed``: refused on FLUX / HunyuanVideo.
        late_cell (`int` or `(int, int)`, defaults to `2`): the cell after ``agent_steps``.
        scale_exponent (`float`, defaults to `0.3`):
            The second softmax's scale is ``head_dim ** (-0.5 * scale_exponent)`` (AgentSD's ``k_scale2``).
        shortcut (`float`, defaults to `0.075`): weight of the value shortcut (AgentSD's ``k_shortcut``).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random destination in each cell, drawn per (seed, step, layer), so results are
            reproducible; ``None`` takes each cell's first token.
        layers (`str`, *optional*): see `MethodConfig`.
    """

    name: ClassVar[str] = "agent"

    agent_ratio: float = 1 / 16
    pooling: str | None = field(default=None, metadata={"choices": AGENT_POOLINGS})
    agent_steps: float = 0.4
    merge_ratio: float | None = None
    late_merge_ratio: float | None = None
    cell: int | tuple[int, int] = 4
    late_cell: int | tuple[int, int] = 2
    scale_exponent: float = 0.3
    shortcut: float = 0.075
    seed: int | None = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_number(self.agent_ratio) or not 0.0 < self.agent_ratio <= 1.0:
            raise InvalidOptionError(
                f"agent: agent_ratio={self.agent_ratio!r} must be a share of the tokens in (0, 1] (e.g. 1/16)"
            )
        if self.pooling is not None and self.pooling not in AGENT_POOLINGS:
            raise InvalidOptionError(f"agent: pooling={self.pooling!r} must be one of {', '.join(AGENT_POOLINGS)}")
        if not _is_number(self.agent_steps) or not 0.0 <= self.agent_steps <= 1.0:
            raise InvalidOptionError(f"agent: agent_steps={self.agent_steps!r} must be a fraction of the schedule")
        for option in ("merge_ratio", "late_merge_ratio"):
            value = getattr(self, option)
            if value is not None and (not _is_number(value) or not 0.0 <= value < 1.0):
                raise InvalidOptionError(f"agent: {option}={value!r} must be a share of the tokens in [0, 1)")
        self.cell = _pair(self, "cell", self.cell)
        self.late_cell = _pair(self, "late_cell", self.late_cell)
        if self.pooling == "merge":
            self.check_merge_pooling()
        if not _is_number(self.scale_exponent) or self.scale_exponent <= 0:
            raise InvalidOptionError(f"agent: scale_exponent={self.scale_exponent!r} must be a positive finite number")
        if not _is_number(self.shortcut):
            raise InvalidOptionError(f"agent: shortcut={self.shortcut!r} must be a finite number")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidOptionError(f"agent: seed={self.seed!r} must be an int or None")

    def check_merge_pooling(self) -> None:
        """Refuse an ``agent_ratio`` that merge pooling cannot honour: every cell's destination is an agent, so
        there are never fewer than one agent per cell, and a smaller ratio would be silently raised to that.

        Called here for an explicit ``pooling="merge"`` and by the UNet family, where merge is the default.
        """
        floor = 1 / (self.cell[0] * self.cell[1])
        if self.agent_ratio < floor:
            which = "pooling='merge'" if self.pooling == "merge" else "pooling='merge' (the UNet default)"
            raise InvalidOptionError(
                f"agent: {which} makes at least one agent per {self.cell[0]}x{self.cell[1]} cell, so "
                f"agent_ratio={self.agent_ratio:g} is too small; raise it to ≥ {floor:g}, enlarge cell, or use "
                "pooling='grid'"
            )


VMOBA_BACKENDS = ("auto", "torch", "triton", "reference")


@dataclass(kw_only=True)
class VMoBAConfig(MethodConfig):
    r"""VMoBA: mixture-of-block sparse attention for HunyuanVideo video tokens and FLUX image tokens, training-free.

    Keys are cut into blocks of the token grid, each represented by its mean key. Per head, every (query, block)
    gate ``q · mean_k`` is min-max normalised over the whole head; each query keeps its own block and the other
    (query, block) pairs are kept in decreasing order until they hold ``threshold`` of the head's total ("global"
    selection). Queries attend the tokens of their kept blocks plus every text token; text queries attend
    everything.

    Args:
        threshold (`float`, defaults to `0.25`):
            τ, the share of the normalised gate mass to keep, in (0, 1]. ``1`` keeps every block (dense attention).
        blocks (`list`, *optional*):
            Block shapes cycled over the patched layers (layer ``i`` uses ``blocks[i % len(blocks)]``); one side per
            grid axis, ``None`` for the whole axis, e.g. ``[(2, None, None), (None, 4, 4), (2, 4, 4)]`` for
            HunyuanVideo's 1-D (frames), 2-D (patches through all frames) and 3-D (cubes) partitions. ``None``:
            scaled from VMoBA's Wan settings to the grid of each call: HunyuanVideo cycles frames (a tenth of them
            per block), patches (a tenth of the rows x a thirteenth of the columns) and cubes (a fifth x a fifth x a
            thirteenth); FLUX uses blocks of a sixteenth of each side. Blocks under 1024 tokens are grown to about
            that (tiny blocks cost more than they save); a grid smaller than one block runs dense.
        dense_steps (`int`, defaults to `0`):
            The first denoising steps run dense (VMoBA's recipe keeps 12 of 50).
        backend (`str`, defaults to `"auto"`):
            ``"triton"`` (the shared block-sparse kernel: a query tile walks the blocks its queries kept, each query
            masked to its own; GPU), ``"torch"`` (per key block, the queries that kept it, merged by log-sum-exp),
            ``"reference"`` (explicit mask, small sizes only); ``"auto"``: Triton on CUDA when available, else torch.
        layers (`str`, *optional*): see `MethodConfig`.
    """

    name: ClassVar[str] = "vmoba"

    threshold: float = 0.25
    blocks: list[tuple[int | None, ...]] | None = None
    dense_steps: int = 0
    backend: str = field(default="auto", metadata={"choices": VMOBA_BACKENDS})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_number(self.threshold) or not 0.0 < self.threshold <= 1.0:
            raise InvalidOptionError(
                f"vmoba: threshold={self.threshold!r} must be a share of the gate mass in (0, 1] (1 is dense)"
            )
        if self.blocks is not None:
            shapes = self.blocks if isinstance(self.blocks, list | tuple) else None
            if not shapes or not all(isinstance(shape, list | tuple) and shape for shape in shapes):
                raise InvalidOptionError(
                    f"vmoba: blocks={self.blocks!r} must be a non-empty list of block shapes, one side per grid axis, "
                    "e.g. [(2, None, None), (None, 4, 4)]"
                )
            for shape in shapes:
                if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1) for v in shape):
                    raise InvalidOptionError(
                        f"vmoba: block {tuple(shape)!r} must hold positive ints or None (the whole axis)"
                    )
            self.blocks = [tuple(shape) for shape in shapes]
        if not isinstance(self.dense_steps, int) or isinstance(self.dense_steps, bool) or self.dense_steps < 0:
            raise InvalidOptionError(f"vmoba: dense_steps={self.dense_steps!r} must be a non-negative int")
        if self.backend not in VMOBA_BACKENDS:
            raise InvalidOptionError(f"vmoba: backend={self.backend!r} must be one of {', '.join(VMOBA_BACKENDS)}")


def _is_number(value) -> bool:
    # nan slips past every `value < 0` refusal (each comparison with it is false) and inf past every lower bound;
    # either ends as a NaN image.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _require_bool(config: MethodConfig, option: str) -> None:
    # A string such as "no" is truthy: it would switch the part on, the opposite of what it says.
    value = getattr(config, option)
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{config.name}: {option}={value!r} must be True or False")


def _positive_ints(config: MethodConfig, option: str, value) -> int | tuple[int, ...]:
    values = tuple(value) if isinstance(value, list | tuple) else (value,)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise InvalidOptionError(f"{config.name}: {option}={value!r} must be a positive int or one per axis")
    return values[0] if not isinstance(value, list | tuple) else values


def _check_regex(config: MethodConfig, option: str, pattern) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as error:
        raise InvalidOptionError(f"{config.name}: {option}={pattern!r} is not a valid regex ({error})") from None


def _pair(config: MethodConfig, option: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, list | tuple) else None
    # bool is an int to Python, so windows=True would read as 1 window per axis.
    if (
        pair is None
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    ):
        raise InvalidOptionError(f"{config.name}: {option}={value!r} must be a positive int or a pair of them")
    return pair


STRUCTURED_PARSERS = ("auto", "builtin", "spacy")


@dataclass(kw_only=True)
class StructuredConfig(MethodConfig):
    """Structured Diffusion Guidance (SD 1.x / 2.x, SDXL, FLUX): text values from the prompt's noun phrases.

    Each noun phrase is encoded on its own and written over its tokens in a copy of the prompt embedding; every
    cross-attention layer keeps the prompt's attention map (keys) and projects its values from the average of the
    prompt embedding and these copies (one projection: ``to_v`` is linear), on the conditional half of classifier-free
    guidance, at every step. A prompt that is a single noun phrase is left exactly as it is.

    On FLUX the phrases are encoded by T5 (no BOS, so a phrase's tokens start at 0) and the average replaces the
    prompt's T5 embeddings at the transformer's input (the ``encoder_hidden_states`` the pipeline hands it; the
    context embedder is linear, so this is one projection of the averaged embeddings). FLUX has no cross-attention to
    change the values of alone: its text tokens form a stream that each of the 19 double blocks rewrites, so only
    the first block sees the encoder's embeddings, and averaging that block's values would reach one of the 57
    attentions. At the input the phrase-wise encodings shape every block's text keys and values instead; the keys
    are then no longer strictly the prompt's (a phrase token is ``(n · prompt + own) / (n + 1)`` of n phrases). The
    pooled CLIP embedding and a true-CFG negative call are left as they are. ``layers`` does not apply on FLUX.

    Args:
        noun_phrases (`list[str]`, *optional*):
            The phrases to use, each a run of the prompt's words (e.g. ``["a red circle", "a blue square"]``); an
            error lists the prompt's words when one is not in it. ``None``: found by ``parser`` in each prompt.
        parser (`str`, defaults to `"auto"`):
            ``"spacy"`` (spaCy's noun chunks; needs ``en_core_web_sm``), ``"builtin"`` (cuts at conjunctions,
            prepositions, relation words and commas), ``"auto"``: spaCy when its English model is installed, else
            the built-in chunker. Not with ``noun_phrases``, which needs no parser.
        layers (`str`, *optional*): narrows the cross-attention layers (see `MethodConfig`).
    """

    name: ClassVar[str] = "structured"

    noun_phrases: list[str] | None = None
    parser: str = field(default="auto", metadata={"choices": STRUCTURED_PARSERS})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noun_phrases is not None:
            # An empty list would quietly mean "no phrases given" and fall back to the parser.
            if (
                not isinstance(self.noun_phrases, list | tuple)
                or not self.noun_phrases
                or not all(isinstance(p, str) and p.strip() for p in self.noun_phrases)
            ):
                raise InvalidOptionError(
                    f"structured: noun_phrases={self.noun_phrases!r} must be a list of phrases, at least one, e.g. "
                    "['a red circle', 'a blue square'] (or None to find them with parser)"
                )
            self.noun_phrases = list(self.noun_phrases)
        if self.parser not in STRUCTURED_PARSERS:
            raise InvalidOptionError(
                f"structured: parser={self.parser!r} must be one of {', '.join(STRUCTURED_PARSERS)}"
            )
        if self.noun_phrases is not None and self.is_set("parser"):
            raise InvalidOptionError(
                f"structured: parser={self.parser!r} finds the noun phrases, but noun_phrases names them, so the "
                "parser would not run: drop parser or noun_phrases"
            )


ASTAR_LOSSES = ("astar", "attend_excite")
ASTAR_SUBJECTS = ("nouns", "phrases")


@dataclass(kw_only=True)
class AStarConfig(MethodConfig):
    """A-STAR (SD 1.x / 2.x, SDXL, FLUX): test-time latent updates keeping the subjects' attention apart and stable.

    At every guided step one extra UNet forward on the conditional latent records the cross-attention maps of the
    level nearest ``map_side`` (16 x 16: A&E's and A-STAR's resolution); each subject's map is the per-pixel softmax
    over the prompt's tokens (x ``sharpness``, A&E's temperature), averaged over the subject's tokens. The loss is
    A-STAR's segregation (soft overlap of every pair of maps, each smoothed as A&E smooths and min-max-normalised)
    plus retention (overlap with the region each map held at the previous step, binarised at ``threshold``). The
    smoothing and the threshold fill gaps the paper leaves, chosen by measurement on the shipped model (held-out
    seeds, README: with them A-STAR found both objects more often than unsmoothed or at 0.5).
    ``loss="attend_excite"`` uses Attend-and-Excite's loss instead (the most neglected subject's smoothed peak). The
    latent moves down the gradient with A&E's schedule ``step_size · sqrt(1 − progress / 2)``, and the scheduler
    steps from the moved latent.

    On FLUX (guidance-distilled: no guidance batch; packed latents; flow-matching scheduler) the extra forward is of
    the transformer, and the recorded blocks (default: the middle third of all blocks, double and single stream in
    model order; LORE reads 8-43 of FLUX's 57) hand over, beside their ordinary joint output, the image-query x
    text-key logits ``q · kᵀ / √d`` softmax-renormalised over the prompt's own T5 tokens (LORE's convention; EOS and
    padding left out), head- and block-averaged on the image token grid (height / 16 x width / 16). The subjects'
    positions are counted in T5's tokens (``prompt_2`` when given). With true CFG the negative call is not guided but
    sees the moved latent. The defaults are SD's; no FLUX weights were at hand to tune them.

    Args:
        tokens (`list`, *optional*):
            The subjects: words of the prompt (e.g. ``["circle", "square"]``; a word in several tokens counts
            whole) or token indices. ``None``: chosen by ``subjects``. A word that is not in the prompt is an error
            listing the prompt's words.
        subjects (`str`, defaults to `"nouns"`): the subjects when ``tokens`` is ``None``: ``"nouns"``, the last
            word (head noun) of each noun phrase, as A&E and A-STAR pick them; ``"phrases"``, each noun phrase's
            content words together (articles and counts left out), one map averaged over them, so that "red circle"
            and "blue square" are kept apart rather than "circle" and "square".
        loss (`str`, defaults to `"astar"`): ``"astar"`` or ``"attend_excite"``.
        step_size (`float`, defaults to `20.0`): the gradient step at the first step (A&E's scale factor); 0
            leaves the pipeline exactly as it is.
        guided_steps (`float`, defaults to `1.0`):
            Fraction of the schedule with updates (A-STAR: all; A&E: the first half, 0.5).
        refine (`bool`, *optional*): A&E's iterative refinement (``loss="attend_excite"`` only): at the steps 0.0,
            0.2 and 0.4 of the schedule in (A&E's steps 0, 10 and 20 of 50), repeat the step's update, each from a
            fresh forward, until every subject's smoothed peak reaches 0.05, 0.5 and 0.8 (at most 20 repeats).
            ``None``: on for A&E's loss, as its paper and diffusers' pipeline run it; A-STAR's paper updates once a
            step, and its loss has no such target.
        threshold (`float`, defaults to `0.7`): binarisation of the smoothed, normalised maps for retention
            (``loss="astar"`` only).
        sharpness (`float`, defaults to `100.0`): temperature of the per-pixel token softmax.
        map_side (`int`, *optional*): UNets: the recorded level whose larger side is nearest this (``None``: 16,
            A&E's level of SD's 64 x 64 latent). Which level's maps mark the objects is the model's own: on the
            shipped ``shapes-sd`` it is 8 (its 16 x 16 top level barely does). Not for FLUX (one token grid).
        layers (`str`, *optional*): the layers whose maps are recorded: narrows the UNet's cross-attention layers;
            on FLUX, chooses among all blocks (e.g. ``"single_transformer_blocks.1[0-9].attn"``) instead of the
            middle third.
    """

    name: ClassVar[str] = "astar"

    tokens: list[str | int] | None = None
    subjects: str = field(default="nouns", metadata={"choices": ASTAR_SUBJECTS})
    loss: str = field(default="astar", metadata={"choices": ASTAR_LOSSES})
    step_size: float = 20.0
    guided_steps: float = 1.0
    refine: bool | None = None
    threshold: float = 0.7
    sharpness: float = 100.0
    map_side: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens is not None:
            if not isinstance(self.tokens, list | tuple) or not self.tokens:
                raise InvalidOptionError(
                    f"astar: tokens={self.tokens!r} must be a non-empty list of words or token indices, e.g. "
                    "['circle', 'square']"
                )
            self.tokens = list(self.tokens)
        if self.subjects not in ASTAR_SUBJECTS:
            raise InvalidOptionError(f"astar: subjects={self.subjects!r} must be one of {', '.join(ASTAR_SUBJECTS)}")
        if self.tokens is not None and self.subjects != "nouns":
            raise InvalidOptionError(
                f"astar: tokens={self.tokens!r} names the subjects itself; leave subjects={self.subjects!r} out, or "
                "drop tokens"
            )
        if self.loss not in ASTAR_LOSSES:
            raise InvalidOptionError(f"astar: loss={self.loss!r} must be one of {', '.join(ASTAR_LOSSES)}")
        if not _is_number(self.step_size) or self.step_size < 0:
            raise InvalidOptionError(f"astar: step_size={self.step_size!r} must be a non-negative finite number")
        if not _is_number(self.guided_steps) or not 0.0 <= self.guided_steps <= 1.0:
            raise InvalidOptionError(f"astar: guided_steps={self.guided_steps!r} must be a fraction of the schedule")
        if self.refine is not None and not isinstance(self.refine, bool):
            raise InvalidOptionError(f"astar: refine={self.refine!r} must be True, False or None")
        if self.refine and self.loss != "attend_excite":
            raise InvalidOptionError(
                "astar: refine=True repeats updates until A&E's loss meets its targets, so it needs "
                "loss='attend_excite'; A-STAR's loss updates once a step"
            )
        if not _is_number(self.threshold) or not 0.0 < self.threshold < 1.0:
            raise InvalidOptionError(f"astar: threshold={self.threshold!r} must be in (0, 1)")
        if self.loss == "attend_excite" and self.is_set("threshold"):
            raise InvalidOptionError(
                f"astar: threshold={self.threshold!r} binarises A-STAR's retention maps, which loss='attend_excite' "
                "does not use: drop threshold or use loss='astar'"
            )
        if not _is_number(self.sharpness) or self.sharpness <= 0:
            raise InvalidOptionError(f"astar: sharpness={self.sharpness!r} must be a positive finite number")
        if self.map_side is not None and (
            isinstance(self.map_side, bool) or not isinstance(self.map_side, int) or self.map_side < 1
        ):
            raise InvalidOptionError(f"astar: map_side={self.map_side!r} must be a positive int, e.g. 8 or 16")


EDIT_METHODS = ("dpl", "p2p")


@dataclass(kw_only=True)
class EditConfig(_KnowsGivenOptions):
    """Editing a real image with ``accel.edit`` (SD 1.x / 2.x): null-text inversion, then Prompt-to-Prompt, with
    Dynamic Prompt Learning's noun tokens (``method="dpl"``) or without (``"p2p"``).

    Defaults are the references' (Prompt-to-Prompt's null-text notebook; DPL's ``DPL.sh``), with schedule-relative
    settings given as fractions of the schedule so that any step count keeps their meaning. Options of a part that
    does not run (DPL's with ``method="p2p"``, the blend's with ``local_blend=False``) are refused, not ignored.

    Args:
        method (`str`, defaults to `"dpl"`): ``"dpl"`` or ``"p2p"`` (null-text inversion + Prompt-to-Prompt).
        num_inference_steps (`int`, defaults to `50`): DDIM steps of inversion and edit.
        guidance_scale (`float`, defaults to `7.5`): classifier-free guidance of the edit (and of null-text
            inversion, which makes the source branch reconstruct the image at this scale); at least 1.
        null_text_steps (`int`, defaults to `10`): Adam iterations per step on the unconditional embedding (stopping
            early once the latent error is below ``1e-5 + 2e-5 · i`` in 50-step units).
        null_text_lr (`float`, defaults to `1e-2`): their learning rate at the first step, falling linearly to half.
        cross_replace (`float`, defaults to `0.8`): fraction of the schedule in which the edit's cross-attention maps
            come from the source (through the word alignment).
        self_replace (`float`, defaults to `0.4`): fraction in which the edit's self-attention in the coarse layers
            is the source's.
        self_replace_side (`float`, defaults to `0.5`): those coarse layers: token grids whose larger side is at
            most this share of the latent's (the null-text notebook's 32 x 32 of SD's 64 x 64).
        local_blend (`bool`, defaults to `True`): keep the edit inside the attention region of ``blend_words``.
        blend_words (`list[str]`, *optional*): the words whose maps (in either prompt) bound the edit. ``None``: the
            head noun of each phrase the edit changes ("a red circle" -> "a green circle": ``["circle"]``);
            connectors added or removed with a phrase are left out ("a red circle" -> "a red circle next to a blue
            square": ``["square"]``); a change that touches no noun phrase (a lone noun, "left" -> "right", a verb)
            blends on the changed words themselves: pass the object words to choose.
        blend_threshold (`float`, defaults to `0.3`): the region is where the dilated, max-scaled map reaches this.
        blend_start (`float`, defaults to `0.2`): fraction of the schedule before blending starts.
        map_side (`int`, defaults to `16`): the cross-attention level DPL's losses and the local blend read: the
            recorded grid whose larger side is nearest this (16: the references' 16 x 16 of SD's 64 x 64 latent; on
            the shipped ``shapes-sd`` the maps mark objects at 8, see the README).
        reweight (`dict[str, float]`, *optional*): Prompt-to-Prompt's re-weighting: edit-prompt words and the factor
            their attention is multiplied by while maps are injected (e.g. ``{"green": 2.0}``).
        dynamic_words (`list[str]`, *optional*): DPL's nouns (words of the source prompt). ``None``: the head noun
            of each noun phrase.
        dpl_steps (`int`, defaults to `21`): DPL's AdamW iterations per step at most.
        dpl_lr (`float`, defaults to `1e-3`): their learning rate (the embeddings' own scale: a model whose token
            embeddings are larger or smaller than SD's may want another).
        dpl_weights (`tuple`, defaults to `(1.0, 0.05, 0.05)`): weights of the balance, background-leakage and
            disjoint-object losses.
        dpl_targets (`tuple`, defaults to `(0.3, 0.7, 0.9)`) and dpl_decays (`tuple`, defaults to `(25, 50, 25)`):
            each loss's early-stop target at step ``i`` is ``target · exp(−i / decay)`` (in 50-step units).
        dpl_clusters (`int`, defaults to `5`): k-means clusters of the inversion's self-attention; the clusters
            that no noun's map claims (normalised mean above 0.2) are the background.
        seed (`int`, defaults to `0`): seed of DPL's k-means initialisation.
    """

    method: str = field(default="dpl", metadata={"choices": EDIT_METHODS})
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    null_text_steps: int = 10
    null_text_lr: float = 1e-2
    cross_replace: float = 0.8
    self_replace: float = 0.4
    self_replace_side: float = 0.5
    local_blend: bool = True
    blend_words: list[str] | None = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    map_side: int = 16
    reweight: dict[str, float] | None = None
    dynamic_words: list[str] | None = None
    dpl_steps: int = 21
    dpl_lr: float = 1e-3
    dpl_weights: tuple[float, float, float] = (1.0, 0.05, 0.05)
    dpl_targets: tuple[float, float, float] = (0.3, 0.7, 0.9)
    dpl_decays: tuple[float, float, float] = (25.0, 50.0, 25.0)
    dpl_clusters: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        def fail(option: str, rule: str) -> None:
            raise InvalidOptionError(f"edit: {option}={getattr(self, option)!r} {rule}")

        if self.method not in EDIT_METHODS:
            fail("method", f"must be one of {', '.join(EDIT_METHODS)}")
        if not isinstance(self.local_blend, bool):
            fail("local_blend", "must be True or False")
        for option in ("num_inference_steps", "dpl_clusters", "map_side"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(option, "must be a positive integer")
        for option in ("null_text_steps", "dpl_steps", "seed"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(option, "must be a non-negative integer")
        for option in ("guidance_scale", "null_text_lr", "dpl_lr"):
            if not _is_number(getattr(self, option)) or getattr(self, option) < 0:
                fail(option, "must be a non-negative finite number")
        if self.guidance_scale < 1:
            # Below 1 the edit prompt weighs less than the null text; at 0 the edit is the reconstruction.
            fail("guidance_scale", "must be at least 1 (1: the prompts alone, no classifier-free guidance)")
        for option in ("cross_replace", "self_replace", "blend_start", "self_replace_side"):
            if not _is_number(getattr(self, option)) or not 0.0 <= getattr(self, option) <= 1.0:
                fail(option, "must be a fraction in [0, 1]")
        if not _is_number(self.blend_threshold) or not 0.0 < self.blend_threshold <= 1.0:
            fail("blend_threshold", "must be in (0, 1]")
        for option in ("blend_words", "dynamic_words"):
            value = getattr(self, option)
            if value is not None:
                if not isinstance(value, list | tuple) or not value or not all(isinstance(w, str) for w in value):
                    fail(option, "must be a non-empty list of words, e.g. ['circle']")
                setattr(self, option, list(value))
        # Keys are looked up as words of the edit prompt; a number or None as key would fail only mid-edit.
        if self.reweight is not None and (
            not isinstance(self.reweight, dict)
            or not all(isinstance(k, str) for k in self.reweight)
            or not all(_is_number(v) for v in self.reweight.values())
        ):
            fail("reweight", "must map words (strings) to factors, e.g. {'green': 2.0}")
        for option in ("dpl_weights", "dpl_targets", "dpl_decays"):
            value = getattr(self, option)
            if (
                not isinstance(value, list | tuple)
                or len(value) != 3
                or not all(_is_number(v) and v >= 0 for v in value)
            ):
                fail(option, "must be three non-negative finite numbers (balance, background, disjoint)")
            if option == "dpl_decays" and not all(v > 0 for v in value):
                fail(option, "must be positive")
            setattr(self, option, tuple(float(v) for v in value))
        dpl_options = (
            "dynamic_words",
            "dpl_steps",
            "dpl_lr",
            "dpl_weights",
            "dpl_targets",
            "dpl_decays",
            "dpl_clusters",
            "seed",
        )
        if self.method == "p2p":
            for option in dpl_options:
                if self.is_set(option):
                    fail(option, "sets Dynamic Prompt Learning, which method='p2p' does not run: drop it or use 'dpl'")
        if not self.local_blend:
            for option in ("blend_words", "blend_threshold", "blend_start"):
                if self.is_set(option):
                    fail(option, "shapes the local blend, which local_blend=False turns off: drop it or blend")
        if self.null_text_steps == 0 and self.is_set("null_text_lr"):
            fail("null_text_lr", "sets null-text inversion's Adam, which null_text_steps=0 does not run: drop it")
        if self.method == "dpl" and self.dpl_steps == 0:
            for option in ("dpl_lr", "dpl_weights", "dpl_targets", "dpl_decays"):
                if self.is_set(option):
                    fail(option, "shapes DPL's iterations, which dpl_steps=0 does not run: drop it")
        if self.reweight is not None and self.cross_replace == 0:
            fail("reweight", "scales the source's maps while they are injected, and cross_replace=0 injects none")

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the defaults: ``EditConfig(**config.to_dict())`` is ``config`` again."""
        return self.changed_options()
