"""End to end: every method on every model family it supports, against the unpatched pipeline and the peers.

    python benchmarks/pipeline.py                          # tiny models at high resolution (>= 16K tokens)
    python benchmarks/pipeline.py --models sd15-arch flux-arch --repeats 1   # real widths, random weights
    python benchmarks/pipeline.py --quick                  # small sizes, 2 steps, 1 run: the CI smoke

For each model and size, the unpatched pipeline, ``accel.patch(pipe, method)`` with the method's defaults for each
method the model supports, and each method's peer package where it is installed (tomesd for ``agent``, the
``hidiffusion`` package for ``hidiffusion``; each with its own defaults) run the same prompt and seed. Time: the
denoising loop (``output_type="latent"``), median of ``--repeats`` after a warm-up; with ``--repeats 1`` one call
including the VAE decode, after an untimed warm-up call (each side, so the first side is not charged the pipeline's
one-time costs). Drift: PSNR of the decoded output against the unpatched one. Results go to
``benchmarks/results/pipeline[-quick]/`` as JSON and a grouped-bar plot of speed-ups over unpatched.

HiDiffusion's defaults depend on the size relative to the training size (``unet.config.sample_size``: 128 px for
the tiny UNets), the package's on absolute sizes, so the two do different work here; ``hidiffusion_peer.py`` runs
them at equal settings.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import device_name, environment, plot_speedups, save_results, timed_generation
from peers import PEERS

import accel
from accel import metrics

PROMPT = "a red circle and a blue square"
FLUX_TEXT = {"max_sequence_length": 32}

# model -> (call sizes, methods)
CASES = {
    "sd15-tiny": ([{"height": 1024, "width": 1024}], ["agent", "hidiffusion"]),
    "sdxl-tiny": ([{"height": 1024, "width": 1024}], ["agent", "hidiffusion"]),
    "flux-tiny": ([{"height": 2048, "width": 2048, **FLUX_TEXT}], ["gna", "agent", "vmoba"]),
    "hunyuanvideo-tiny": (
        [{"height": 512, "width": 1024, "num_frames": 29, **FLUX_TEXT}],
        ["gna", "agent", "vmoba"],
    ),
    "sd15-arch": ([{"height": 1024, "width": 1024}], ["agent", "hidiffusion"]),
    "sdxl-arch": ([{"height": 1024, "width": 1024}], ["agent", "hidiffusion"]),
    "flux-arch": ([{"height": 2048, "width": 2048, **FLUX_TEXT}], ["gna", "agent", "vmoba"]),
    "hunyuanvideo-arch": ([{"height": 512, "width": 512, "num_frames": 13, **FLUX_TEXT}], ["gna", "agent", "vmoba"]),
}
DEFAULT_MODELS = ["sd15-tiny", "sdxl-tiny", "flux-tiny", "hunyuanvideo-tiny"]
QUICK_CASES = {
    "sd15-tiny": ([{"height": 256, "width": 256}], ["agent", "hidiffusion"]),
    "flux-tiny": ([{"height": 256, "width": 256, **FLUX_TEXT}], ["gna", "agent", "vmoba"]),
    "hunyuanvideo-tiny": ([{"height": 128, "width": 128, "num_frames": 9, **FLUX_TEXT}], ["gna", "agent", "vmoba"]),
}


def size_label(size: dict) -> str:
    return "x".join(str(size[key]) for key in ("num_frames", "height", "width") if key in size)


def _measure(pipe, size: dict, steps: int, repeats: int) -> tuple[float, np.ndarray]:
    def call(output_type):
        result = pipe(
            prompt=PROMPT,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
            **size,
        )
        return result.frames if hasattr(result, "frames") else result.images

    return timed_generation(call, repeats)


def run(args) -> dict:
    cases = QUICK_CASES if args.quick else CASES
    models = args.models or (list(QUICK_CASES) if args.quick else DEFAULT_MODELS)
    rows = []
    for model in models:
        sizes, methods = cases[model]
        if args.methods:
            methods = [m for m in methods if m in args.methods]
        pipe = accel.load_pipeline(model, num_blocks=args.num_blocks) if model.endswith("-arch") else None
        pipe = pipe or accel.load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        denoiser = pipe.components.get("unet") or pipe.components["transformer"]
        for size in sizes:
            unpatched_s, unpatched = _measure(pipe, size, args.steps, args.repeats)
            base = {
                "model": model,
                "num_blocks": args.num_blocks if model.endswith("-arch") else None,
                "dtype": str(denoiser.dtype),
                "size": size_label(size),
                "steps": args.steps,
                "unpatched_s": unpatched_s,
            }
            print(f"{model:18s} {size_label(size):12s} unpatched {unpatched_s:8.2f} s", flush=True)
            sides = [(method, "accel", method) for method in methods]
            sides += [(PEERS[m][0], "peer", m) for m in methods if m in PEERS]
            for name, kind, method in sides:
                if kind == "accel":
                    with accel.patched(pipe, method):
                        seconds, output = _measure(pipe, size, args.steps, args.repeats)
                else:
                    remove = PEERS[method][1](pipe, model)
                    if remove is None:
                        continue
                    try:
                        seconds, output = _measure(pipe, size, args.steps, args.repeats)
                    finally:
                        remove()
                row = {
                    **base,
                    "side": name,
                    "kind": kind,
                    "method": method,
                    "seconds": seconds,
                    "speedup": unpatched_s / seconds,
                    "psnr_db": metrics.psnr(unpatched, output),
                }
                rows.append(row)
                print(
                    f"{'':18s} {'':12s} {name:20s} {seconds:8.2f} s  {row['speedup']:5.2f}x  "
                    f"PSNR {row['psnr_db']:5.1f} dB",
                    flush=True,
                )
        del pipe
    timed = (
        "one call incl. VAE decode, after a warm-up call"
        if args.repeats == 1
        else f"denoising loop, median of {args.repeats}"
    )
    return {
        "suite": "pipeline",
        "device": device_name("auto"),
        "baseline": f"the unpatched pipeline, same prompt, seed and steps ({timed})",
        "prompt": PROMPT,
        "quick": args.quick,
        "rows": rows,
    }


def _plot(result: dict, path) -> None:
    labels = list(dict.fromkeys(f"{r['model']} {r['size']}" for r in result["rows"]))
    sides = list(dict.fromkeys(r["side"] for r in result["rows"]))
    speedups = {(f"{r['model']} {r['size']}", r["side"]): r["speedup"] for r in result["rows"]}
    bars = [(side, [speedups.get((label, side), 0.0) for label in labels]) for side in sides]
    steps = {r["steps"] for r in result["rows"]}
    dtypes = {r["dtype"].replace("torch.", "") for r in result["rows"]}
    title = (
        f"end to end on {result['device']}, {'/'.join(sorted(dtypes))}, {'/'.join(map(str, sorted(steps)))} steps; "
        f"baseline: {result['baseline']}"
    )
    plot_speedups(path, labels, bars, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=None, help="subset of each model's methods")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 steps, one run (CI smoke)")
    parser.add_argument("--steps", type=int, default=None, help="default 4 (quick: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--num-blocks", type=int, default=2, help="transformer blocks of the *-arch DiTs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick and args.models and not set(args.models) <= set(QUICK_CASES):
        parser.error(f"--quick runs {', '.join(QUICK_CASES)}")
    args.steps = args.steps or (2 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 3)
    import os
    import sys

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    result = run(args)
    result.update(threads=torch.get_num_threads(), versions=environment(), argv=sys.argv[1:] if argv is None else argv)
    out = args.out or ("benchmarks/results/pipeline-quick" if args.quick else "benchmarks/results/pipeline")
    save_results(result, out, _plot, "speedup.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
