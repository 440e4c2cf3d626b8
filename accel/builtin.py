"""Appliers of the methods that ship with accel. Importing this module registers them."""

from __future__ import annotations

import dataclasses
import re

from accel.config import (
    AgentConfig,
    AStarConfig,
    DenseConfig,
    GNAConfig,
    HiDiffusionConfig,
    StructuredConfig,
    VMoBAConfig,
)
from accel.errors import InvalidOptionError, PatchConflictError, UnsupportedModelError
from accel.plan import PatchPlan
from accel.registry import register_method

GRID_AXES = {"flux": ("rows", "cols"), "hunyuanvideo": ("frames", "rows", "cols")}


def _refuse_extra_image_tokens(pipe, method: str) -> None:
    """Methods that lay the image tokens out on the latent's grid cannot place the tokens some pipelines append
    (FLUX Kontext's reference image)."""
    if pipe is not None and "Kontext" in type(pipe).__name__:
        raise UnsupportedModelError(
            f"{method}: {type(pipe).__name__} appends the reference image's tokens to the latent's, and {method} lays "
            "the image tokens out on the latent's grid; use it with FluxPipeline, FluxImg2ImgPipeline or another "
            "pipeline whose transformer sees the latent's tokens alone"
        )


def _refuse_triton_where_it_cannot_run(method: str, backend: str) -> None:
    """``backend="triton"`` on a machine with no CUDA device would fail only inside the first call (or a later one,
    where small grids take another path); a model moved to the GPU after patching is fine, so only a machine without
    one is refused."""
    import torch

    from accel.kernels.block_sparse import triton, triton_usable

    if backend != "triton" or triton_usable("cuda" if torch.cuda.is_available() else "cpu"):
        return
    missing = "triton is not installed" if triton is None else "this machine has no CUDA device"
    raise InvalidOptionError(
        f"{method}: backend='triton' runs the Triton kernel on a CUDA GPU, and {missing}; use backend='auto' (Triton "
        "where it can run, the torch path elsewhere) or 'torch'"
    )


@register_method(DenseConfig, families=("unet", "flux", "hunyuanvideo"))
def apply_dense(plan: PatchPlan, config: DenseConfig) -> None:
    for site in plan.select(config):
        plan.set_processor(site, plan.dense_processor(site))


@register_method(HiDiffusionConfig, families=("unet",))
def apply_hidiffusion(plan: PatchPlan, config: HiDiffusionConfig) -> None:
    _refuse_triton_where_it_cannot_run("hidiffusion", config.backend)
    from accel.pipelines import hidiffusion
    from accel.processors.hidiffusion import MSWMSAAttnProcessor

    unet = plan.denoiser
    try:
        hidiffusion.unet_shape(unet)
    except ValueError as error:
        raise UnsupportedModelError(str(error)) from None
    if config.mswmsa:
        names = hidiffusion.window_layer_names(unet)
        for index, site in enumerate(plan.select(config, kinds=("self",), where=lambda s: s.name in names)):
            processor = MSWMSAAttnProcessor(
                context=plan.context,
                layer=site.name,
                layer_index=index,
                windows=config.windows,
                window_size=config.window_size,
                shift=config.shift,
                shift_seed=config.shift_seed,
                backend=config.backend,
            )
            plan.set_processor(site, processor)
    if config.raunet:
        state = hidiffusion.RAUNetState(
            plan.context, unet.config.sample_size, (config.raunet_switch, config.raunet_deep_switch)
        )
        plan.context.companions.append(state)
        for module, hook, name in hidiffusion.raunet_hooks(unet, state):
            plan.add_hook(module, hook, name)


@register_method(GNAConfig, families=("flux", "hunyuanvideo"))
def apply_gna(plan: PatchPlan, config: GNAConfig) -> None:
    _refuse_triton_where_it_cannot_run("gna", config.backend)
    from accel.pipelines import gna

    processor_class, default_geometry = gna.PROCESSORS[plan.family.name]
    _refuse_extra_image_tokens(plan.pipeline, "gna")
    sites = plan.select(config)
    if config.dense_layers is not None:
        dense = re.compile(config.dense_layers)
        kept = [s for s in sites if not dense.fullmatch(s.name)]
        if len(kept) == len(sites):
            raise InvalidOptionError(
                f"gna: dense_layers={config.dense_layers!r} matches none of the layers it patches "
                f"(e.g. {sites[0].name}); fix the regex (it must match a whole name)"
            )
        if not kept:
            raise InvalidOptionError(
                f"gna: dense_layers={config.dense_layers!r} matches every layer it patches, so nothing would be "
                "sparse; narrow the regex, or leave the pipeline unpatched"
            )
        sites = kept
    normalised = {}
    for pattern, overrides in (config.per_layer or {}).items():
        if not any(re.fullmatch(pattern, s.name) for s in sites):
            raise InvalidOptionError(
                f"gna: per_layer pattern {pattern!r} matches none of the patched layers (e.g. {sites[0].name})"
            )
        # The overrides obey the same rules as the top-level options and take the same normal form (lists from
        # JSON become tuples): the config checks and converts them there.
        try:
            checked = dataclasses.replace(config, per_layer=None, **overrides)
        except InvalidOptionError as error:
            raise InvalidOptionError(f"gna: per_layer[{pattern!r}]: {str(error).removeprefix('gna: ')}") from None
        normalised[pattern] = {option: getattr(checked, option) for option in overrides}
    if normalised:
        config = dataclasses.replace(config, per_layer=normalised)
    axes = GRID_AXES[plan.family.name]
    settings = {site.name: gna.layer_settings(config, site.name) for site in sites}
    for name, layer in settings.items():
        for option in ("kernel_size", "stride", "dilation", "is_causal"):
            value = getattr(layer, option)
            if isinstance(value, tuple) and len(value) != len(axes):
                raise InvalidOptionError(
                    f"gna: {option}={value!r} (layer {name}) has {len(value)} entries but {plan.family.name} token "
                    f"grids have {len(axes)} axes ({', '.join(axes)}); give one per axis, or one value for all"
                )
    for site in sites:
        processor = processor_class(
            context=plan.context,
            layer=site.name,
            settings=settings[site.name],
            default_geometry=default_geometry,
            dense_steps=config.dense_steps,
            backend=config.backend,
        )
        plan.set_processor(site, processor)


@register_method(AgentConfig, families=("unet", "flux", "hunyuanvideo"))
def apply_agent(plan: PatchPlan, config: AgentConfig) -> None:
    from accel.pipelines import agent

    family = plan.family.name
    _refuse_extra_image_tokens(plan.pipeline, "agent")
    try:
        settings = agent.settings_for(config, family)
    except ValueError as error:
        raise InvalidOptionError(str(error)) from None
    if family == "unet":
        try:
            default_layers = agent.unet_layer_names(plan.denoiser)
        except ValueError:
            default_layers = None
        if default_layers is None and config.layers is None:
            raise UnsupportedModelError(
                f"agent: this UNet's down blocks {tuple(plan.denoiser.config.down_block_types)} are neither SD- nor "
                "SDXL-shaped, so its highest-resolution attention level is unknown; name the layers with "
                "layers=r'...attn1'"
            )
        sites = plan.select(
            config, kinds=("self",), where=None if config.layers is not None else lambda s: s.name in default_layers
        )
    else:
        sites = plan.select(config)
    processor_class = agent.PROCESSORS[family]
    for site in sites:
        plan.set_processor(site, processor_class(context=plan.context, layer=site.name, settings=settings))


@register_method(VMoBAConfig, families=("flux", "hunyuanvideo"))
def apply_vmoba(plan: PatchPlan, config: VMoBAConfig) -> None:
    _refuse_triton_where_it_cannot_run("vmoba", config.backend)
    from accel.pipelines import vmoba

    family = plan.family.name
    _refuse_extra_image_tokens(plan.pipeline, "vmoba")
    axes = GRID_AXES[family]
    for shape in config.blocks or ():
        if len(shape) != len(axes):
            raise InvalidOptionError(
                f"vmoba: block {shape} has {len(shape)} sides but {family} token grids have {len(axes)} "
                f"({', '.join(axes)}); give one side per axis, None for a whole axis"
            )
    processor_class = vmoba.PROCESSORS[family]
    sites = plan.select(config)
    shapes = tuple(
        vmoba.default_block_shape(family, index)
        if config.blocks is None
        else vmoba.configured_block_shape(config.blocks, index)
        for index in range(len(sites))
    )
    for site, block_shape in zip(sites, shapes, strict=True):
        processor = processor_class(
            context=plan.context,
            layer=site.name,
            block_shape=block_shape,
            threshold=config.threshold,
            dense_steps=config.dense_steps,
            backend=config.backend,
            cycle=shapes,
        )
        plan.set_processor(site, processor)


@register_method(StructuredConfig, families=("unet", "flux"))
def apply_structured(plan: PatchPlan, config: StructuredConfig) -> None:
    from accel.pipelines import structured
    from accel.processors.structured import StructuredAttnProcessor, StructuredValues

    pipe = plan.pipeline
    if plan.family.name == "flux":
        from accel.pipelines.controls import RecentEncodings

        _check_flux_pipeline(pipe, "structured")
        _refuse_other_control(plan, "structured")
        if config.layers is not None:
            raise InvalidOptionError(
                "structured: on FLUX the averaged text embeddings enter at the transformer's input (the text stream "
                "of every block follows from them), so layers=... does not apply; leave it unset"
            )
        encodings = RecentEncodings()
        wrapper = structured.flux_encode_prompt_wrapper(pipe, encodings, config.noun_phrases, config.parser)
        plan.wrap_pipeline("encode_prompt", wrapper)
        plan.add_hook(plan.denoiser, structured.StructuredTextHook(encodings, plan.context), structured.TEXT_HOOK_NAME)
        return
    shared = StructuredValues()
    plan.wrap_pipeline(
        "encode_prompt", structured.encode_prompt_wrapper(pipe, shared, config.noun_phrases, config.parser)
    )
    for site in plan.select(config, kinds=("cross",)):
        plan.set_processor(site, StructuredAttnProcessor(context=plan.context, layer=site.name, shared=shared))


@register_method(AStarConfig, families=("unet", "flux"))
def apply_astar(plan: PatchPlan, config: AStarConfig) -> None:
    from accel.pipelines import controls
    from accel.processors.controls import CrossAttentionStore, FluxStoreAttnProcessor, StoreAttnProcessor

    pipe = plan.pipeline
    family = plan.family.name
    if family == "flux":
        _check_flux_pipeline(pipe, "astar")
        _refuse_other_control(plan, "astar")
    if family == "flux" and config.map_side is not None:
        raise InvalidOptionError(
            f"astar: map_side={config.map_side} picks a UNet level; FLUX's maps are its one image token grid, so leave "
            "map_side out (layers=... chooses the recorded blocks)"
        )
    store = CrossAttentionStore() if config.map_side is None else CrossAttentionStore(map_side=config.map_side)
    plan.context.companions.append(store)
    state = controls.GuidanceState(
        store=store,
        loss=config.loss,
        step_size=config.step_size,
        guided_steps=config.guided_steps,
        refine=config.refine if config.refine is not None else config.loss == "attend_excite",
        threshold=config.threshold,
        sharpness=config.sharpness,
        tokens=config.tokens,
        subjects=config.subjects,
    )
    inputs = controls.DENOISER_INPUTS[family]
    plan.wrap_pipeline("encode_prompt", controls.encode_prompt_wrapper(pipe, state, inputs))
    if family == "flux":
        default = controls.default_recorded_layers(plan.sites)
        sites = plan.select(config, where=None if config.layers is not None else lambda s: s.name in default)
        processor_class = FluxStoreAttnProcessor
    else:
        sites = plan.select(config, kinds=("cross",))
        processor_class = StoreAttnProcessor
    for site in sites:
        plan.set_processor(site, processor_class(context=plan.context, layer=site.name, store=store))
    hook = controls.LatentGuidanceHook(state, plan.context, pipe, inputs)
    plan.add_hook(plan.denoiser, hook, controls.GUIDANCE_HOOK_NAME)
    plan.on_remove(lambda: controls.remove_step_shims(state))


def _refuse_other_control(plan: PatchPlan, method: str) -> None:
    """astar and structured both read the prompt's embeddings at the transformer's input (on UNets they would both
    replace the cross-attention processors): one at a time."""
    from accel.pipelines.controls import GUIDANCE_HOOK_NAME
    from accel.pipelines.structured import TEXT_HOOK_NAME

    others = {GUIDANCE_HOOK_NAME: "astar", TEXT_HOOK_NAME: "structured"}
    for _, _, name in plan.hooks:
        if name in others:
            raise PatchConflictError(
                f"methods {others[name]!r} and {method!r} both steer FLUX's text conditioning and cannot be combined "
                "yet; patch one of them"
            )


def _check_flux_pipeline(pipe, method: str) -> None:
    """The controls read FLUX's plain text-to-image inputs (image tokens only, latents alone in ``hidden_states``)."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    if pipe is not None and not isinstance(pipe, FluxPipeline | FluxImg2ImgPipeline):
        raise UnsupportedModelError(
            f"{method}: on FLUX, FluxPipeline and FluxImg2ImgPipeline are supported, not {type(pipe).__name__} "
            "(its transformer inputs carry extra image tokens or channels)"
        )
