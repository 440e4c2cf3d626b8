"""accel's HiDiffusion side by side with the reference package (``hidiffusion`` 0.1.10 from PyPI).

    python benchmarks/hidiffusion_peer.py --models sd15-tiny sdxl-tiny --sizes 1024 --steps 4
    python benchmarks/hidiffusion_peer.py --compile inductor --repeats 3   # also with the UNet compiled

The package does not import on diffusers 0.42 (``diffusers.pipelines.controlnet.multicontrolnet`` moved to
``diffusers.models.controlnets.multicontrolnet``); this script provides the old module name before importing it.
It is a peer for benchmarks only, never a dependency of accel.

For each model and size, same prompt, seed and steps: the unpatched pipeline, ``hidiffusion.apply_hidiffusion``
and ``accel.patch(pipe, "hidiffusion")`` are timed (median of ``--repeats``). The package draws each window shift
from the global RNG; the script records those draws and replays them in accel (same shift per layer and step), so
the drift between the two measures the difference of the algorithms, not of the random shifts.

Equal work: the package picks its RAU-Net switches from absolute latent sizes (tuned for SD 1.5's 512 px and SDXL's
1024 px), accel from ``unet.config.sample_size``, which is 128 px for the tiny UNets, so at 1024 px accel would run
its 8x-resolution schedule and the package its 2x one. Unless ``--accel-option`` is given, the script therefore
gives accel, for each model and size, the steps the package's own table selects: the package runs RAU-Net stage k
while the step index is below ``int(steps * ratio_k)``, and accel while ``step / steps`` is below its switch, so
``int(steps * ratio_k) / steps`` selects the same steps. SDXL's "aggressive" mode starts at ``int(8 / 50 * steps)``,
which is step 0 only up to 6 steps; more steps are refused for SDXL rather than compared on unequal work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, interleaved_median_seconds, save_figure, save_results
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
    """A ``_draw_quarter`` for accel's processor giving the package's shift for each (step, layer) (its quarter rule).

    The package shifts by ``window // 4 * quarter`` tokens, accel by ``window * quarter // 4``: the same wherever the
    window side is a multiple of 4, as at every size this script runs (the PSNR column checks it).
    """
    per_call = draws[-layers * steps :]

    def draw_quarter(processor):
        value = per_call[processor.context.step.step_index * layers + processor.layer_index]
        return 0 if value <= 0.25 else 1 if value <= 0.5 else 2 if value <= 0.75 else 3

    return draw_quarter


def package_switches(unet, size: int, steps: int) -> dict[str, float]:
    """accel's switches that select the steps ``hidiffusion`` 0.1.10 selects for this UNet at ``size`` px.

    The package's table (its ``switching_threshold_ratio_dict``): SD 1.x / 2.x 0.4 / 0 below a 256 latent, else
    0.7 / 0.3; SDXL 0.4 / 0 below a 512 latent, else 0.7 / 0.3.
    """
    latent = size // 8
    if _is_sdxl(unet):
        if latent < 512 and int(8 / 50 * steps) != 0:
            raise SystemExit(f"sdxl at {steps} steps: the package's aggressive RAU-Net starts after step 0; use <= 6")
        ratios = (0.4, 0.0) if latent < 512 else (0.7, 0.3)
    else:
        ratios = (0.4, 0.0) if latent < 256 else (0.7, 0.3)
    stage1, stage2 = (int(steps * ratio) / steps for ratio in ratios)
    return {"raunet_switch": stage1, "raunet_deep_switch": stage2}


def _load(model: str):
    pipe = accel.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    # The package reads `name_or_path` as a string (a pipeline built from components has None there).
    pipe.register_to_config(_name_or_path=f"accel/{model}")
    return pipe


def _generator(pipe, size: int, steps: int):
    def generate():
        return pipe(
            prompt="a red circle and a blue square",
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    return generate


def compiled_row(args, model: str, size: int, options: dict, hidiffusion, pipes: dict) -> dict:
    """Both peers eager and with the UNet compiled after patching, as a user would run them.

    Each peer has its own pipeline in ``pipes`` (same seeded weights), patched once for the whole row: the package
    makes new block classes on every ``apply_hidiffusion``, so applying it again per call would make Dynamo recompile
    at every call.
    Graphs and breaks are counted over each peer's first compiled call (which is timed apart: it compiles). The
    package's random shifts cannot be replayed through a compiled graph, so the drift reported is compiled accel
    against eager accel (its shifts are a function of the seed); the eager rows already show the two algorithms equal.
    """
    from torch._dynamo.utils import counters

    unpatched_s, unpatched = _median(_generator(pipes["accel"], size, args.steps), args.repeats)
    hidiffusion.apply_hidiffusion(pipes["package"])
    accel.patch(pipes["accel"], "hidiffusion", **options)
    row = {
        "model": model,
        "dtype": str(pipes["accel"].unet.dtype).removeprefix("torch."),
        "size": size,
        "steps": args.steps,
        "accel_options": options,
        "compile_backend": args.compile,
        "unpatched_s": unpatched_s,
    }
    calls, outputs = {}, {}
    try:
        for name, pipe in pipes.items():
            eager_unet = pipe.unet
            compiled_unet = torch.compile(eager_unet, backend=args.compile)
            generate = _generator(pipe, size, args.steps)

            def eager(generate=generate, name=name):
                outputs[f"{name} eager"] = generate()

            def compiled(pipe=pipe, generate=generate, name=name, eager_unet=eager_unet, compiled_unet=compiled_unet):
                pipe.unet = compiled_unet
                try:
                    outputs[f"{name} compiled"] = generate()
                finally:
                    pipe.unet = eager_unet

            eager()  # the eager side's warm-up, as the compiled side's is its first call below
            graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
            tick = time.perf_counter()
            compiled()
            row[f"{name}_first_compiled_call_s"] = time.perf_counter() - tick
            row[f"{name}_graphs"] = counters["stats"]["unique_graphs"] - graphs
            row[f"{name}_graph_breaks"] = sum(counters["graph_break"].values()) - breaks
            calls[f"{name} eager"], calls[f"{name} compiled"] = eager, compiled
        seconds = interleaved_median_seconds(calls, args.repeats, warm_up=False)
    finally:
        hidiffusion.remove_hidiffusion(pipes["package"])
        accel.unpatch(pipes["accel"])
    for name, value in seconds.items():
        key = name.replace(" ", "_")
        row[f"{key}_s"] = value
        row[f"speedup_{key}"] = unpatched_s / value
    best_package = min(seconds["package eager"], seconds["package compiled"])
    row["accel_compiled_over_package_compiled"] = seconds["accel compiled"] / seconds["package compiled"]
    row["accel_compiled_over_package_best"] = seconds["accel compiled"] / best_package
    row["accel_eager_over_package_eager"] = seconds["accel eager"] / seconds["package eager"]
    row["psnr_db_accel_compiled_vs_eager"] = metrics.psnr(outputs["accel eager"], outputs["accel compiled"])
    row["psnr_db_accel_compiled_vs_unpatched"] = metrics.psnr(unpatched, outputs["accel compiled"])
    row["psnr_db_package_compiled_vs_unpatched"] = metrics.psnr(unpatched, outputs["package compiled"])
    print(
        f"{model:10s} {size:5d}px: unpatched {unpatched_s:7.2f} s  package eager {seconds['package eager']:7.2f} s, "
        f"compiled {seconds['package compiled']:7.2f} s ({row['package_graphs']} graphs, "
        f"{row['package_graph_breaks']} breaks)  accel eager {seconds['accel eager']:7.2f} s, compiled "
        f"{seconds['accel compiled']:7.2f} s ({row['accel_graphs']} graphs, {row['accel_graph_breaks']} breaks)  "
        f"accel/package compiled {row['accel_compiled_over_package_compiled']:.2f}",
        flush=True,
    )
    return row


def _is_sdxl(unet) -> bool:
    return unet.config.addition_embed_type == "text_time"


def _median(fn, repeats: int):
    # One untimed warm-up call first: the freshly loaded pipeline's one-time costs would otherwise be charged to the
    # unpatched side and inflate both speed-ups.
    result = fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times), result


def _self_seconds_by_op(fn) -> dict[str, float]:
    """Self CPU seconds per aten op over one call of ``fn``, under torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}


def profile_rows(theirs_call, ours_call, top: int = 8) -> list[dict]:
    """Where each peer's time goes: one profiled call each, the ops with the most self time in either."""
    theirs, ours = _self_seconds_by_op(theirs_call), _self_seconds_by_op(ours_call)
    ranked = sorted(set(theirs) | set(ours), key=lambda op: -max(theirs.get(op, 0.0), ours.get(op, 0.0)))
    rows = [{"op": op, "package_s": theirs.get(op, 0.0), "accel_s": ours.get(op, 0.0)} for op in ranked[:top]]
    rows.append({"op": "total", "package_s": sum(theirs.values()), "accel_s": sum(ours.values())})
    return rows


def run(args) -> dict:
    from accel.cli import parse_options

    try:
        hidiffusion = import_hidiffusion()
    except ImportError as error:
        # The package is a benchmark peer, not a dependency of accel, so it is often absent.
        raise SystemExit(
            f"hidiffusion_peer.py compares accel with the hidiffusion package, which could not be imported "
            f"({error}); install it: pip install hidiffusion==0.1.10"
        ) from None
    accel_options = parse_options(args.accel_option)
    rows = []
    for model in args.models:
        pipe = _load(model)
        # Compiled, each peer keeps its own pipeline patched for a whole row (see compiled_row).
        theirs_pipe = _load(model) if args.compile else None
        for size in args.sizes:
            generate = _generator(pipe, size, args.steps)
            options = accel_options or package_switches(pipe.unet, size, args.steps)
            if args.compile:
                pipes = {"package": theirs_pipe, "accel": pipe}
                rows.append(compiled_row(args, model, size, options, hidiffusion, pipes))
                continue
            results = {}

            def theirs_call(pipe=pipe, generate=generate, results=results):
                hidiffusion.apply_hidiffusion(pipe)
                try:
                    results["package"] = generate()
                finally:
                    hidiffusion.remove_hidiffusion(pipe)

            def ours_call(pipe=pipe, generate=generate, options=options, results=results):
                with accel.patched(pipe, "hidiffusion", **options):
                    results["accel"] = generate()

            if args.profile:
                profile = profile_rows(theirs_call, ours_call)
                rows.append({"model": model, "size": size, "steps": args.steps, "profile": profile})
                print(f"{model} {size}px, self seconds of one call: {'op':42s} {'package':>8s} {'accel':>8s}")
                for entry in profile:
                    print(f"  {entry['op'][:60]:60s} {entry['package_s']:8.2f} {entry['accel_s']:8.2f}", flush=True)
                continue
            unpatched_s, unpatched = _median(generate, args.repeats)
            # A warm-up round first, so neither peer's first call is charged one-time costs.
            with ShiftRecorder() as recorder:
                seconds = interleaved_median_seconds({"package": theirs_call, "accel": ours_call}, args.repeats)
            theirs_s, ours_s = seconds["package"], seconds["accel"]
            theirs, ours = results["package"], results["accel"]
            with accel.patched(pipe, "hidiffusion", **options):
                layers = sum(isinstance(p, MSWMSAAttnProcessor) for p in pipe.unet.attn_processors.values())
            original_draw = MSWMSAAttnProcessor._draw_quarter
            MSWMSAAttnProcessor._draw_quarter = replay_shifts(recorder.draws, layers, args.steps)
            try:
                ours_call()
                ours_replayed = results["accel"]
            finally:
                MSWMSAAttnProcessor._draw_quarter = original_draw
            row = {
                "model": model,
                "dtype": str(pipe.unet.dtype).removeprefix("torch."),
                "size": size,
                "steps": args.steps,
                "accel_options": options,
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
        "dtype": "per row",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "timed": "one pipeline call each (text encoding, denoising, VAE decode); package and accel alternate"
        + (
            f"; compiled: torch.compile(unet, backend={args.compile!r}) after patching, first call timed apart, "
            "then package eager, package compiled, accel eager, accel compiled in turns"
            if args.compile
            else ""
        ),
        "accel_options": accel_options or "the package's switches per model and size (package_switches)",
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
    if "compile_backend" in rows[0]:
        bars = [
            ("hidiffusion 0.1.10", "speedup_package_eager"),
            (f"hidiffusion 0.1.10, compiled ({rows[0]['compile_backend']})", "speedup_package_compiled"),
            ("accel hidiffusion", "speedup_accel_eager"),
            (f"accel hidiffusion, compiled ({rows[0]['compile_backend']})", "speedup_accel_compiled"),
        ]
    else:
        bars = [("hidiffusion 0.1.10", "speedup_package"), ("accel hidiffusion", "speedup_accel")]
    width = 0.8 / len(bars)
    for index, (label, key) in enumerate(bars):
        offset = (index - (len(bars) - 1) / 2) * width
        ax.bar(x + offset, [r[key] for r in rows], width, label=label)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("x faster than unpatched")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    dtypes = "/".join(sorted({r["dtype"] for r in rows}))
    ax.set_title(
        f"HiDiffusion on {result['device']}, {dtypes}, {rows[0]['steps']} steps, equal switches\n"
        "baseline: the unpatched pipeline, eager",
        fontsize=9,
    )
    save_figure(fig, path)


def _plot_profile(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(7 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        ops = [entry for entry in row["profile"] if entry["op"] != "total"]
        y = np.arange(len(ops))
        ax.barh(y - 0.2, [e["package_s"] for e in ops], 0.4, label="hidiffusion 0.1.10")
        ax.barh(y + 0.2, [e["accel_s"] for e in ops], 0.4, label="accel hidiffusion")
        ax.set_yticks(y, [e["op"].removeprefix("aten::")[:32] for e in ops], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("self seconds in one call")
        ax.set_title(f"{row['model']}, {row['size']} px, {row['steps']} steps, equal switches", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"Where the time goes, {result['device']}; baseline: the package's own ops", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15-tiny", "sdxl-tiny"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--accel-option",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="accel options for every row (default: the package's switches for each model and size)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--profile", action="store_true", help="instead of timing: profile one call of each peer, ops by self time"
    )
    parser.add_argument(
        "--compile",
        metavar="BACKEND",
        help="also time both peers with the UNet compiled after patching (torch.compile backend, e.g. inductor)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="benchmarks/results/hidiffusion-peer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    save_results(
        result, args.out, _plot_profile if args.profile else _plot, "profile.png" if args.profile else "speedup.png"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
