"""``accel.edit``: change part of a real image by changing the words of its description."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from accel.config import EditConfig
from accel.errors import InvalidOptionError


def edit(
    pipe: Any,
    image: Any,
    source_prompt: str,
    target_prompt: str,
    config: EditConfig | None = None,
    **options: Any,
):
    """Edit ``image``, described by ``source_prompt``, into what ``target_prompt`` describes.

    Swap a word ("a red circle and a blue square" -> "a green circle and a blue square"), add words, or re-weight
    them (``reweight={"green": 2.0}``); the rest of the image is kept. ``method="dpl"`` (the default) learns the
    nouns' embeddings first so their attention, and so the edit, stays on their own objects; ``method="p2p"`` is
    null-text inversion with plain Prompt-to-Prompt. Options are `accel.EditConfig`'s fields.

    Args:
        pipe: a Stable Diffusion 1.x / 2.x pipeline (any scheduler: editing uses its own DDIM schedule).
        image: one image: a PIL image (any 8-bit mode), a uint8 numpy array (HxW, HxWx3, HxWx4), or a float numpy
            array HxWx3 / tensor 3xHxW in [0, 1]; alpha is dropped. Sides divisible by the VAE factor times the
            UNet's down-sampling (64 for SD).
        source_prompt: what the image shows. target_prompt: what it should show.

    Returns:
        `accel.pipelines.editing.EditResult`: ``image`` (edited), ``reconstruction`` (the source branch), the blend
        mask, DPL's background, the words used, per-step losses and timings. The pipeline is left as it was.
    """
    from accel.api import get_patch
    from accel.pipelines.editing import check_pipeline, run_edit

    if config is not None and options:
        raise InvalidOptionError("accel.edit: pass either config=EditConfig(...) or keyword options, not both")
    if config is None:
        known = [f.name for f in dataclasses.fields(EditConfig)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; options: {', '.join(known)}"
                raise InvalidOptionError(f"accel.edit: unknown option {name!r}{hint}")
        config = EditConfig(**options)
    elif not isinstance(config, EditConfig):
        raise InvalidOptionError(f"accel.edit: config must be an accel.EditConfig, got {type(config).__name__}")
    for name, prompt in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidOptionError(f"accel.edit: {name} must be a non-empty string, got {prompt!r}")
    check_pipeline(pipe)
    if get_patch(pipe) is not None:
        raise InvalidOptionError("accel.edit: the pipeline is patched; call accel.unpatch(pipe) first")
    return run_edit(pipe, image, source_prompt, target_prompt, config)
