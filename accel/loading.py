"""``accel.load_pipeline``: built-in offline pipelines by name, real ones from a hub id or a local folder."""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch

from accel.errors import PipelineNotFoundError

SHAPES_NAME = "shapes-sd"
# What `accel compare` uses for the shipped model unless told otherwise: its training resolution and a step count
# and guidance at which it draws clean shapes.
_SHAPES_CALL = {"height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 6.0}


def builtin_names() -> tuple[str, ...]:
    from accel.pipelines import tiny

    return (SHAPES_NAME, *tiny.BUILTIN_NAMES)


def default_call_kwargs(name: str) -> dict[str, Any]:
    """Call arguments that suit a built-in pipeline (size, frames, steps); empty for other pipelines."""
    from accel.pipelines import tiny

    if name == SHAPES_NAME:
        return dict(_SHAPES_CALL)
    if name in tiny.BUILTIN_NAMES:
        return {"num_inference_steps": 4, **tiny.default_generation_kwargs(name)}
    return {}


def load_pipeline(
    name_or_path: str,
    *,
    dtype: torch.dtype | None = None,
    num_blocks: int | None = None,
    seed: int = 0,
    **from_pretrained_kwargs: Any,
):
    """Return a diffusers pipeline.

    Args:
        name_or_path: a built-in name (``shapes-sd``, the shipped trained model; ``sd15-tiny``, ``sdxl-tiny``, ``flux-tiny``, ``hunyuanvideo-tiny``, and the
            real-width random-weight ``*-arch`` variants), a hub id (``black-forest-labs/FLUX.1-dev``) or a local
            folder saved with ``save_pretrained``.
        dtype: weights dtype (``torch_dtype`` for ``from_pretrained``).
        num_blocks: for ``*-arch`` pipelines, cap on transformer blocks so they fit in memory.
        seed: weights seed of built-in pipelines.
        **from_pretrained_kwargs: passed to ``DiffusionPipeline.from_pretrained``.
    """
    from accel.pipelines import shapes, tiny

    if name_or_path == SHAPES_NAME:
        if num_blocks is not None or from_pretrained_kwargs:
            raise PipelineNotFoundError(f"{SHAPES_NAME} is the shipped trained model; it takes only dtype=")
        return shapes.load_shapes_pipeline(dtype=dtype)
    if name_or_path in tiny.BUILTIN_NAMES:
        if from_pretrained_kwargs:
            raise PipelineNotFoundError(
                f"{name_or_path} is built in; from_pretrained options {sorted(from_pretrained_kwargs)} do not apply"
            )
        return tiny.build_pipeline(name_or_path, dtype=dtype, num_blocks=num_blocks, seed=seed)
    if num_blocks is not None:
        raise PipelineNotFoundError("num_blocks applies to the built-in *-arch pipelines only")

    from diffusers import DiffusionPipeline

    if dtype is not None:
        from_pretrained_kwargs.setdefault("dtype", dtype)
    if os.path.isdir(name_or_path):
        return DiffusionPipeline.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if "/" not in name_or_path.strip("/"):
        close = difflib.get_close_matches(name_or_path, builtin_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PipelineNotFoundError(
            f"{name_or_path!r} is not a built-in pipeline, a local folder or a hub id (owner/name); "
            f"built-in pipelines: {', '.join(builtin_names())}.{hint}"
        )
    try:
        return DiffusionPipeline.from_pretrained(name_or_path, **from_pretrained_kwargs)
    except (OSError, ValueError) as error:
        raise PipelineNotFoundError(
            f"the weights of {name_or_path!r} are not on this machine and could not be downloaded ({error}). "
            f"Download them where the hub is reachable (`hf download {name_or_path} --local-dir DIR`) and pass DIR, "
            f"or use a built-in pipeline: {', '.join(builtin_names())}"
        ) from error
