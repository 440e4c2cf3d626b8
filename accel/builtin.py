"""Appliers of the methods that ship with accel. Importing this module registers them."""

from __future__ import annotations

from accel.config import DenseConfig
from accel.plan import PatchPlan
from accel.registry import register_method


@register_method(DenseConfig, families=("unet", "flux", "hunyuanvideo"))
def apply_dense(plan: PatchPlan, config: DenseConfig) -> None:
    for site in plan.select(config):
        plan.set_processor(site, plan.dense_processor(site))
