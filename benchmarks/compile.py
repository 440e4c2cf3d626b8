"""What torch.compile adds to each method: the denoiser eager and compiled, unpatched and patched, side by side.

    python benchmarks/compile.py                               # tiny models, inductor, on the GPU when there is one
    python benchmarks/compile.py --models sd15-arch flux-arch --dtype bf16
    python benchmarks/compile.py --models sd15-tiny --methods hidiffusion --backend aot_eager
    python benchmarks/compile.py --quick                       # 256 px, Dynamo's eager backend, 2 steps: the CI smoke

For each model, size and method (``unpatched`` is the pipeline as loaded): the denoising loop eager and with the
denoiser compiled (``torch.compile(denoiser, backend=...)`` after ``accel.patch``, the order accel asks for). The
first compiled call is timed apart (it compiles every graph the run needs); the rest are medians of ``--repeats``
after it, eager and compiled in turns. Speed-ups are ratios to the unpatched eager loop of the same run; the drift
is the compiled output's largest difference from the eager patched one (the same method, so it measures compilation
alone). Dynamo's counters give the graphs compiled and the graph breaks of each compiled side. Results go to
``benchmarks/results/compile[-<device kind>]/`` as JSON and a grouped-bar plot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from common import device_name, environment, interleaved_median_seconds, plot_speedups, save_results

import accel

PROMPT = "a red circle and a blue square"
TEXT = {"max_sequence_length": 32}

# model -> (call size, methods)
CASES = {
    "sd15-tiny": ({"height": 512, "width": 512}, ["hidiffusion", "agent"]),
    "sdxl-tiny": ({"height": 512, "width": 512}, ["hidiffusion", "agent"]),
    "flux-tiny": ({"height": 512, "width": 512, **TEXT}, ["gna", "agent", "vmoba"]),
    "hunyuanvideo-tiny": ({"height": 256, "width": 256, "num_frames": 9, **TEXT}, ["gna", "agent", "vmoba"]),
    "sd15-arch": ({"height": 1024, "width": 1024}, ["hidiffusion", "agent"]),
    "sdxl-arch": ({"height": 1024, "width": 1024}, ["hidiffusion", "agent"]),
    "flux-arch": ({"height": 1024, "width": 1024, **TEXT}, ["gna", "agent", "vmoba"]),
    "hunyuanvideo-arch": ({"height": 512, "width": 512, "num_frames": 13, **TEXT}, ["gna", "agent", "vmoba"]),
}
DEFAULT_MODELS = ["sd15-tiny", "flux-tiny"]
QUICK_SIZE = {"height": 256, "width": 256}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def size_label(size: dict) -> str:
    return "x".join(str(size[key]) for key in ("num_frames", "height", "width") if key in size)


def _denoiser_attribute(pipe) -> str:
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def _loop(pipe, size: dict, steps: int, device: str):
    def call():
        result = pipe(
            prompt=PROMPT,
            num_inference_steps=steps,
            generator=torch.Generator(device).manual_seed(0),
            output_type="latent",
            **size,
        )
        return (result.frames if hasattr(result, "frames") else result.images).float().cpu()

    return call


def _measure_side(pipe, size, args, sync) -> dict:
    """One patch state of ``pipe``: its loop eager and compiled (first call apart, then medians in turns)."""
    from torch._dynamo.utils import counters

    attribute = _denoiser_attribute(pipe)
    denoiser = getattr(pipe, attribute)
    eager_call = _loop(pipe, size, args.steps, args.device)
    eager_out = eager_call()
    compiled = torch.compile(denoiser, backend=args.backend)
    torch._dynamo.reset()
    counters.clear()

    def compiled_call():
        setattr(pipe, attribute, compiled)
        try:
            return eager_call()
        finally:
            setattr(pipe, attribute, denoiser)

    tick = time.perf_counter()
    compiled_out = compiled_call()
    sync()
    first = time.perf_counter() - tick
    times = interleaved_median_seconds({"eager": eager_call, "compiled": compiled_call}, args.repeats, sync=sync)
    breaks = sum(counters["graph_break"].values())
    return {
        "eager_s": times["eager"],
        "compiled_s": times["compiled"],
        "first_compiled_call_s": first,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": breaks,
        "max_abs_drift": float((compiled_out - eager_out).abs().max()),
        "finite": bool(np.isfinite(compiled_out.numpy()).all()),
    }


def run(args) -> dict:
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = []
    for model in args.models:
        size, methods = CASES[model]
        if args.quick:
            size = {**size, **QUICK_SIZE}
        if args.methods:
            methods = [m for m in methods if m in args.methods]
        options = {"num_blocks": args.num_blocks} if model.endswith("-arch") else {}
        pipe = accel.load_pipeline(model, dtype=DTYPES[args.dtype], **options).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        baseline = None
        for method in ["unpatched", *methods]:
            if method == "unpatched":
                side = _measure_side(pipe, size, args, sync)
                baseline = side["eager_s"]
            else:
                with accel.patched(pipe, method):
                    side = _measure_side(pipe, size, args, sync)
            row = {
                "model": model,
                "size": size_label(size),
                "method": method,
                **side,
                "eager_speedup": baseline / side["eager_s"],
                "compiled_speedup": baseline / side["compiled_s"],
            }
            rows.append(row)
            print(
                f"{model:18s} {row['size']:10s} {method:12s} eager {side['eager_s']:7.2f} s ({row['eager_speedup']:4.2f}x)"
                f"  compiled {side['compiled_s']:7.2f} s ({row['compiled_speedup']:4.2f}x)  first compiled call "
                f"{side['first_compiled_call_s']:6.1f} s  graphs {side['graphs']}  breaks {side['graph_breaks']}  "
                f"drift {side['max_abs_drift']:.1e}",
                flush=True,
            )
        del pipe
    return {
        "suite": "compile",
        "device": device_name(args.device),
        "backend": args.backend,
        "dtype": args.dtype,
        "steps": args.steps,
        "quick": args.quick,
        "baseline": f"the unpatched pipeline's eager denoising loop, same prompt, seed and steps (median of "
        f"{args.repeats}, in turns with the compiled side)",
        "rows": rows,
    }


def _plot(result: dict, path) -> None:
    labels = [f"{r['model']} {r['size']} {r['method']}" for r in result["rows"]]
    bars = [
        ("eager", [r["eager_speedup"] for r in result["rows"]]),
        (f"compiled ({result['backend']})", [r["compiled_speedup"] for r in result["rows"]]),
    ]
    title = (
        f"denoising loop on {result['device']}, {result['dtype']}, {result['steps']} steps, {result['backend']}\n"
        f"baseline: {result['baseline']}"
    )
    plot_speedups(path, labels, bars, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=None, help="subset of each model's methods")
    parser.add_argument("--quick", action="store_true", help="256 px, eager backend, 2 steps, one run (CI smoke)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; quick: eager)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="default 4 (quick: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--num-blocks", type=int, default=2, help="transformer blocks of the *-arch DiTs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.backend = args.backend or ("eager" if args.quick else "inductor")
    args.steps = args.steps or (2 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    result = run(args)
    result.update(threads=torch.get_num_threads(), versions=environment(), argv=sys.argv[1:] if argv is None else argv)
    out = args.out or f"benchmarks/results/compile-{'quick' if args.quick else args.device}"
    save_results(result, out, _plot, "speedup.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
