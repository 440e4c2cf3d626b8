"""accel's HiDiffusion side by side with the reference package (``hidiffusion`` 0.1.10 from PyPI).

    python benchmarks/hidiffusion_peer.py --models sd15-tiny sdxl-tiny --sizes 1024 --steps 4

The package does not import on diffusers 0.42 (``diffusers.pipelines.controlnet.multicontrolnet`` moved to
``diffusers.models.controlnets.multicontrolnet``); this script provides the old module name before importing it.
It is a peer for benchmarks only, never a dependency of accel.

For each model and size, same prompt, seed and steps: the unpatched pipeline, ``hidiffusion.apply_hidiffusion``
and ``accel.patch(pipe, "hidiffusion")`` are timed (median of ``--repeats``). The package draws each window shift
from the global RNG; the script records those draws and replays them in accel (same shift per layer and step), so
the drift between the two measures the difference of the algorithms, not of the random shifts.

Equal work: the package picks its RAU-Net switches from absolute latent sizes (tuned for SD 1.5's 512 px and SDXL's
1024 px), accel from ``unet.config.sample_size``, which is 128 px for the tiny UNets, so at 1024 px accel would run
its 8x-resolution schedule and the package its 2x one. The script therefore gives accel the package's switches
(``--accel-option``, default ``raunet_switch=0.4 raunet_deep_switch=0``), and 5 steps, where the package's
``int(0.4 * steps)`` and accel's ``step / steps < 0.4`` select the same steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, save_figure, save_results
from peers import import_hidiffusion

import accel
from accel import metrics
from accel.processors.hidiffusion import MSWMSAAttnProcessor


class ShiftRecorder:
    """Wraps ``torch.rand`` while the package runs: its MSW-MSA blocks draw one number per block call."""

    def __init__(self):
        self.draws: list[float] = []
        self._rand = torch.rand

    def __enter__(self):
        def recording_rand(*args, **kwargs):
            value = self._rand(*args, **kwargs)
            if args == (1,) and not kwargs:
                self.draws.append(float(value))
            return value

        torch.rand = recording_rand
        return self

    def __exit__(self, *exc):
        torch.rand = self._rand


def replay_shifts(draws: list[float], layers: int, steps: int):
    """A ``_shift`` for accel's processor giving the package's shift for each (step, layer) (its quarter rule)."""
    per_call = draws[-layers * steps :]

    def shift(processor, grid, windows):
        index = processor.context.step.step_index * layers + processor.layer_index
        value = per_call[index]
        quarter = 0 if value <= 0.25 else 1 if value <= 0.5 else 2 if value <= 0.75 else 3
        sizes = [-(-side // count) for side, count in zip(grid, windows, strict=True)]
        return tuple(size // 4 * quarter for size in sizes)

    return shift


def _median(fn, repeats: int):
    # One untimed warm-up call when repeating; a single run is timed cold (one-time costs are small on CPU).
    result = fn() if repeats > 1 else None
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times), result


def run(args) -> dict:
    from accel.cli import parse_options

    hidiffusion = import_hidiffusion()
    accel_options = parse_options(args.accel_option)
    rows = []
    for model in args.models:
        pipe = accel.load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        # The package reads `name_or_path` as a string (a pipeline built from components has None there).
        pipe.register_to_config(_name_or_path=f"accel/{model}")
        for size in args.sizes:

            def generate(pipe=pipe, size=size):
                return pipe(
                    prompt="a red circle and a blue square",
                    height=size,
                    width=size,
                    num_inference_steps=args.steps,
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                ).images[0]

            unpatched_s, unpatched = _median(generate, args.repeats)
            hidiffusion.apply_hidiffusion(pipe)
            try:
                with ShiftRecorder() as recorder:
                    theirs_s, theirs = _median(generate, args.repeats)
            finally:
                hidiffusion.remove_hidiffusion(pipe)
            with accel.patched(pipe, "hidiffusion", **accel_options) as handle:
                ours_s, ours = _median(generate, args.repeats)
                layers = sum(isinstance(p, MSWMSAAttnProcessor) for p in pipe.unet.attn_processors.values())
            original_shift = MSWMSAAttnProcessor._shift
            MSWMSAAttnProcessor._shift = replay_shifts(recorder.draws, layers, args.steps)
            try:
                with accel.patched(pipe, "hidiffusion", **accel_options):
                    ours_replayed = generate()
            finally:
                MSWMSAAttnProcessor._shift = original_shift
            del handle
            row = {
                "model": model,
                "size": size,
                "steps": args.steps,
                "unpatched_s": unpatched_s,
                "hidiffusion_package_s": theirs_s,
                "accel_s": ours_s,
                "accel_over_package": ours_s / theirs_s,
                "speedup_package": unpatched_s / theirs_s,
                "speedup_accel": unpatched_s / ours_s,
                "psnr_db_accel_vs_package_same_shifts": metrics.psnr(theirs, ours_replayed),
                "max_abs_diff_accel_vs_package_same_shifts": float(np.abs(theirs - ours_replayed).max()),
                "psnr_db_accel_vs_unpatched": metrics.psnr(unpatched, ours),
                "psnr_db_package_vs_unpatched": metrics.psnr(unpatched, theirs),
            }
            rows.append(row)
            print(
                f"{model:10s} {size:5d}px: unpatched {unpatched_s:7.2f} s  package {theirs_s:7.2f} s "
                f"({row['speedup_package']:.2f}x)  accel {ours_s:7.2f} s ({row['speedup_accel']:.2f}x)  "
                f"accel/package {row['accel_over_package']:.2f}  same-shift PSNR "
                f"{row['psnr_db_accel_vs_package_same_shifts']:.1f} dB",
                flush=True,
            )
    return {
        "device": device_name("auto"),
        "dtype": "fp32",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "accel_options": accel_options,
        "rows": rows,
    }


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['model']}\n{r['size']} px" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, [r["speedup_package"] for r in rows], 0.4, label="hidiffusion 0.1.10")
    ax.bar(x + 0.2, [r["speedup_accel"] for r in rows], 0.4, label="accel hidiffusion")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("x faster than unpatched")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"HiDiffusion on {result['device']}, fp32, {rows[0]['steps']} steps; baseline: unpatched", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15-tiny", "sdxl-tiny"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--accel-option", nargs="*", default=["raunet_switch=0.4", "raunet_deep_switch=0"], metavar="KEY=VALUE"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="benchmarks/results/hidiffusion-peer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    save_results(result, args.out, _plot, "speedup.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
