"""What every benchmark script shares: medians of timed calls, the device's name, and where results go."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call (``sync`` waits for queued GPU work)."""
    sync = sync or (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU with its core count and torch's thread count (timings depend on both)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def save_results(result: dict, out: str | Path, plot: Callable[[dict, Path], None], plot_name: str) -> Path:
    """``results.json`` and the plot under ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / plot_name)
    return out
