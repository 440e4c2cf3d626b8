"""Editing benchmark: Dynamic Prompt Learning vs plain Prompt-to-Prompt on real (generator) images.

Each case is an image from the shapes generator with two objects ("a purple circle and a red square"); the edit
recolours the first object ("a green circle and a red square"). Both methods get the same null-text inversion
settings, steps, guidance and blend settings, so the difference is DPL's learned noun tokens alone. The generator's
scene gives the edited object's true region, so leakage is measured, not judged:

- ``outside``: mean absolute change (0-255) between the edited image and the reconstruction (the source branch of
  the same run) over the pixels outside the edited object (its region dilated by 2 px);
- ``inside``: the same over the object's own pixels (an edit that changes nothing would win ``outside``);
- ``recoloured``: share of cases whose object region's mean colour is nearer the new colour than the old one;
- ``kept``: share of cases where the detector still finds the other object, with its colour and shape.

    python benchmarks/editing.py [--cases 16] [--steps 25] [--guidance 6] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, environment, save_figure, save_results  # noqa: E402

import accel  # noqa: E402
from accel.pipelines import shapes, shapes_detector  # noqa: E402

METHODS = ("p2p", "dpl")


def cases(count: int, seed: int) -> list[dict]:
    """Two-object generator images and their recolouring edits."""
    rng = np.random.default_rng(seed)
    found = []
    while len(found) < count:
        scene = shapes.sample_scene(rng, "pair")
        image = shapes.render(scene, shapes.BASE_RESOLUTION, rng)
        first, second = scene.objects
        choices = [c for c in shapes.COLOURS if c not in (first.colour, second.colour)]
        new = choices[int(rng.integers(len(choices)))]
        target = scene.caption.replace(f"a {first.colour} {first.shape}", f"a {new} {first.shape}", 1)
        found.append({"scene": scene, "image": image, "target": target, "new_colour": new})
    return found


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(pixels):
        padded = np.pad(grown, 1)
        grown = grown | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return grown


def score(case: dict, result) -> dict:
    scene = case["scene"]
    edited = np.asarray(result.image).astype(np.float64)
    reconstruction = np.asarray(result.reconstruction).astype(np.float64)
    region = shapes.object_mask(scene.objects[0], edited.shape[0])
    outside = ~_dilate(region, 2)
    change = np.abs(edited - reconstruction).mean(axis=-1)
    mean_colour = edited[region].mean(axis=0)
    old, new = (np.asarray(shapes.COLOURS[c], np.float64) for c in (scene.objects[0].colour, case["new_colour"]))
    other = scene.objects[1]
    kept = any(d.colour == other.colour and d.shape == other.shape for d in shapes_detector.detect(result.image))
    return {
        "outside": float(change[outside].mean()),
        "inside": float(change[region].mean()),
        "outside_vs_input": float(np.abs(edited - case["image"]).mean(axis=-1)[outside].mean()),
        "recoloured": bool(np.linalg.norm(mean_colour - new) < np.linalg.norm(mean_colour - old)),
        "kept": bool(kept),
        "blend_area": None if result.blend_mask is None else float(result.blend_mask.mean()),
        "seconds": float(sum(result.seconds.values())),
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe = accel.load_pipeline(args.model)
    settings = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    for item in args.option:
        key, value = item.split("=", 1)
        settings[key] = eval(value, {}, {})  # noqa: S307 (benchmark flags: numbers and tuples)
    rows = {method: [] for method in args.methods}
    grid = []
    for index, case in enumerate(cases(args.cases, args.seed)):
        pictures = [case["image"]]
        for method in args.methods:
            started = time.perf_counter()
            options = {k: v for k, v in settings.items() if method == "dpl" or not k.startswith(("dpl_", "dynamic_"))}
            result = accel.edit(pipe, case["image"], case["scene"].caption, case["target"], method=method, **options)
            row = score(case, result) | {"case": index, "source": case["scene"].caption, "target": case["target"]}
            rows[method].append(row)
            if method == args.methods[0]:
                pictures.append(np.asarray(result.reconstruction))
            pictures.append(np.asarray(result.image))
            print(
                f"{index:3d} {method:4s} outside {row['outside']:6.2f} inside {row['inside']:6.2f} "
                f"recoloured {row['recoloured']!s:5s} kept {row['kept']!s:5s} {time.perf_counter() - started:5.1f} s",
                flush=True,
            )
        grid.append(np.concatenate(pictures, axis=1))
    summary = {
        method: {
            key: float(np.mean([r[key] for r in method_rows]))
            for key in ("outside", "inside", "outside_vs_input", "recoloured", "kept", "seconds")
        }
        for method, method_rows in rows.items()
    }
    return {
        "benchmark": "editing",
        "device": device_name(),
        "dtype": "float32",
        "model": args.model,
        "shapes": f"{shapes.BASE_RESOLUTION}x{shapes.BASE_RESOLUTION} px, {args.cases} two-object generator images",
        "baseline": "p2p (null-text inversion + Prompt-to-Prompt, same settings)",
        "settings": settings | {"seed": args.seed},
        "versions": environment(),
        "threads": args.threads,
        "summary": summary,
        "rows": rows,
        "_grid": np.concatenate(grid, axis=0),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, keys, title in (
        (axes[0], ("outside", "inside"), "mean |edit - reconstruction| (0-255)"),
        (axes[1], ("recoloured", "kept"), "share of cases"),
    ):
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            values = [result["summary"][method][k] for k in keys]
            ax.bar(np.arange(len(keys)) + i * width, values, width, label=method)
        ax.set_xticks(np.arange(len(keys)) + width * (len(methods) - 1) / 2, keys)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Editing on {result['model']} ({result['shapes']}); {result['device']}, {result['dtype']}; "
        f"{result['settings']['num_inference_steps']} steps, guidance {result['settings']['guidance_scale']}",
        fontsize=8,
    )
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="an EditConfig field")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="benchmarks/results/editing")
    parser.add_argument("--quick", action="store_true", help="2 cases, 4 steps, 2 iterations: checks the plumbing")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.steps = 2, 4
        args.option += ["null_text_steps=2", "dpl_steps=2"]
    result = run(args)
    picture = result.pop("_grid")
    out = save_results(result, args.out, plot, "editing.png")
    from PIL import Image

    Image.fromarray(picture).save(out / "grid.png")
    print(f"\n{'method':6s} {'outside':>8s} {'inside':>8s} {'recoloured':>10s} {'kept':>6s} {'s/edit':>7s}")
    for method, values in result["summary"].items():
        print(
            f"{method:6s} {values['outside']:8.2f} {values['inside']:8.2f} {values['recoloured']:10.2f} "
            f"{values['kept']:6.2f} {values['seconds']:7.1f}"
        )
    print(
        f"wrote {out}/results.json, editing.png, grid.png (columns: input, reconstruction, {', '.join(args.methods)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
