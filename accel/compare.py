"""Unpatched vs patched on the same pipeline, prompt and seed: times, speed-up and output drift.

Shared by ``accel compare`` and the Gradio demo, so both report the same numbers the same way.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel import metrics
from accel.errors import InvalidOptionError, PipelineNotFoundError
from accel.registry import method_info

# torch.Generator.manual_seed takes unsigned 64-bit seeds (and maps negative ones onto them, which only confuses).
MAX_SEED = 2**64 - 1


@dataclass
class Comparison:
    """One side-by-side run; ``plain`` / ``patched`` are the first output of each side, floats in [0, 1]
    (``[H, W, 3]`` images, ``[F, H, W, 3]`` videos)."""

    model: str
    method: str
    options: dict[str, Any]
    device: str
    dtype: str
    call: dict[str, Any]
    prompt: str
    steps: int
    seed: int
    repeats: int
    plain_seconds: float
    patched_seconds: float
    plain: np.ndarray = field(repr=False)
    patched: np.ndarray = field(repr=False)
    is_video: bool = False

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.patched_seconds

    @property
    def psnr_db(self) -> float:
        return metrics.psnr(self.plain, self.patched)

    @property
    def max_abs_diff(self) -> float:
        return metrics.max_abs_diff(self.plain, self.patched)

    @property
    def output_size(self) -> dict[str, int]:
        """The size generated (``num_frames`` for videos, ``height``, ``width``), read off the output itself."""
        *frames, height, width, _ = self.plain.shape
        return {**({"num_frames": frames[0]} if frames else {}), "height": height, "width": width}

    def summary(self) -> dict[str, Any]:
        """Record of the run (no pixels). ``psnr_db`` is ``inf`` for identical outputs: write it with
        `strict_json`, which spells such values as the strings ``"inf"`` / ``"nan"``."""
        return {
            "model": self.model,
            "method": self.method,
            "options": self.options,
            "device": self.device,
            "dtype": self.dtype,
            "call": self.call,
            "output_size": self.output_size,
            "prompt": self.prompt,
            "steps": self.steps,
            "seed": self.seed,
            "repeats": self.repeats,
            "plain_seconds": self.plain_seconds,
            "patched_seconds": self.patched_seconds,
            "speedup": self.speedup,
            "psnr_db": self.psnr_db,
            "max_abs_diff": self.max_abs_diff,
        }

    def save(self, out: str | Path, fps: int = 8) -> list[str]:
        """``unpatched`` / ``patched`` as PNG images or MP4 videos under ``out`` (created); their paths."""
        from PIL import Image

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for label, array in (("unpatched", self.plain), ("patched", self.patched)):
            if self.is_video:
                from diffusers.utils import export_to_video

                path = out / f"{label}.mp4"
                # export_to_video scales float frames in [0, 1] itself.
                export_to_video(list(array), str(path), fps=fps)
            else:
                path = out / f"{label}.png"
                Image.fromarray(to_uint8(array)).save(path)
            paths.append(str(path))
        return paths


def strict_json(record: Any, **dumps_options: Any) -> str:
    """``json.dumps`` that stays strict JSON: infinite and NaN floats (PSNR of identical outputs is infinite), which
    JSON has no literal for and ``json.dumps`` would write as bare ``Infinity`` / ``NaN``, become the strings
    ``"inf"``, ``"-inf"`` and ``"nan"``; ``float()`` reads them back."""

    def spelled(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {key: spelled(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [spelled(item) for item in value]
        return value

    return json.dumps(spelled(record), allow_nan=False, **dumps_options)


def checked_seed(seed: Any) -> int:
    """``seed`` as an int if ``torch.Generator.manual_seed`` takes it, else a ValueError naming the range (torch's
    own error is "Overflow when unpacking long long")."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed (--seed) must be a whole number from 0 to {MAX_SEED} (2**64 - 1), got {seed!r}")
    return int(seed)


def load_pipeline_or_explain(model: str, **kwargs: Any):
    """``accel.load_pipeline``, with a local folder that holds no saved pipeline reported as accel's error naming
    what to give instead (diffusers raises a bare OSError naming the missing file)."""
    import accel
    from accel.loading import builtin_names

    try:
        return accel.load_pipeline(model, **kwargs)
    except OSError as error:
        # Hub ids are already turned into accel's own error by load_pipeline; this is a folder lacking
        # model_index.json or weight files.
        raise PipelineNotFoundError(
            f"model {model!r} could not be loaded ({error}); give a folder written by save_pretrained, a hub id "
            f"or a built-in name: {', '.join(builtin_names())}"
        ) from None


def check_output_size(pipe, call: dict[str, Any]) -> None:
    """Refuse the sizes a pipeline would round without an error, so that the size asked for (and recorded) is the
    size made: FLUX pipelines round each side down to a multiple of twice the VAE factor with only a logged warning
    (a side below it becomes 0 and fails inside the VAE), video pipelines round the frames to one more than a
    multiple of the VAE's time compression without a word. Other pipelines refuse bad sizes themselves."""
    from accel.pipelines.families import detect_family

    pipeline_name = type(pipe).__name__
    family = detect_family(denoiser_of(pipe))
    if family is not None and family.name == "flux":
        multiple = 2 * pipe.vae_scale_factor
        for name in ("height", "width"):
            side = call.get(name)
            if side is not None and side % multiple:
                made = side // multiple * multiple
                outcome = f"make {made} px" if made else "round it to 0 px and fail"
                give = f"{made} or {made + multiple}" if made else str(multiple)
                raise ValueError(
                    f"{name} (--{name}) {side} is not a multiple of {multiple}: {pipeline_name} would {outcome}; "
                    f"give {give}"
                )
    compression = getattr(pipe, "vae_scale_factor_temporal", None)
    frames = call.get("num_frames")
    if compression and frames is not None and (frames - 1) % compression:
        made = (frames - 1) // compression * compression + 1
        raise ValueError(
            f"num_frames (--frames) {frames} is not one more than a multiple of {compression} (the VAE's time "
            f"compression): {pipeline_name} would make {made} frame{'s' if made > 1 else ''}; give {made} or "
            f"{made + compression}"
        )


def to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def denoiser_of(pipe) -> torch.nn.Module:
    return pipe.components["unet"] if "unet" in pipe.components else pipe.components["transformer"]


def compare(
    pipe,
    method: str,
    options: dict[str, Any],
    call: dict[str, Any],
    *,
    model: str = "",
    seed: int = 0,
    repeats: int = 1,
    warmup: bool = True,
) -> Comparison:
    """Run ``pipe(**call)`` unpatched and patched with ``method`` / ``options``, ``repeats`` times each.

    ``call`` holds the pipeline's call arguments (``prompt``, ``num_inference_steps``, size, frames, guidance).
    The sides alternate, so a drift in the machine's speed hits both; the median of each side is reported. The
    model is unpatched afterwards even when generation fails. Sizes the pipeline would silently round are refused
    (`check_output_size`), so the call recorded is what was generated.
    """
    from accel.api import patched as patched_context

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    seed = checked_seed(seed)
    steps = call.get("num_inference_steps")
    if steps is not None and steps < 1:
        # 0 divides by zero inside the scheduler; a negative count runs no step and would be reported as a result.
        raise ValueError(f"num_inference_steps (--steps) must be at least 1, got {steps}")
    # Video pipelines are the ones whose call takes num_frames; they return .frames, image pipelines .images.
    is_video = "num_frames" in inspect.signature(pipe.__call__).parameters
    if "num_frames" in call and not is_video:
        raise ValueError(
            f"num_frames (--frames) is for video models ({', '.join(_video_builtin_names())}, or another "
            f"HunyuanVideo pipeline); {type(pipe).__name__} makes images: leave num_frames out"
        )
    check_output_size(pipe, call)
    from accel.api import get_patch

    if get_patch(pipe) is not None:
        # Its "unpatched" side would run that patch, and the speed-up and PSNR would compare two patches.
        raise InvalidOptionError(
            "compare: the pipeline is already patched; call accel.unpatch(pipe) first (compare patches the patched "
            "side itself)"
        )
    # Patch once before generating: an unsupported model, a bad option or a layer regex matching nothing fails now,
    # not after the unpatched side has run.
    method_info(method).config_class.from_options(**options)
    with patched_context(pipe, method, **options):
        pass
    device = str(denoiser_of(pipe).device)

    def generate() -> tuple[float, np.ndarray]:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            result = pipe(generator=generator, output_type="np", **call)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        output = result.frames if is_video else result.images
        return time.perf_counter() - start, np.asarray(output[0], dtype=np.float32)

    if warmup:
        # One short call per side first, decode included, so one-time costs (allocator, the VAE's first call, kernel
        # compilation on the patched side) are charged to neither side's timed calls.
        for side in ("unpatched", "patched"):
            generator = torch.Generator(device="cpu").manual_seed(seed)
            context = patched_context(pipe, method, **options) if side == "patched" else contextlib.nullcontext()
            with context, torch.inference_mode():
                pipe(generator=generator, output_type="np", **{**call, "num_inference_steps": 1})

    plain_times, patched_times = [], []
    for _ in range(repeats):
        seconds, plain = generate()
        plain_times.append(seconds)
        with patched_context(pipe, method, **options):
            seconds, patched = generate()
        patched_times.append(seconds)

    return Comparison(
        model=model,
        method=method,
        options=dict(options),
        device=device,
        dtype=str(next(denoiser_of(pipe).parameters()).dtype),
        call={k: v for k, v in call.items() if k != "prompt"},
        prompt=call.get("prompt", ""),
        steps=call.get("num_inference_steps", 0),
        seed=seed,
        repeats=repeats,
        plain_seconds=statistics.median(plain_times),
        patched_seconds=statistics.median(patched_times),
        plain=plain,
        patched=patched,
        is_video=is_video,
    )


def _video_builtin_names() -> list[str]:
    from accel.loading import builtin_names, default_call_kwargs

    return [name for name in builtin_names() if "num_frames" in default_call_kwargs(name)]
