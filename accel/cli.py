"""Command line: ``accel methods``, ``accel compare`` (unpatched vs patched, same seed, side by side) and
``accel edit`` (change a real image by changing its description)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "a red circle and a blue square"


class InputError(Exception):
    """Command-line input found unusable after parsing (a missing file, an absent device); printed as one line like
    accel's own errors, since the fix is the user's and a traceback would only hide it."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from accel.errors import AccelError

    try:
        return args.run(args)
    except (AccelError, InputError) as error:
        print(f"accel: error: {error}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: 0 or a negative number would divide by zero, run nothing or be replaced
    by a default without a word. Shared with the demo's command line."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    """argparse type for ``--seed``: a seed outside torch's range would fail after loading with "Overflow when
    unpacking long long"."""
    from accel.compare import checked_seed

    try:
        return checked_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2**64 - 1, got {text!r}") from None


def _finite_float(text: str) -> float:
    """argparse type that refuses nan and inf, which float() accepts and which would turn every output to NaN."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class _OptionPairs(argparse.Action):
    """``--option KEY=VALUE``, repeatable: checks the form while parsing and refuses a key given twice, where the
    last value would otherwise win without a word."""

    def __call__(self, parser, namespace, value, option_string=None):
        key, sep, _ = value.partition("=")
        if not sep or not key:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE (e.g. kernel_size=16), got {value!r}")
        pairs = list(getattr(namespace, self.dest) or [])
        if any(pair.partition("=")[0] == key for pair in pairs):
            raise argparse.ArgumentError(self, f"{key!r} is given twice; give each option once")
        setattr(namespace, self.dest, [*pairs, value])


# Settings that have their own flag. Through --option they would reach accel.edit twice ("got multiple values for
# keyword argument") or, for compare, be refused as method options without naming the flag that sets them.
_EDIT_FLAGS = {"method": "--method", "num_inference_steps": "--steps", "guidance_scale": "--guidance"}
_COMPARE_FLAGS = {
    "method": "--method",
    "prompt": "--prompt",
    "height": "--height",
    "width": "--width",
    "num_frames": "--frames",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "seed": "--seed",
    "model": "--model",
}


def _refuse_options_with_flags(pairs: list[str], flags: dict[str, str], accepted: tuple | list = ()) -> None:
    """An ``--option`` whose key a flag sets (and that is not one of the ``accepted`` option names) is refused with
    that flag named."""
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key in flags and key not in accepted:
            raise InputError(f"--option {pair}: {key} has its own flag; give {flags[key]} {value} instead")


@contextlib.contextmanager
def _call_errors_as_input_errors():
    """Methods and diffusers check some inputs only when generation meets them (a GNA kernel larger than the token
    grid, a height not divisible by 8) and raise ValueError with a message naming the fix; those are shown as one
    line. Other exception types are bugs and keep their traceback."""
    try:
        yield
    except ValueError as error:
        raise InputError(str(error)) from error


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
        "--option",
        action=_OptionPairs,
        default=[],
        metavar="KEY=VALUE",
        help="method option, repeatable (JSON or Python values, else text)",
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
    compare.add_argument(
        "--height", type=positive_int, default=None, help="pixels; default: the model's own small default"
    )
    compare.add_argument("--width", type=positive_int, default=None)
    compare.add_argument(
        "--frames", type=positive_int, default=None, help="video models (HunyuanVideo) only: number of frames"
    )
    compare.add_argument(
        "--steps", type=positive_int, default=None, help="default: the built-in model's own (else 25)"
    )
    compare.add_argument(
        "--guidance", type=_finite_float, default=None, help="guidance scale; default: the pipeline's"
    )
    compare.add_argument("--seed", type=_seed, default=0, help="0 to 2**64 - 1")
    compare.add_argument("--repeats", type=positive_int, default=1, help="timed runs of each side (median reported)")
    compare.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    compare.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    compare.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
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
        "--option",
        action=_OptionPairs,
        default=[],
        metavar="KEY=VALUE",
        help="accel.EditConfig field (JSON or Python values, else text)",
    )
    edit.add_argument("--steps", type=positive_int, default=None, help="default: 25 for shapes-sd, else 50")
    edit.add_argument("--guidance", type=_finite_float, default=None, help="default: 6 for shapes-sd, else 7.5")
    edit.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    edit.add_argument("--out", default="outputs/edit", help="folder for edited.png, reconstruction.png, results.json")
    edit.set_defaults(run=_run_edit)
    return parser


def _run_edit(args) -> int:
    import torch

    import accel
    from accel.compare import load_pipeline_or_explain, strict_json
    from accel.loading import default_call_kwargs

    if args.threads:
        torch.set_num_threads(args.threads)
    _refuse_options_with_flags(args.option, _EDIT_FLAGS)
    options = parse_options(args.option)
    defaults = default_call_kwargs(args.model)
    steps = args.steps if args.steps is not None else defaults.get("num_inference_steps", 50)
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance_scale", 7.5)
    # The options, the image and the output folder are checked before the (possibly long) model load.
    config = _edit_config(args.method, steps, guidance, options)
    image = _open_image(args.image)
    out = _output_folder(args.out)
    pipe = load_pipeline_or_explain(args.model)
    with _call_errors_as_input_errors():
        result = accel.edit(pipe, image, args.source, args.target, config=config)
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
    (out / "results.json").write_text(strict_json(record, indent=2))
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"{args.method}: {args.source!r} -> {args.target!r}; blend words {result.blend_words}; {seconds}")
    print(f"wrote {out}/edited.png, reconstruction.png, results.json")
    return 0


def _edit_config(method: str, steps: int, guidance: float, options: dict[str, Any]):
    """The `accel.EditConfig` of the flags and options, built now so that a misspelt option or a bad value fails
    before the model loads (accel.edit would check them only after)."""
    import dataclasses

    from accel import EditConfig

    known = [f.name for f in dataclasses.fields(EditConfig) if f.name not in _EDIT_FLAGS]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"options: {', '.join(known)}"
            raise InputError(f"--option {name}: accel.EditConfig has no such field; {hint}")
    return EditConfig(method=method, num_inference_steps=steps, guidance_scale=guidance, **options)


def _open_image(path_text: str):
    from PIL import Image, UnidentifiedImageError

    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"--image {path_text}: no such file; give the path of a PNG or JPEG image")
    try:
        with Image.open(path) as image:
            image.load()  # accel.edit reads every mode itself (16-bit grey is scaled, not clipped by convert)
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"--image {path_text} could not be read as an image ({error}); give a PNG or JPEG") from None


def _output_folder(path_text: str) -> Path:
    """``--out`` created now, so a path that cannot be a folder fails before generating, not after."""
    out = Path(path_text)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out {path_text} cannot be used as the output folder ({error}); give a folder") from None
    return out


def _checked_device(name: str) -> str:
    """``name`` if this machine has that device, else an error listing the devices it has."""
    import torch

    available = ["cpu"]
    if torch.cuda.is_available():
        available += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device name; available here: {', '.join(available)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise InputError(f"--device {name}: CUDA is not available ({why}); available here: {', '.join(available)}")
    usable = (
        device.type == "cpu"
        or (device.type == "cuda" and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and torch.backends.mps.is_available())
    )
    if not usable:
        raise InputError(f"--device {name} is not available here; available: {', '.join(available)}")
    return name


def _run_methods(args) -> int:
    import accel
    from accel.pipelines.families import FAMILIES

    rows = [(m.name, ", ".join(FAMILIES[f].title for f in m.families), m.summary) for m in accel.methods()]
    _print_table(["method", "models", "what it does"], rows)
    return 0


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to method options; values are JSON where they parse, else Python literals (accel's own
    messages give examples such as ``['circle']``; True / False / None), text otherwise."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option expects KEY=VALUE, got {pair!r}")
        # True / False as Python spells them, besides JSON's true / false ("none" stays text: shift="none").
        literal = {"true": True, "false": False}.get(value.strip().lower(), value)
        if literal is not value:
            options[key] = literal
            continue
        try:
            options[key] = json.loads(value)
            continue
        except json.JSONDecodeError:
            pass
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            options[key] = value
    return options


def _run_compare(args) -> int:
    import torch

    import accel
    from accel.compare import compare, load_pipeline_or_explain, strict_json

    prompts = _prompts(args)
    if args.device is not None:
        _checked_device(args.device)
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
    # Validate the method and its options before spending time on loading and generating.
    config_class = accel.registry.method_info(args.method).config_class
    _refuse_options_with_flags(args.option, _COMPARE_FLAGS, accepted=config_class.option_names())
    options = parse_options(args.option)
    config_class.from_options(**options)

    out = _output_folder(args.out)
    # One prompt on one process keeps the flat layout; otherwise prompt i goes to out/i (same on any process count).
    folders = [out] if len(prompts) == 1 and state is None else [out / f"{i:03d}" for i in range(len(prompts))]
    numbered = list(enumerate(prompts))
    if state is not None:
        with state.split_between_processes(numbered) as share:
            mine = list(share)
    else:
        mine = numbered

    pipe = load_pipeline_or_explain(args.model, dtype=dtype).to(device)
    rows = []
    for index, prompt in mine:
        with _call_errors_as_input_errors():
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
        (folders[index] / "results.json").write_text(strict_json(result, indent=2))
        rows.append(run)

    if state is not None:
        state.wait_for_everyone()
    if state is None or state.is_main_process:
        # Several prompts, or any --distributed run (whose folders are numbered even for one prompt), get the
        # combined results.json beside their folders.
        if len(folders) > 1 or state is not None:
            combined = [json.loads((folder / "results.json").read_text()) for folder in folders]
            (out / "results.json").write_text(strict_json(combined, indent=2))
            # strict_json spells an infinite PSNR "inf"; float() reads it back.
            table = [
                (r["prompt"], r["plain_seconds"], r["patched_seconds"], float(r["psnr_db"]), float(r["max_abs_diff"]))
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
        print(f"{where}device {device}, {steps} steps, seed {args.seed}; outputs in {out}/")
    return 0


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise InputError(
                f"--prompts-file {args.prompts_file}: no such file; give a text file, one prompt per line"
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"--prompts-file {args.prompts_file} could not be read as UTF-8 text ({error})") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            # Falling back to the default prompt would run something the user did not ask for.
            raise InputError(f"--prompts-file {args.prompts_file} holds no prompts; write one prompt per line")
        prompts += from_file
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
