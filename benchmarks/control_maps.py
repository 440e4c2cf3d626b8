"""Which cross-attention level of the shipped ``shapes-sd`` marks which object: the evidence behind A-STAR's and
Attend-and-Excite's ``map_side`` on this model.

The controls move the latent so that each subject's cross-attention map takes a region of its own; that only helps
where a subject's map lies on its own object. For the two-object prompts, on the unpatched trajectories (``astar``
with step size 0 installs the recording processors and moves nothing), every UNet call's head-averaged
cross-attention probabilities are kept per level; where the detector finds both requested objects, the benchmark
reads the maps at the two objects' centroids and counts, per level, step and kind of subject tokens (colour word,
head noun, both):

- ``own token wins``: at an object's centroid, its own tokens outweigh the other object's tokens;
- ``own object wins``: a subject's tokens weigh more at its own object's centroid than at the other object's.

Chance is 0.5 for both.

    python benchmarks/control_maps.py [--images-per-prompt 16] [--seed 100]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, environment, save_figure, save_results  # noqa: E402
from quality import PROMPTS  # noqa: E402

import accel  # noqa: E402
from accel.pipelines import shapes, shapes_detector  # noqa: E402
from accel.pipelines.prompts import word_positions  # noqa: E402
from accel.processors.controls import StoreAttnProcessor  # noqa: E402

KINDS = ("colour", "noun", "phrase")


@contextlib.contextmanager
def recorded_maps(pipe, rows: int, per_call: list):
    """While open, every UNet call appends ``{grid: [rows, h, w, T]}``: its last ``rows`` rows' maps (the prompt's,
    under classifier-free guidance), every level."""
    with accel.patched(pipe, "astar", step_size=0):
        (store,) = {
            id(p.store): p.store for p in pipe.unet.attn_processors.values() if isinstance(p, StoreAttnProcessor)
        }.values()

        def keep(module, args, output):
            grids = sorted({grid for grid, _ in store.maps.values()})
            per_call.append({grid: store.aggregate(grid)[-rows:].detach().clone() for grid in grids})
            store.maps.clear()

        handle = pipe.unet.register_forward_hook(keep)
        try:
            with store.record():
                yield
        finally:
            handle.remove()


def subject_tokens(tokenizer, prompt: str) -> tuple[dict, dict]:
    """Per kind, the two objects' token positions in "a C1 S1 and a C2 S2"."""
    _, c1, s1, _, _, c2, s2 = prompt.split()
    colour1, noun1, colour2, noun2 = word_positions(tokenizer, prompt, [c1, s1, c2, s2])
    first = {"colour": colour1, "noun": noun1, "phrase": colour1 + noun1}
    second = {"colour": colour2, "noun": noun2, "phrase": colour2 + noun2}
    return first, second


def evaluate(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe = accel.load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    seeds = [args.seed + k for k in range(args.images_per_prompt)]
    rng = np.random.default_rng(0)
    counts: dict = {}
    images = both_found = 0
    largest_change = 0.0
    started = time.perf_counter()
    for prompt in PROMPTS["pair"]:
        scene = shapes.scene_from_caption(prompt, rng)
        first, second = subject_tokens(pipe.tokenizer, prompt)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")
        per_call: list = []
        with torch.inference_mode():
            with recorded_maps(pipe, len(seeds), per_call):
                recorded = pipe([prompt] * len(seeds), generator=generators, **call).images
            plain = pipe([prompt] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds], **call)
        largest_change = max(largest_change, float(np.abs(recorded - plain.images).max()))
        for k, image in enumerate(recorded):
            images += 1
            objects = {}
            for detection in shapes_detector.detect(image):
                for index, wanted in enumerate(scene.objects):
                    if (detection.colour, detection.shape) == (wanted.colour, wanted.shape):
                        objects.setdefault(index, detection)
            if len(objects) < 2:
                continue
            both_found += 1
            for step in args.read_steps:
                for grid, maps in per_call[step].items():
                    m = maps[k]
                    h, w = grid

                    def weight(obj, tokens, m=m, h=h, w=w):
                        return float(m[min(int(obj.y * h), h - 1), min(int(obj.x * w), w - 1), list(tokens)].sum())

                    for kind in KINDS:
                        a, b = first[kind], second[kind]
                        o1, o2 = objects[0], objects[1]
                        own_token = (weight(o1, a) > weight(o1, b)) + (weight(o2, b) > weight(o2, a))
                        own_object = (weight(o1, a) > weight(o2, a)) + (weight(o2, b) > weight(o1, b))
                        entry = (
                            counts.setdefault(f"{grid[0]}x{grid[1]}", {})
                            .setdefault(kind, {})
                            .setdefault(str(step), [0, 0, 0])
                        )
                        entry[0] += own_token
                        entry[1] += own_object
                        entry[2] += 2
    levels = {
        level: {
            kind: {
                step: {"own_token_wins": c[0] / c[2], "own_object_wins": c[1] / c[2], "objects": c[2]}
                for step, c in by_step.items()
            }
            for kind, by_step in by_kind.items()
        }
        for level, by_kind in counts.items()
    }
    return {
        "what": "where the shipped model's cross-attention maps put each requested object, per level, step and token "
        "kind, read at the detected objects' centroids (two-object prompts, unpatched trajectories)",
        "model": "shapes-sd",
        "device": device_name("cpu"),
        "dtype": str(pipe.unet.dtype),
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "seeds": seeds,
        "images": images,
        "images_with_both_objects": both_found,
        "largest_pixel_change_from_recording": largest_change,
        "baseline": "chance: 0.5",
        "versions": environment(),
        "seconds": time.perf_counter() - started,
        "levels": levels,
    }


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(result["levels"], key=lambda level: -int(level.split("x")[0]))
    fig, axes = plt.subplots(1, len(KINDS), figsize=(12, 3.6), sharey=True)
    for ax, kind in zip(axes, KINDS, strict=True):
        for level in levels:
            by_step = result["levels"][level][kind]
            steps = sorted(by_step, key=int)
            ax.plot([int(s) for s in steps], [by_step[s]["own_token_wins"] for s in steps], marker="o", label=level)
        ax.axhline(0.5, color="black", linewidth=0.5)
        ax.set_title(f"{kind} tokens", fontsize=9)
        ax.set_xlabel("denoising step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("own token wins at the object (chance 0.5)")
    axes[-1].legend(title="level", fontsize=8)
    fig.suptitle(
        f"shapes-sd cross-attention by level: {result['images_with_both_objects']} of {result['images']} images with "
        f"both objects, 64 px, {result['steps']} DDIM steps, {result['dtype']}, {result['device']}",
        fontsize=8,
    )
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--read-steps", type=int, nargs="+", default=[2, 6, 12, 20])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="benchmarks/results/control-maps")
    args = parser.parse_args(argv)
    result = evaluate(args)
    save_results(result, args.out, _plot, "control-maps.png")
    print(f"{result['images_with_both_objects']} of {result['images']} images with both objects; {result['device']}")
    print(
        "level  kind    "
        + "  ".join(f"step {s:>2}" for s in args.read_steps)
        + "   (own token wins / own object wins)"
    )
    for level in sorted(result["levels"], key=lambda level: -int(level.split("x")[0])):
        for kind in KINDS:
            by_step = result["levels"][level][kind]
            cells = [
                f"{by_step[str(s)]['own_token_wins']:.2f}/{by_step[str(s)]['own_object_wins']:.2f}"
                for s in args.read_steps
            ]
            print(f"{level:<6} {kind:<7} " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
