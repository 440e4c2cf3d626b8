"""accel: one-line attention acceleration for Hugging Face diffusers.

import accel
pipe = accel.load_pipeline("sd15-tiny")   # or any SD / SDXL / FLUX / HunyuanVideo pipeline
handle = accel.patch(pipe, "dense")       # swap the attention
image = pipe("a red circle").images[0]
accel.unpatch(pipe)                       # restored bit for bit
"""

from accel import builtin as _builtin  # noqa: F401  (registers the built-in methods)
from accel.api import PatchHandle, get_patch, patch, patched, unpatch
from accel.config import (
    AgentConfig,
    AStarConfig,
    DenseConfig,
    EditConfig,
    GNAConfig,
    HiDiffusionConfig,
    MethodConfig,
    StructuredConfig,
    VMoBAConfig,
)
from accel.editing import edit
from accel.errors import (
    AccelError,
    InvalidOptionError,
    PatchConflictError,
    PipelineNotFoundError,
    UnknownMethodError,
    UnsupportedModelError,
)
from accel.loading import load_pipeline
from accel.parallel import enable_context_parallel
from accel.plan import PatchPlan
from accel.registry import MethodInfo, methods, register_method, unregister_method

__version__ = "0.1.0"

__all__ = [
    "AccelError",
    "AgentConfig",
    "AStarConfig",
    "DenseConfig",
    "EditConfig",
    "GNAConfig",
    "HiDiffusionConfig",
    "InvalidOptionError",
    "MethodConfig",
    "MethodInfo",
    "PatchConflictError",
    "PatchHandle",
    "PatchPlan",
    "PipelineNotFoundError",
    "StructuredConfig",
    "UnknownMethodError",
    "UnsupportedModelError",
    "VMoBAConfig",
    "edit",
    "enable_context_parallel",
    "get_patch",
    "load_pipeline",
    "methods",
    "patch",
    "patched",
    "register_method",
    "unpatch",
    "unregister_method",
]
