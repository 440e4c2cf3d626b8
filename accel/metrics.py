"""Fidelity metrics between two outputs of the same shape (images or videos, any layout)."""

from __future__ import annotations

import math

import numpy as np
import torch


def _as_float64(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().to(torch.float64)


def max_abs_diff(a, b) -> float:
    return float((_as_float64(a) - _as_float64(b)).abs().max())


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical inputs."""
    mse = float(((_as_float64(a) - _as_float64(b)) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def sqnr(reference, approximation) -> float:
    """Signal-to-quantisation-noise ratio in dB, ``20·log10(‖x‖ / ‖x − y‖)``; ``inf`` for identical inputs."""
    reference, approximation = _as_float64(reference), _as_float64(approximation)
    noise = float(torch.linalg.vector_norm(reference - approximation))
    return math.inf if noise == 0 else 20.0 * math.log10(float(torch.linalg.vector_norm(reference)) / noise)
