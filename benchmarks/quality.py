"""Quality benchmark on the shipped ``shapes-sd`` model: fidelity, prompt adherence and duplication.

    python benchmarks/quality.py --method dense --images-per-prompt 4 --scales 1 2 4

For every scale (1x, 2x, 4x the 64 px training resolution), every prompt of a fixed set and N seeds, it generates
with the unpatched pipeline and, unless ``--method none``, with the patched one (same seeds). The procedural detector
(``accel.pipelines.shapes_detector``) then scores each image:

- adherence: every requested object is found with the right colour and shape;
- duplication: copies of requested objects beyond the number asked (rate = share of images with any);
- fidelity of the patched images against the unpatched ones: PSNR, SSIM, SQNR.

Writes ``results.json``, ``grid.png`` (samples) and ``quality.png`` (plots) under ``--out`` and prints a table.
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
import torch.nn.functional as F
from common import device_name, environment, save_figure

import accel
from accel import metrics
from accel.cli import parse_options
from accel.compare import strict_json
from accel.pipelines import shapes, shapes_detector

COLOUR_NAMES = list(shapes.COLOURS)
PROMPTS: dict[str, list[str]] = {
    "single": [f"a {c} {s}" for s in shapes.SHAPES for c in COLOUR_NAMES],
    "pair": [
        "a red circle and a blue square",
        "a yellow star and a green triangle",
        "a blue circle and a purple star",
        "a green square and a red triangle",
        "a purple circle and a yellow square",
        "a red star and a blue triangle",
        "a yellow circle and a green star",
        "a blue square and a red circle",
    ],
    "relation": [
        "a red circle left of a blue square",
        "a green star right of a yellow circle",
        "a purple triangle left of a green circle",
        "a blue star right of a red square",
    ],
    "count": ["two red circles", "two blue squares", "two yellow stars", "two green triangles", "two purple circles"],
}


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two ``[H, W, 3]`` images in [0, 1], 7x7 Gaussian window (sigma 1.5), per channel."""
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[:, None].double()
    y = torch.from_numpy(np.ascontiguousarray(b)).permute(2, 0, 1)[:, None].double()
    coords = torch.arange(7, dtype=torch.float64) - 3
    kernel_1d = torch.exp(-(coords**2) / (2 * 1.5**2))
    kernel = (kernel_1d[:, None] * kernel_1d[None]).div(kernel_1d.sum() ** 2)[None, None]

    def blur(t):
        return F.conv2d(t, kernel)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def generate(pipe, prompt: str, seeds: list[int], size: int, steps: int, guidance: float) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return pipe(
            [prompt] * len(seeds),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        ).images


def evaluate(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe = accel.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    options = parse_options(args.option)
    prompts = [(group, p) for group in args.groups for p in PROMPTS[group][: args.prompts_per_group]]
    seeds = [args.seed + k for k in range(args.images_per_prompt)]
    methods = [m for m in args.method if m != "none"]
    sides = ["unpatched", *methods]
    rng = np.random.default_rng(args.seed)

    records, samples = [], {}
    # One short call per side before anything is timed, so the first prompt's seconds carry no one-time costs.
    for side in sides:
        with _patched(pipe, side, options):
            generate(pipe, prompts[0][1], seeds[:1], shapes.BASE_RESOLUTION * args.scales[0], 1, args.guidance)
    started = time.perf_counter()
    for scale in args.scales:
        size = shapes.BASE_RESOLUTION * scale
        for group, prompt in prompts:
            scene = shapes.scene_from_caption(prompt, rng)
            outputs, seconds = {}, {}
            for side in sides:
                tick = time.perf_counter()
                with _patched(pipe, side, options):
                    outputs[side] = generate(pipe, prompt, seeds, size, args.steps, args.guidance)
                seconds[side] = time.perf_counter() - tick
            for k, seed in enumerate(seeds):
                record = {"scale": scale, "size": size, "group": group, "prompt": prompt, "seed": seed}
                for side in sides:
                    result = shapes_detector.score(outputs[side][k], scene)
                    record[side] = {
                        "adherent": result.adherent,
                        "colour_adherent": result.colour_adherent,
                        "duplicates": result.duplicates,
                        "colour_duplicates": result.colour_duplicates,
                        "found": [f"{d.colour} {d.shape}" for d in result.detections],
                        "seconds_per_image": seconds[side] / len(seeds),
                    }
                for method in methods:
                    a, b = outputs["unpatched"][k], outputs[method][k]
                    record.setdefault("fidelity", {})[method] = {
                        "psnr_db": metrics.psnr(a, b),
                        "ssim": ssim(a, b),
                        "sqnr_db": metrics.sqnr(a, b),
                    }
                records.append(record)
            samples.setdefault(scale, []).append({side: outputs[side][0] for side in sides})
    summary = summarise(records, sides)
    result = {
        "model": args.model,
        "method": methods[0] if len(methods) == 1 else methods or "none",
        "options": options,
        "device": device_name("auto"),
        "dtype": str(pipe.unet.dtype),
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "images_per_prompt": args.images_per_prompt,
        "seeds": seeds,
        "base_resolution": shapes.BASE_RESOLUTION,
        "scales": args.scales,
        "threads": args.threads,
        "versions": environment(),
        "baseline": "fidelity: the unpatched pipeline, same prompts, seeds and steps; adherence / duplication: absolute",
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "images": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(strict_json(result, indent=2))
    _save_grid(samples, sides, out / "grid.png")
    _plot(summary, sides, result, out / "quality.png")
    _print_summary(summary, sides, result)
    return result


@contextlib.contextmanager
def _patched(pipe, side: str, options: dict):
    """The pipeline as ``side`` runs it: unpatched, an accel method (with ``options``), or the peer tomesd."""
    if side == "unpatched":
        yield
    elif side == "tomesd":
        import tomesd

        # tomesd's README defaults (ratio 0.5, 2x2 cells, the top UNet level only).
        tomesd.apply_patch(pipe, ratio=0.5)
        try:
            yield
        finally:
            tomesd.remove_patch(pipe)
    else:
        with accel.patched(pipe, side, **options):
            yield


def summarise(records: list[dict], sides: list[str]) -> dict:
    summary: dict = {}
    for scale in sorted({r["scale"] for r in records}):
        for group in ["all", *dict.fromkeys(r["group"] for r in records)]:
            chosen = [r for r in records if r["scale"] == scale and (group == "all" or r["group"] == group)]
            entry: dict = {"images": len(chosen)}
            for side in sides:
                entry[side] = {
                    "adherence": float(np.mean([r[side]["adherent"] for r in chosen])),
                    "colour_adherence": float(np.mean([r[side]["colour_adherent"] for r in chosen])),
                    "duplication_rate": float(np.mean([r[side]["duplicates"] > 0 for r in chosen])),
                    "mean_duplicates": float(np.mean([r[side]["duplicates"] for r in chosen])),
                    "colour_duplication_rate": float(np.mean([r[side]["colour_duplicates"] > 0 for r in chosen])),
                    "seconds_per_image": float(np.mean([r[side]["seconds_per_image"] for r in chosen])),
                }
            for method in chosen[0].get("fidelity", {}):
                for key in ("psnr_db", "ssim", "sqnr_db"):
                    values = [r["fidelity"][method][key] for r in chosen]
                    entry.setdefault("fidelity", {}).setdefault(method, {})[key] = float(
                        np.mean(np.minimum(values, 1e9))
                    )
            summary.setdefault(f"{scale}x", {})[group] = entry
    return summary


def _print_summary(summary: dict, sides: list[str], result: dict) -> None:
    header = ["scale", "prompts", "images"]
    for side in sides:
        header += [
            f"{side} adherence",
            f"{side} colour adh.",
            f"{side} dup rate",
            f"{side} colour dup",
            f"{side} s/img",
        ]
    for side in sides[1:]:
        header += [f"{side} PSNR dB", f"{side} SSIM", f"{side} SQNR dB"]
    rows = []
    for scale, groups in summary.items():
        for group, entry in groups.items():
            row = [scale, group, str(entry["images"])]
            for side in sides:
                s = entry[side]
                row += [
                    f"{s['adherence']:.2f}",
                    f"{s['colour_adherence']:.2f}",
                    f"{s['duplication_rate']:.2f}",
                    f"{s['colour_duplication_rate']:.2f}",
                    f"{s['seconds_per_image']:.2f}",
                ]
            for side in sides[1:]:
                f = entry["fidelity"][side]
                row += [f"{f['psnr_db']:.1f}", f"{f['ssim']:.3f}", f"{f['sqnr_db']:.1f}"]
            rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"{result['model']}, {result['device']}, {result['dtype']}, {result['steps']} DDIM steps, "
        f"guidance {result['guidance_scale']}, {result['images_per_prompt']} seeds per prompt"
    )


def _save_grid(samples: dict, sides: list[str], path: Path, tile: int = 128) -> None:
    """One row per (scale, side), one column per prompt (its first seed), every tile resized to ``tile`` pixels."""
    from PIL import Image

    rows = []
    for items in samples.values():
        for side in sides:
            tiles = [np.asarray(Image.fromarray(_uint8(item[side])).resize((tile, tile))) for item in items[:10]]
            rows.append(np.concatenate(tiles, axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def _plot(summary: dict, sides: list[str], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for side in sides:
        for key, style in (("adherence", "-"), ("colour_adherence", "--")):
            values = [summary[s]["all"][side][key] for s in scales]
            axes[0].plot(scales, values, style, marker="o", label=f"{side}: {key.replace('_', ' ')}")
        for key, style in (("duplication_rate", "-"), ("colour_duplication_rate", "--")):
            values = [summary[s]["all"][side][key] for s in scales]
            axes[1].plot(scales, values, style, marker="o", label=f"{side}: {key.replace('_', ' ')}")
    axes[0].set_title("prompt adherence (all prompts)")
    axes[1].set_title("duplication (share of images with extra copies)")
    for ax in axes:
        ax.set_xlabel(f"resolution (x {shapes.BASE_RESOLUTION} px)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{result['model']} on {result['device']}, {result['dtype']}, {result['steps']} steps, "
        f"{result['images_per_prompt']} seeds/prompt; baseline: unpatched",
        fontsize=9,
    )
    save_figure(fig, path)


# --quick: one prompt of each of two groups, one image each, at 1x and 2x, 4 steps.
QUICK = {
    "groups": ["single", "pair"],
    "prompts_per_group": 1,
    "images_per_prompt": 1,
    "scales": [1, 2],
    "steps": 4,
    "out": "benchmarks/results/quality-quick",
}


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument(
        "--method",
        nargs="+",
        default=["none"],
        help="registered methods and/or the peer `tomesd` (pip install tomesd), each against the unpatched model; "
        "`none` for the unpatched model only",
    )
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--groups", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument("--prompts-per-group", type=int, default=None, help="first K prompts of each group")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="benchmarks/results/quality")
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    args = parser.parse_args(argv)
    if args.quick:
        # Quick settings fill in whatever was not given explicitly.
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if "tomesd" in args.method:
        try:
            import tomesd  # noqa: F401
        except ImportError as error:
            # Before anything runs, not after the other sides have spent their time.
            parser.error(f"--method tomesd needs the peer package ({error}); install it: pip install tomesd")
    evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
