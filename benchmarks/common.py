"""What every benchmark script shares: medians of timed calls, the device's name, and where results go."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from accel.compare import strict_json


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


def interleaved_median_seconds(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    sync: Callable[[], None] | None = None,
    warm_up: bool = True,
) -> dict[str, float]:
    """Median wall time of each callable, timed in turns (one call of each per round, after one warm-up round unless
    ``warm_up`` is False), so that a slow spell of a shared machine falls on every side of a ratio alike."""
    sync = sync or (lambda: None)
    times = {name: [] for name in fns}
    first_timed = 1 if warm_up else 0
    for round_index in range(repeats + first_timed):
        for name, fn in fns.items():
            tick = time.perf_counter()
            fn()
            sync()
            if round_index >= first_timed:
                times[name].append(time.perf_counter() - tick)
    return {name: statistics.median(values) for name, values in times.items()}


def timed_generation(call: Callable[[str], object], repeats: int) -> tuple[float, np.ndarray]:
    """``(seconds, decoded output)`` of ``call(output_type)``, after one untimed warm-up call: with one repeat a
    single call timed with its decode (real-width models take minutes a call), else the median denoising loop
    (``"latent"``) and one decode.

    The warm-up is per side: a freshly loaded pipeline pays its one-time costs (allocation, kernel selection, the
    VAE's first decode) on its first call and a freshly patched one its own (Triton compilation), which timed cold
    would be charged to whichever side runs first and inflate or deflate the speed-up."""
    if repeats == 1:
        call("np")
        tick = time.perf_counter()
        output = np.asarray(call("np"), dtype=np.float32)
        return time.perf_counter() - tick, output
    return median_seconds(lambda: call("latent"), repeats), np.asarray(call("np"), dtype=np.float32)


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU with its core count and torch's thread count (timings depend on both)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment() -> dict:
    """Versions a result depends on, recorded beside its numbers."""
    import diffusers

    import accel

    versions = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    versions["accel"] = accel.__version__
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        try:
            import triton

            versions["triton"] = triton.__version__
        except ImportError:
            pass
    return versions


def save_results(result: dict, out: str | Path, plot: Callable[[dict, Path], None], plot_name: str) -> Path:
    """``results.json`` and the plot under ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Strict JSON: an infinite PSNR (identical outputs) is written as the string "inf".
    (out / "results.json").write_text(strict_json(result, indent=2))
    plot(result, out / plot_name)
    return out


def plot_speedups(path: Path, labels: list[str], bars: list[tuple[str, list[float]]], title: str) -> None:
    """Grouped bars of speed-ups (one group per label, one bar per series) with the break-even line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    positions = list(range(len(labels)))
    width = 0.8 / len(bars)
    for index, (label, values) in enumerate(bars):
        offset = (index - (len(bars) - 1) / 2) * width
        ax.bar([p + offset for p in positions], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xticks(positions, labels, rotation=15, ha="right", fontsize=7)
    ax.set_ylabel("x faster than the baseline")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a finished figure as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_common_arguments(parser, method: str) -> None:
    """The options every benchmark script takes: method options, steps, repeats, threads, output folder."""
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=f"{method} option")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None)


def run_suite(args, suites: dict, prefix: str, plot: Callable[[dict, Path], None]) -> int:
    """Run ``suites[args.suite]`` with torch's thread count set, record the run's settings, save JSON and plot."""
    import sys

    torch.set_num_threads(args.threads)
    result = suites[args.suite](args)
    result.update(threads=args.threads, versions=environment(), repeats=args.repeats, argv=sys.argv[1:])
    save_results(result, args.out or f"benchmarks/results/{prefix}-{args.suite}", plot, "speedup.png")
    return 0


class PeakMemory:
    """Peak bytes of the tensors that torch ops allocate inside the ``with`` block (inputs excluded).

    A dispatch mode sees every op's outputs; a storage counts from its first appearance until it is freed. Buffers
    that a fused kernel keeps internally are not seen, but anything Python-level code materialises is.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self._mode = _Mode()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def _record(self, out) -> None:
        import weakref

        from torch.utils._pytree import tree_leaves

        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = leaf.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self._live:
                self._live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
