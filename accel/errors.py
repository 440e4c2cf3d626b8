"""Errors accel raises. Each message names the input at fault and what to do instead."""

from __future__ import annotations


class AccelError(Exception):
    """Base of accel's errors."""


class UnsupportedModelError(AccelError, TypeError):
    """The object is not a diffusers pipeline or denoiser of a supported family."""


class UnknownMethodError(AccelError, ValueError):
    """No registered method has that name."""


class InvalidOptionError(AccelError, ValueError):
    """A method option has an unknown name or an invalid value."""


class PatchConflictError(AccelError, ValueError):
    """Two methods claim the same layer, or a layer holds a processor accel must not replace."""


class PipelineNotFoundError(AccelError, ValueError):
    """A pipeline name is neither built in nor available on this machine."""
