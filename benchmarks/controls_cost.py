"""What A-STAR's guided passes cost, and what stopping them at the last recorded layer saves.

Each guided step runs one extra forward of the prompt rows with gradients, then its backward to the latent. The
loss reads the cross-attention maps of one UNet level (16 x 16 of SD's 64 x 64 latent: the deepest down block, the
middle and the first up block), so the call's first pass runs whole and leaves a plan, and later passes stop after
the plan's last recorded layer (``stop_passes_early``, on by default; off here as the baseline). Per model:

- time: the denoising loop (``output_type="latent"``), median of ``--repeats`` after a warm-up: unpatched, then
  A-STAR (its defaults: every step guided) with whole passes and stopping early in turns, under one patch (a plan
  serves every later call at its latent shape, as it would a user's);
- memory: the peak bytes of tensors allocated during a one-step call after those (``PeakMemory``: the guided pass's
  graph);
- drift: the largest difference between the two A-STAR sides' latents (the skipped layers never feed the loss, but
  a stopped pass runs the unread levels' cross-attention through SDPA instead of explicit probabilities).

    python benchmarks/controls_cost.py                       # sd15-arch at 512², bf16 (real widths)
    python benchmarks/controls_cost.py --models sd15-arch sdxl-arch --size 512
    python benchmarks/controls_cost.py --quick               # sd15-tiny at 256², 2 steps: the CI smoke
    python benchmarks/controls_cost.py --edit                # DPL's learning passes in accel.edit, the same way

With ``--edit`` the same comparison is made for ``accel.edit(method="dpl")``: its learning passes (per step, up to
``dpl_steps`` forwards with gradients to the learned noun tokens) read the maps of one level too, and stop after its
last layer once the inversion's recording has shown which that is (``EditController.stop_passes_early``). Times are
of the whole edit and of its learning stage (DPL's passes with null-text inversion), median of ``--repeats`` after a
warm-up, the two sides in turns, on a random image; the drift is between the two sides' edited images.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PeakMemory,
    device_name,
    environment,
    interleaved_median_seconds,
    median_seconds,
    plot_speedups,
    save_results,
)

import accel  # noqa: E402
from accel.pipelines import tiny  # noqa: E402
from accel.pipelines.controls import GUIDANCE_HOOK_NAME  # noqa: E402

PROMPT = "a red circle and a blue square"
SIDES = ("unpatched", "astar, whole passes", "astar, stopping early")
EDIT_SIDES = ("dpl, whole passes", "dpl, stopping early")
EDIT_TARGET = "a green circle and a blue square"


def measure(name: str, size: int, steps: int, repeats: int) -> dict:
    pipe = tiny.build_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    dtype = pipe.unet.dtype

    def call(num_steps: int = steps):
        return pipe(
            PROMPT, num_inference_steps=num_steps, height=size, width=size, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip

    with torch.no_grad():
        unpatched = median_seconds(call, repeats)
    # One patch for both A-STAR sides, as a user keeps one: its plan carries over between calls at one latent shape.
    with accel.patched(pipe, "astar"):
        state = pipe.unet._diffusers_hook.get_hook(GUIDANCE_HOOK_NAME).state

        def side(early: bool, run):
            state.stop_passes_early = early
            return run()

        sides = {SIDES[1]: False, SIDES[2]: True}
        seconds = interleaved_median_seconds({k: lambda e=e: side(e, call) for k, e in sides.items()}, repeats)
        seconds[SIDES[0]] = unpatched
        latents = {k: side(e, call).float() for k, e in sides.items()}
        peaks = {}
        for key, early in sides.items():
            with PeakMemory() as memory:
                side(early, lambda: call(1))
            peaks[key] = memory.peak
    with PeakMemory() as memory:
        call(1)
    peaks[SIDES[0]] = memory.peak
    return {
        "model": name,
        "size": size,
        "steps": steps,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": seconds,
        "time_over_unpatched": {side: seconds[side] / seconds["unpatched"] for side in SIDES},
        "early_over_whole_time": seconds[SIDES[2]] / seconds[SIDES[1]],
        "early_over_whole_guidance_time": (seconds[SIDES[2]] - unpatched) / (seconds[SIDES[1]] - unpatched),
        "peak_bytes_one_step": peaks,
        "early_over_whole_memory": peaks[SIDES[2]] / peaks[SIDES[1]],
        "latent_max_abs_difference": float((latents[SIDES[1]] - latents[SIDES[2]]).abs().max()),
    }


def measure_edit(name: str, size: int, steps: int, repeats: int) -> dict:
    import numpy as np

    from accel.processors.editing import EditController

    pipe = tiny.build_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    options = {"num_inference_steps": steps, "null_text_steps": 1, "dpl_steps": 3}
    results = {}

    def edit(early: bool, key: str):
        EditController.stop_passes_early = early
        try:
            results[key] = accel.edit(pipe, image, PROMPT, EDIT_TARGET, method="dpl", **options)
        finally:
            EditController.stop_passes_early = True

    sides = dict(zip(EDIT_SIDES, (False, True), strict=True))
    learning = {key: [] for key in sides}

    def timed(key):
        edit(sides[key], key)
        learning[key].append(results[key].seconds["learning"])

    seconds = interleaved_median_seconds({key: lambda k=key: timed(k) for key in sides}, repeats)
    # The warm-up round's learning times are dropped, as interleaved_median_seconds drops its call times.
    learning_seconds = {key: float(np.median(values[1:])) for key, values in learning.items()}
    images = {key: np.asarray(results[key].image, dtype=np.float64) for key in sides}
    return {
        "model": name,
        "size": size,
        "steps": steps,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "edit_options": options,
        "seconds": seconds,
        "learning_seconds": learning_seconds,
        "early_over_whole_time": seconds[EDIT_SIDES[1]] / seconds[EDIT_SIDES[0]],
        "early_over_whole_learning_time": learning_seconds[EDIT_SIDES[1]] / learning_seconds[EDIT_SIDES[0]],
        "image_max_abs_difference": float(np.abs(images[EDIT_SIDES[0]] - images[EDIT_SIDES[1]]).max()),
    }


def _plot_ratios(result: dict, path: Path, ratios: list[tuple[str, str]], what: str) -> None:
    rows = result["rows"]
    labels = [f"{row['model']} {row['size']}² {row['dtype']}" for row in rows]
    bars = [(label, [1 / row[key] for row in rows]) for label, key in ratios]
    title = f"{what}, as a ratio to whole passes; {result['device']}, {rows[0]['steps']} steps"
    plot_speedups(path, labels, bars, title)


def plot_edit(result: dict, path: Path) -> None:
    ratios = [
        ("edit: whole / stopping early", "early_over_whole_time"),
        ("learning stage: whole / stopping early", "early_over_whole_learning_time"),
    ]
    _plot_ratios(result, path, ratios, "DPL's learning passes stopped at the last layer whose maps are read")


def plot(result: dict, path: Path) -> None:
    ratios = [
        ("time: whole / stopping early", "early_over_whole_time"),
        ("memory: whole / stopping early", "early_over_whole_memory"),
    ]
    _plot_ratios(result, path, ratios, "A-STAR's guided passes (every step guided) stopped at the last recorded layer")


def _print_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> None:
    """Model, size and dtype, then ``(header, cell of a row)`` columns, right-aligned."""
    columns = [("model", lambda row: row["model"]), ("size", lambda row: str(row["size"])),
               ("dtype", lambda row: row["dtype"]), *columns]  # fmt: skip
    cells = [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(header), *(len(line[i]) for line in cells)) for i, (header, _) in enumerate(columns)]
    for line in [[header for header, _ in columns], *cells]:
        print("  ".join(text.rjust(width) for text, width in zip(line, widths, strict=True)))


def _save(args, rows: list[dict], name: str, plot_results, **fields) -> int:
    result = {
        "device": device_name(),
        **fields,
        "rows": rows,
        "threads": args.threads,
        "repeats": args.repeats,
        "versions": environment(),
        "argv": sys.argv[1:],
    }
    out = args.out or f"benchmarks/results/{name}" + ("-quick" if args.quick else "")
    save_results(result, out, plot_results, f"{name}.png")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15-arch"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--edit", action="store_true", help="DPL's learning passes in accel.edit instead of A-STAR's")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.steps, args.repeats = ["sd15-tiny"], 256, 2, 1
    torch.set_num_threads(args.threads)
    if args.edit:
        return edit_main(args)
    rows = [measure(name, args.size, args.steps, args.repeats) for name in args.models]
    mb = 2**20
    _print_table(
        rows,
        [
            ("unpatched", lambda row: f"{row['seconds'][SIDES[0]]:.2f}s"),
            ("whole", lambda row: f"{row['seconds'][SIDES[1]]:.2f}s"),
            ("early", lambda row: f"{row['seconds'][SIDES[2]]:.2f}s"),
            ("time", lambda row: f"{row['early_over_whole_time']:.2f}"),
            ("peak whole", lambda row: f"{row['peak_bytes_one_step'][SIDES[1]] / mb:.0f}MB"),
            ("peak early", lambda row: f"{row['peak_bytes_one_step'][SIDES[2]] / mb:.0f}MB"),
            ("memory", lambda row: f"{row['early_over_whole_memory']:.2f}"),
            ("drift", lambda row: f"{row['latent_max_abs_difference']:.2e}"),
        ],
    )
    baseline = "A-STAR with whole guided passes (stop_passes_early=False); times also over the unpatched call"
    return _save(args, rows, "controls-cost", plot, baseline=baseline, prompt=PROMPT)


def edit_main(args) -> int:
    rows = [measure_edit(name, args.size, args.steps, args.repeats) for name in args.models]
    _print_table(
        rows,
        [
            ("whole", lambda row: f"{row['seconds'][EDIT_SIDES[0]]:.2f}s"),
            ("early", lambda row: f"{row['seconds'][EDIT_SIDES[1]]:.2f}s"),
            ("time", lambda row: f"{row['early_over_whole_time']:.2f}"),
            ("learning whole", lambda row: f"{row['learning_seconds'][EDIT_SIDES[0]]:.2f}s"),
            ("learning early", lambda row: f"{row['learning_seconds'][EDIT_SIDES[1]]:.2f}s"),
            ("learning", lambda row: f"{row['early_over_whole_learning_time']:.2f}"),
            ("drift", lambda row: f"{row['image_max_abs_difference']:.2e}"),
        ],
    )
    baseline = "accel.edit(method='dpl') with whole learning passes (EditController.stop_passes_early=False)"
    return _save(args, rows, "controls-cost-dpl", plot_edit, baseline=baseline, prompts=[PROMPT, EDIT_TARGET])


if __name__ == "__main__":
    raise SystemExit(main())
