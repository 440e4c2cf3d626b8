"""The accel demo: a pipeline unpatched and patched side by side, same prompt and seed, with times and drift.

    make demo                                   # http://127.0.0.1:7860
    python -m demo --host 0.0.0.0 --port 8000   # reachable from other machines: only where you mean it

Methods and their settings are read from accel's registry and config dataclasses, so a method registered with
``accel.register_method`` appears here without touching this file. Requests run one at a time in a queue: the
pipeline is shared, and two generations on one CPU would only slow each other down.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import accel
from accel.cli import positive_int
from accel.compare import Comparison, checked_seed, compare, load_pipeline_or_explain, to_uint8
from accel.loading import builtin_names, default_call_kwargs
from demo.form import DEFAULT_CHOICE, FieldSpec, config_fields, options_from_form

# accel's loggers ("accel.pipelines.hidiffusion", ...) all descend from this one.
ACCEL_LOGGER = "accel"

# The first view: the shipped model at twice its training size, where unpatched Stable Diffusion duplicates objects
# and HiDiffusion does not (and is faster).
DEFAULT_MODEL = "shapes-sd"
DEFAULT_METHOD = "hidiffusion"
DEFAULT_PROMPT = "a red circle"
DEMO_SIZES = {"shapes-sd": {"height": 128, "width": 128}}
# Small images (the shipped model draws 64-256 pixels) are shown enlarged to the panel, without smoothing.
CSS = (
    "#unpatched-image img, #patched-image img "
    "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
)


class PipelineCache:
    """The last pipeline loaded; another model replaces it (one model's weights in memory at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._name: str | None = None
        self._pipe = None

    def get(self, name: str):
        import torch

        with self._lock:
            if name != self._name:
                # Free the old weights before loading the new ones; the name goes with them, so that after a failed
                # load the next request loads its model again instead of being handed None.
                self._pipe, self._name = None, None
                device = "cuda" if torch.cuda.is_available() else "cpu"
                self._pipe = load_pipeline_or_explain(name).to(device)
                self._name = name
            return self._pipe


def form_defaults(model: str) -> tuple[int, int, int, int]:
    """Height, width, frames and steps the form shows for ``model`` (0: the pipeline's own default)."""
    call = {**default_call_kwargs(model), **DEMO_SIZES.get(model, {})}
    return tuple(int(call.get(key, 0)) for key in ("height", "width", "num_frames", "num_inference_steps"))


def call_arguments(model: str, prompt: str, height, width, frames, steps) -> dict[str, Any]:
    """The pipeline call: the built-in model's own defaults, overridden by whatever the form sets (0: default)."""
    call: dict[str, Any] = {"num_inference_steps": 25, **default_call_kwargs(model), "prompt": prompt}
    for key, value in (("height", height), ("width", width), ("num_frames", frames), ("num_inference_steps", steps)):
        if value not in (None, 0, ""):
            call[key] = int(value)
    return call


def timing_table(run: Comparison, notices: Sequence[str] = ()) -> str:
    """The results as Markdown: times, speed-up and drift, what was timed, the run's settings, and what accel said
    about the run (a method that does nothing at this size would otherwise look like a method that does not help)."""
    size = run.output_size
    # "64x96" reads as width x height to some and height x width to others; naming the sides leaves no doubt.
    shape = f"width {size['width']}, height {size['height']}"
    if "num_frames" in size:
        shape = f"{size['num_frames']} frames, {shape}"
    steps = f"{run.steps} step{'' if run.steps == 1 else 's'}"
    runs = f"median of {run.repeats} timed calls" if run.repeats > 1 else "1 timed call"
    lines = [
        "| | unpatched | patched |",
        "|---|---|---|",
        f"| seconds ({runs}) | {run.plain_seconds:.2f} | {run.patched_seconds:.2f} |",
        f"| speed-up | 1.00x | {run.speedup:.2f}x |",
        f"| PSNR vs unpatched | | {run.psnr_db:.1f} dB |",
        f"| max abs difference (pixel values 0-1) | | {run.max_abs_diff:.3g} |",
        "",
        f"{run.model}, {run.method} {run.options or '(defaults)'}; {shape}, {steps}, "
        f"seed {run.seed} on both sides, {run.device}, {run.dtype}",
        "",
        f"A call is the whole pipeline call: text encoding, {steps} of denoising and decoding. Each side ran an "
        "untimed 1-step warm-up call first; the timed calls alternate between the sides.",
    ]
    if notices:
        lines += ["", "**accel says:**", *(f"- {notice}" for notice in notices)]
    return "\n".join(lines)


class _Notices(logging.Handler):
    """Collects accel's warnings during a run, each once (they repeat for every call compare makes)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)
        # With a handler here Python no longer falls back to printing on stderr; the server's log keeps them.
        if not logging.getLogger().handlers and logging.lastResort is not None:
            logging.lastResort.handle(record)


@contextlib.contextmanager
def accel_notices():
    """The warnings accel logs inside the block (e.g. "RAU-Net is off ... not above the UNet's training size"),
    which otherwise reach only the server's terminal, never the page."""
    handler = _Notices()
    logger = logging.getLogger(ACCEL_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def whole_number(label: str, value: Any) -> int | None:
    """A form number as an int, refusing fractions (an empty box is ``None``)."""
    try:
        return FieldSpec(name=label, kind="int", default=None, optional=True, help="").parse(value)
    except ValueError as error:
        import gradio as gr

        raise gr.Error(str(error)) from None


class VideoFolders:
    """A temporary folder for each video run's two files; each run deletes the folder of the run before it.

    Gradio copies an output file into its own cache before it answers, and the app's queue runs one request at a time,
    so by the next run nothing reads the previous folder; without this every video run left two MP4s in /tmp.
    """

    def __init__(self) -> None:
        self.last: str | None = None

    def new(self) -> str:
        if self.last is not None:
            shutil.rmtree(self.last, ignore_errors=True)
        self.last = tempfile.mkdtemp(prefix="accel-demo-")
        return self.last


def build_app(cache: PipelineCache | None = None):
    import gradio as gr

    cache = cache or PipelineCache()
    video_folders = VideoFolders()
    registered = accel.methods()
    method_fields: dict[str, list[FieldSpec]] = {info.name: config_fields(info.config_class) for info in registered}
    default_method = DEFAULT_METHOD if DEFAULT_METHOD in method_fields else registered[0].name

    with gr.Blocks(title="accel demo", analytics_enabled=False) as app:
        gr.Markdown(
            "# accel: faster attention for diffusers, one line\n"
            "The same prompt and seed, unpatched and patched with `accel.patch(pipe, method, **settings)`."
        )
        with gr.Row():
            model = gr.Dropdown(
                list(builtin_names()),
                value=DEFAULT_MODEL,
                label="model",
                info="built in, or type a hub id / local folder",
                allow_custom_value=True,
            )
            method = gr.Dropdown(list(method_fields), value=default_method, label="method")
        prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt")
        initial = form_defaults(DEFAULT_MODEL)
        with gr.Row():
            # 0 keeps the pipeline's own setting; choosing a model fills in its defaults. No `precision`: Gradio
            # would round 2.5 steps to 2 before `run` sees it; `run` refuses fractions instead (`whole_number`).
            height = gr.Number(initial[0], label="height", minimum=0, info="pixels; 0: default")
            width = gr.Number(initial[1], label="width", minimum=0, info="pixels; 0: default")
            frames = gr.Number(initial[2], label="frames", minimum=0, info="video models; 0: default")
            steps = gr.Number(initial[3], label="steps", minimum=0, info="0: default")
            seed = gr.Number(0, label="seed", minimum=0, info="the same on both sides")
            repeats = gr.Number(1, label="timed runs", minimum=1, info="per side; median reported")

        settings_groups, settings_inputs = [], []
        with gr.Accordion("method settings (defaults shown)", open=False):
            for name, specs in method_fields.items():
                with gr.Group(visible=name == default_method) as group:
                    settings_groups.append(group)
                    for spec in specs:
                        settings_inputs.append(_widget(gr, name, spec))

        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            plain_image = gr.Image(label="unpatched", elem_id="unpatched-image", interactive=False, height=384)
            patched_image = gr.Image(label="patched", elem_id="patched-image", interactive=False, height=384)
            plain_video = gr.Video(label="unpatched", elem_id="unpatched-video", visible=False, interactive=False)
            patched_video = gr.Video(label="patched", elem_id="patched-video", visible=False, interactive=False)
        timings = gr.Markdown(elem_id="timings")

        def show_settings(selected):
            return [gr.Group(visible=name == selected) for name in method_fields]

        method.change(show_settings, inputs=method, outputs=settings_groups)
        model.change(lambda name: list(form_defaults(name)), inputs=model, outputs=[height, width, frames, steps])

        def run(
            model_name,
            method_name,
            prompt_text,
            h,
            w,
            f,
            n,
            seed_value,
            repeat_count,
            *raw_settings,
            # Gradio's idiom: the default is how the app asks for a progress bar (fed by diffusers' tqdm bars).
            progress=gr.Progress(track_tqdm=True),  # noqa: B008
        ):
            options = _selected_options(method_fields, method_name, raw_settings)
            h, w, f, n = (
                whole_number("height", h),
                whole_number("width", w),
                whole_number("frames", f),
                whole_number("steps", n),
            )
            seed_value, repeat_count = whole_number("seed", seed_value), whole_number("timed runs", repeat_count)
            call = call_arguments(model_name, prompt_text, h, w, f, n)
            try:
                seed = checked_seed(seed_value or 0)  # before loading: a seed torch refuses fails late
                progress(0, desc=f"loading {model_name}")
                pipe = cache.get(model_name)
                with accel_notices() as notices:
                    result = compare(
                        pipe,
                        method_name,
                        options,
                        call,
                        model=model_name,
                        seed=seed,
                        repeats=1 if repeat_count is None else repeat_count,
                    )
            # compare() and the loader raise these for inputs the user can fix, with the fix in the message.
            except (accel.AccelError, ValueError) as error:
                raise gr.Error(str(error)) from None
            if result.is_video:
                folder = video_folders.new()
                plain_path, patched_path = result.save(folder)
                images = [gr.Image(value=None, visible=False), gr.Image(value=None, visible=False)]
                videos = [gr.Video(value=plain_path, visible=True), gr.Video(value=patched_path, visible=True)]
            else:
                images = [gr.Image(value=to_uint8(a), visible=True) for a in (result.plain, result.patched)]
                videos = [gr.Video(value=None, visible=False), gr.Video(value=None, visible=False)]
            return [*images, *videos, timing_table(result, notices)]

        generate.click(
            run,
            inputs=[model, method, prompt, height, width, frames, steps, seed, repeats, *settings_inputs],
            outputs=[plain_image, patched_image, plain_video, patched_video, timings],
        )
    return app


def _selected_options(method_fields: dict[str, list[FieldSpec]], method_name: str, raw: tuple) -> dict[str, Any]:
    """The chosen method's options: its slice of the flat list of every method's settings widgets."""
    import gradio as gr

    offset = 0
    for name, specs in method_fields.items():
        if name == method_name:
            try:
                return options_from_form(specs, list(raw[offset : offset + len(specs)]))
            except ValueError as error:
                raise gr.Error(str(error)) from None
        offset += len(specs)
    raise gr.Error(f"unknown method {method_name!r}; registered: {', '.join(method_fields)}")


def _widget(gr, method_name: str, spec: FieldSpec):
    label = spec.name if spec.kind != "json" else f"{spec.name} (JSON)"
    common = {"label": label, "info": spec.help, "elem_id": f"{method_name}-{spec.name}"}
    if spec.kind == "bool" and spec.optional:
        return gr.Dropdown([DEFAULT_CHOICE, "true", "false"], value=spec.initial(), **common)
    if spec.kind == "bool":
        return gr.Checkbox(spec.initial(), **common)
    if spec.kind in ("int", "float"):
        # No `precision` for ints either: Gradio would round 1.5 to 2 before the form could refuse it.
        return gr.Number(spec.initial(), **common)
    if spec.kind == "choice":
        choices = ([DEFAULT_CHOICE] if spec.optional else []) + list(spec.choices)
        return gr.Dropdown(choices, value=spec.initial(), **common)
    placeholder = "empty: default" if spec.optional else None
    return gr.Textbox(spec.initial(), placeholder=placeholder, **common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    app = build_app()
    # One generation at a time: later requests wait in the queue and see their position.
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, ssr_mode=False, footer_links=[], css=CSS)
    return 0
