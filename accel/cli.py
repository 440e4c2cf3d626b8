"""Command line: ``accel methods``, ``accel compare`` (unpatched vs patched, same seed, side by side) and
``accel edit`` (change a real image by changing its description)."""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    compare.add_argument(
        "--prompt",
        action="append",
        default=None,
        help=f"repeatable: several prompts give one output folder each ({DEFAULT_PROMPT!r} if none)",
    )
    compare.add_argument("--prompts-file", default=None, help="a file of prompts, one per line")
    compare.add_argument(
        "--distributed",
        action="store_true",
        help="share the prompts between the processes of an `accelerate launch` / `torchrun` run (accelerate's "
        "PartialState); each process writes its prompts' folders, the first one the combined results.json",
    )
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

    edit = commands.add_parser(
        "edit", help="edit a real image: null-text inversion, then Prompt-to-Prompt (with DPL's learned nouns)"
    )
    edit.add_argument("--model", default="shapes-sd", help="built-in name, hub id or local folder (SD 1.x / 2.x)")
    edit.add_argument("--image", required=True, help="the image to edit")
    edit.add_argument("--source", required=True, help="what the image shows, e.g. 'a red circle and a blue square'")
    edit.add_argument("--target", required=True, help="what it should show, e.g. 'a green circle and a blue square'")
    edit.add_argument("--method", default="dpl", choices=["dpl", "p2p"])
    edit.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="accel.EditConfig field (JSON values)"
    )
    edit.add_argument("--steps", type=int, default=None, help="default: 25 for shapes-sd, else 50")
    edit.add_argument("--guidance", type=float, default=None, help="default: 6 for shapes-sd, else 7.5")
    edit.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    edit.add_argument("--out", default="outputs/edit", help="folder for edited.png, reconstruction.png, results.json")
    edit.set_defaults(run=_run_edit)
    return parser


def _run_edit(args) -> int:
    import torch
    from PIL import Image

    import accel
    from accel.loading import default_call_kwargs

    if args.threads:
        torch.set_num_threads(args.threads)
    options = parse_options(args.option)
    defaults = default_call_kwargs(args.model)
    steps = args.steps or defaults.get("num_inference_steps", 50)
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance_scale", 7.5)
    pipe = accel.load_pipeline(args.model)
    image = Image.open(args.image).convert("RGB")
    result = accel.edit(
        pipe,
        image,
        args.source,
        args.target,
        method=args.method,
        num_inference_steps=steps,
        guidance_scale=guidance,
        **options,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.image.save(out / "edited.png")
    result.reconstruction.save(out / "reconstruction.png")
    record = {
        "model": args.model,
        "method": args.method,
        "source": args.source,
        "target": args.target,
        "steps": steps,
        "guidance_scale": guidance,
        "options": options,
        "blend_words": result.blend_words,
        "dynamic_words": result.dynamic_words,
        "seconds": result.seconds,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"{args.method}: {args.source!r} -> {args.target!r}; blend words {result.blend_words}; {seconds}")
    print(f"wrote {out}/edited.png, reconstruction.png, results.json")
    return 0


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
    from accel.compare import compare

    prompts = _prompts(args)
    state = None
    if args.distributed:
        from accelerate import PartialState

        # accelerate treats a CPU-only launch as several processes only when told it is a CPU run.
        state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if args.threads is None and state is not None and state.device.type == "cpu":
        # Processes sharing one CPU split its cores instead of each taking them all.
        args.threads = max(1, (os.cpu_count() or 1) // state.num_processes)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if state is not None:
        device = str(state.device)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    options = parse_options(args.option)
    # Validate the method before spending time on loading and generating.
    accel.registry.method_info(args.method).config_class.from_options(**options)

    out = Path(args.out)
    # One prompt on one process keeps the flat layout; otherwise prompt i goes to out/i (same on any process count).
    folders = [out] if len(prompts) == 1 and state is None else [out / f"{i:03d}" for i in range(len(prompts))]
    numbered = list(enumerate(prompts))
    if state is not None:
        with state.split_between_processes(numbered) as share:
            mine = list(share)
    else:
        mine = numbered

    pipe = accel.load_pipeline(args.model, dtype=dtype).to(device)
    rows = []
    for index, prompt in mine:
        run = compare(
            pipe,
            args.method,
            options,
            _call_kwargs(args, prompt),
            model=args.model,
            seed=args.seed,
            repeats=args.repeats,
        )
        result = run.summary()
        result["files"] = run.save(folders[index])
        if state is not None:
            result["process"] = state.process_index
        (folders[index] / "results.json").write_text(json.dumps(result, indent=2))
        rows.append(run)

    if state is not None:
        state.wait_for_everyone()
    if state is None or state.is_main_process:
        if len(folders) > 1:
            combined = [json.loads((folder / "results.json").read_text()) for folder in folders]
            (out / "results.json").write_text(json.dumps(combined, indent=2))
            table = [
                (r["prompt"], r["plain_seconds"], r["patched_seconds"], r["psnr_db"], r["max_abs_diff"])
                for r in combined
            ]
        else:
            table = [(r.prompt, r.plain_seconds, r.patched_seconds, r.psnr_db, r.max_abs_diff) for r in rows]
        _print_table(
            ["model", "method", "prompt", "unpatched s", "patched s", "speed-up", "PSNR dB", "max |diff|"],
            [
                (args.model, args.method, prompt, f"{plain:.3f}", f"{patched:.3f}", f"{plain / patched:.2f}x",
                 f"{psnr:.1f}", f"{diff:.2e}")
                for prompt, plain, patched, psnr, diff in table
            ],
        )  # fmt: skip
        where = f"{state.num_processes} processes, " if state is not None else ""
        steps = _call_kwargs(args, prompts[0])["num_inference_steps"]
        print(f"{where}device {device}, {steps} steps, seed {args.seed}; outputs in {args.out}/")
    return 0


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts or [DEFAULT_PROMPT]


def _call_kwargs(args, prompt: str) -> dict[str, Any]:
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
    call["prompt"] = prompt
    return call


def _print_table(headers: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()
