"""Peer packages that do what an accel method does, patched onto the same pipeline for side-by-side runs.

Peers are benchmark guests, never dependencies: each returns ``None`` where its package is not installed or does
not apply to the model, and otherwise a function that removes it again.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

Remove = Callable[[], None]


def tomesd_patch(pipe, model: str) -> Remove | None:
    """tomesd 0.1.3 (token merging, the agent method's peer) on SD / SDXL UNets, at its README's ratio 0.5."""
    try:
        import tomesd
    except ImportError:
        return None
    if "unet" not in pipe.components:
        return None
    # tomesd's README defaults merge only the top level, which has no attention in SDXL: it would be a no-op.
    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=2 if model.startswith("sdxl") else 1)
    return lambda: tomesd.remove_patch(pipe)


def import_hidiffusion():
    """The ``hidiffusion`` package (0.1.10), which imports a module diffusers 0.42 moved: provide the old name."""
    sys.modules.setdefault(
        "diffusers.pipelines.controlnet.multicontrolnet",
        importlib.import_module("diffusers.models.controlnets.multicontrolnet"),
    )
    import hidiffusion

    return hidiffusion


def hidiffusion_patch(pipe, model: str) -> Remove | None:
    """The reference HiDiffusion package on SD / SDXL UNets (its own defaults, which depend on absolute sizes)."""
    if "unet" not in pipe.components:
        return None
    try:
        hidiffusion = import_hidiffusion()
    except ImportError:
        return None
    # The package reads `name_or_path` as a string (a pipeline built from components has None there).
    if not getattr(pipe.config, "_name_or_path", None):
        pipe.register_to_config(_name_or_path=f"accel/{model}")
    hidiffusion.apply_hidiffusion(pipe)
    return lambda: hidiffusion.remove_hidiffusion(pipe)


# accel method -> (peer name, patch function)
PEERS: dict[str, tuple[str, Callable[..., Remove | None]]] = {
    "agent": ("tomesd", tomesd_patch),
    "hidiffusion": ("hidiffusion package", hidiffusion_patch),
}
