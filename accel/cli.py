"""Command line: ``accel methods`` and ``accel compare`` (unpatched vs patched, same seed, side by side)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "a red circle and a blue square"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from accel.errors import AccelError

    try:
        return args.run(args)
    except AccelError as error:
        print(f"accel: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Attention acceleration for diffusers pipelines.")
    commands = parser.add_subparsers(dest="command")

    listing = commands.add_parser("methods", help="list the registered methods and the model families they support")
    listing.set_defaults(run=_run_methods)

    compare = commands.add_parser(
        "compare",
        help="run a pipeline unpatched and patched with the same seed; print time, speed-up and output difference",
    )
    compare.add_argument("--model", default="shapes-sd", help="built-in name, hub id or local folder")
    compare.add_argument("--method", default="dense", help="registered method name (see `accel methods`)")
    compare.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable (JSON values)"
    )
    compare.add_argument("--prompt", default=DEFAULT_PROMPT)
    compare.add_argument("--height", type=int, default=None, help="pixels; default: the model's own small default")
    compare.add_argument("--width", type=int, default=None)
    compare.add_argument("--frames", type=int, default=None, help="video models: number of frames")
    compare.add_argument("--steps", type=int, default=None, help="default: the built-in model's own (else 25)")
    compare.add_argument("--guidance", type=float, default=None, help="guidance scale; default: the pipeline's")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--repeats", type=int, default=1, help="timed runs of each side (median reported)")
    compare.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    compare.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    compare.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    compare.add_argument("--out", default="outputs", help="folder for images / videos and results.json")
    compare.set_defaults(run=_run_compare)
    return parser


def _run_methods(args) -> int:
    import accel
    from accel.pipelines.families import FAMILIES

    rows = [(m.name, ", ".join(FAMILIES[f].title for f in m.families), m.summary) for m in accel.methods()]
    _print_table(["method", "models", "what it does"], rows)
    return 0


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to method options; values are JSON where they parse, text otherwise."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _run_compare(args) -> int:
    import torch

    import accel
    from accel import metrics

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    options = parse_options(args.option)
    # Validate the method before spending time on loading and generating.
    accel.registry.method_info(args.method).config_class.from_options(**options)

    pipe = accel.load_pipeline(args.model, dtype=dtype).to(device)
    call = _call_kwargs(args)
    steps = call.pop("num_inference_steps")
    is_video = "num_frames" in call

    def generate(num_inference_steps: int):
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        kwargs = {**call, "num_inference_steps": num_inference_steps}
        start = time.perf_counter()
        with torch.inference_mode():
            result = pipe(generator=generator, output_type="np", **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, (result.frames if is_video else result.images)

    # One short unpatched call first, so one-time costs (allocator, kernels) are not charged to either side.
    generate(1)
    plain_times, patched_times = [], []
    plain = patched = None
    for _ in range(max(args.repeats, 1)):
        seconds, plain = generate(steps)
        plain_times.append(seconds)
        with accel.patched(pipe, args.method, **options):
            seconds, patched = generate(steps)
        patched_times.append(seconds)

    plain_s, patched_s = statistics.median(plain_times), statistics.median(patched_times)
    result = {
        "model": args.model,
        "method": args.method,
        "options": options,
        "device": device,
        "dtype": str(next(pipe.components[_denoiser_name(pipe)].parameters()).dtype),
        "call": {k: v for k, v in call.items() if k != "prompt"},
        "prompt": args.prompt,
        "steps": steps,
        "seed": args.seed,
        "repeats": max(args.repeats, 1),
        "plain_seconds": plain_s,
        "patched_seconds": patched_s,
        "speedup": plain_s / patched_s,
        "psnr_db": metrics.psnr(plain, patched),
        "max_abs_diff": metrics.max_abs_diff(plain, patched),
    }
    paths = _save_outputs(Path(args.out), plain, patched, is_video)
    result["files"] = paths
    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2))

    _print_table(
        ["model", "method", "unpatched s", "patched s", "speed-up", "PSNR dB", "max |diff|"],
        [
            (
                args.model,
                args.method,
                f"{plain_s:.3f}",
                f"{patched_s:.3f}",
                f"{result['speedup']:.2f}x",
                f"{result['psnr_db']:.1f}",
                f"{result['max_abs_diff']:.2e}",
            )
        ],
    )
    print(f"device {device}, dtype {result['dtype']}, {steps} steps, seed {args.seed}; outputs in {args.out}/")
    return 0


def _denoiser_name(pipe) -> str:
    return "unet" if "unet" in pipe.components else "transformer"


def _call_kwargs(args) -> dict[str, Any]:
    from accel.loading import default_call_kwargs

    call: dict[str, Any] = {"num_inference_steps": 25, **default_call_kwargs(args.model)}
    for key, value in (
        ("height", args.height),
        ("width", args.width),
        ("num_frames", args.frames),
        ("num_inference_steps", args.steps),
    ):
        if value is not None:
            call[key] = value
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    call["prompt"] = args.prompt
    return call


def _save_outputs(out: Path, plain, patched, is_video: bool) -> list[str]:
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, batch in (("unpatched", plain), ("patched", patched)):
        if is_video:
            from diffusers.utils import export_to_video

            path = out / f"{label}.mp4"
            # export_to_video scales float frames in [0, 1] itself.
            export_to_video([frame for frame in batch[0]], str(path), fps=8)
        else:
            path = out / f"{label}.png"
            Image.fromarray((np.clip(batch[0], 0, 1) * 255).round().astype("uint8")).save(path)
        paths.append(str(path))
    return paths


def _print_table(headers: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()
