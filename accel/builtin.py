"""Appliers of the methods that ship with accel. Importing this module registers them."""

from __future__ import annotations

from accel.config import DenseConfig, HiDiffusionConfig
from accel.errors import UnsupportedModelError
from accel.plan import PatchPlan
from accel.registry import register_method


@register_method(DenseConfig, families=("unet", "flux", "hunyuanvideo"))
def apply_dense(plan: PatchPlan, config: DenseConfig) -> None:
    for site in plan.select(config):
        plan.set_processor(site, plan.dense_processor(site))


@register_method(HiDiffusionConfig, families=("unet",))
def apply_hidiffusion(plan: PatchPlan, config: HiDiffusionConfig) -> None:
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
            )
            plan.set_processor(site, processor)
    if config.raunet:
        state = hidiffusion.RAUNetState(
            plan.context, unet.config.sample_size, (config.raunet_switch, config.raunet_deep_switch)
        )
        for module, hook, name in hidiffusion.raunet_hooks(unet, state):
            plan.add_hook(module, hook, name)
