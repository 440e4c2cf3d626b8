"""``accel.enable_context_parallel``: diffusers' context parallelism for a pipeline, with or without an accel patch.

It calls the denoiser's ``enable_parallelism`` (diffusers' mesh, Ulysses attention, split / gather hooks) with the
model's own ``_cp_plan``, or accel's plan for HunyuanVideo (``accel.pipelines.parallel``). accel's step hook must see
the denoiser's inputs before they are split, so a patch in place is taken off and put back over the parallel model.
"""

from __future__ import annotations

from accel.errors import UnsupportedModelError
from accel.pipelines.parallel import HUNYUANVIDEO_CP_PLAN, context_parallel_plan, install_text_mask_sharding


def enable_context_parallel(target, config) -> None:
    """Turn on diffusers' context parallelism for a pipeline's (or a bare) denoiser, patched by accel or not.

    Args:
        target: a pipeline with a ``transformer`` (FLUX, HunyuanVideo, or any model diffusers has a plan for) or
            the denoiser itself.
        config: ``ContextParallelConfig(ulysses_degree=N)`` (accel's sparse methods need Ulysses; ring attention
            serves dense layers only) or a ``ParallelConfig`` holding one.

    Run it in every process of a ``torchrun`` launch, after ``torch.distributed.init_process_group`` and after
    moving the pipeline to its device, as ``enable_parallelism``. Like it, it can be applied once per model.
    """
    from accel.api import get_patch, patch

    denoiser = getattr(target, "transformer", None) or getattr(target, "unet", None) or target
    plan = context_parallel_plan(denoiser)
    if plan is None:
        raise UnsupportedModelError(
            f"{type(denoiser).__name__} has no context-parallel split plan in diffusers or accel; accel provides one "
            "for HunyuanVideoTransformer3DModel and uses diffusers' own for FLUX and the models that declare one"
        )
    handle = get_patch(denoiser)
    configs = handle.configs if handle is not None else None
    if handle is not None:
        handle.remove()
    denoiser.enable_parallelism(config=config, cp_plan=plan)
    if plan is HUNYUANVIDEO_CP_PLAN:
        context = denoiser._parallel_config.context_parallel_config
        install_text_mask_sharding(denoiser, context._flattened_mesh.get_local_rank())
    if configs is not None:
        patch(target, configs)
