"""The Gradio demo: its settings forms read off the config dataclasses, and the app used in headless Chromium."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

import accel
from accel.config import MethodConfig
from demo.form import DEFAULT_CHOICE, config_fields, field_docs, options_from_form

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ACCEL_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.mark.parametrize("info", accel.methods(), ids=lambda info: info.name)
def test_every_option_of_every_method_has_a_widget_and_help(info):
    specs = config_fields(info.config_class)
    assert [s.name for s in specs] == info.config_class.option_names()
    for spec in specs:
        assert spec.help, f"{info.name}.{spec.name} has no description in the config's Args section"
    # The form as first shown means "the defaults": no options, and a config that builds.
    options = options_from_form(specs, [spec.initial() for spec in specs])
    assert options == {}
    info.config_class.from_options(**options)


def test_form_values_become_options():
    specs = {s.name: s for s in config_fields(accel.AgentConfig)}
    assert specs["agent_ratio"].kind == "float"
    assert specs["cell"].kind == "json"
    assert specs["pooling"].kind == "choice" and specs["pooling"].choices == ("merge", "grid")
    assert specs["seed"].kind == "int" and specs["seed"].optional
    ordered = list(specs.values())
    values = [spec.initial() for spec in ordered]
    changes = {"agent_ratio": 0.125, "cell": "[2, 4]", "pooling": "grid", "layers": r"down_blocks\..*"}
    values = [changes.get(spec.name, value) for spec, value in zip(ordered, values, strict=True)]
    options = options_from_form(ordered, values)
    assert options == {"agent_ratio": 0.125, "cell": [2, 4], "pooling": "grid", "layers": r"down_blocks\..*"}
    assert accel.AgentConfig.from_options(**options).cell == (2, 4)
    # A tuple typed as the default's JSON is the default, not a change.
    assert options_from_form([specs["late_cell"]], ["2"]) == {}
    assert options_from_form([specs["pooling"]], [DEFAULT_CHOICE]) == {}


def test_bad_form_values_name_the_field():
    specs = {s.name: s for s in config_fields(accel.GNAConfig)}
    with pytest.raises(ValueError, match="kernel_size.*not JSON"):
        specs["kernel_size"].parse("[8, 8")
    with pytest.raises(ValueError, match="dense_steps.*whole number"):
        specs["dense_steps"].parse(1.5)


def test_docstring_types_with_parentheses_and_references_to_the_base():
    docs = field_docs(accel.AgentConfig)
    assert docs["cell"].startswith("token-merging cell")
    # Subclasses say "see `MethodConfig`" for layers: the base's description is kept.
    assert docs["layers"].startswith("Regular expression")


@dataclasses.dataclass(kw_only=True)
class _BlurConfig(MethodConfig):
    """A third-party method, registered at run time.

    Args:
        radius (`int`, defaults to `3`): blur radius in tokens.
        mode (`str`, defaults to `"box"`): kernel shape.
    """

    name: ClassVar[str] = "test-blur"
    radius: int = 3
    mode: str = dataclasses.field(default="box", metadata={"choices": ("box", "gauss")})


def test_a_registered_method_appears_in_the_app_without_editing_it():
    pytest.importorskip("gradio")
    from demo.app import build_app

    accel.register_method(_BlurConfig, families=["unet"])(lambda plan, config: None)
    try:
        app = build_app()
        elem_ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
        assert {"test-blur-radius", "test-blur-mode", "agent-agent_ratio", "gna-kernel_size"} <= elem_ids
        method_menu = next(b for b in app.blocks.values() if getattr(b, "label", None) == "method")
        assert "test-blur" in [choice[1] for choice in method_menu.choices]
    finally:
        accel.unregister_method("test-blur")


def test_call_arguments_keep_the_models_defaults_where_the_form_says_zero():
    from demo.app import call_arguments, form_defaults

    assert form_defaults("shapes-sd") == (128, 128, 0, 25)
    height, width, frames, steps = form_defaults("hunyuanvideo-tiny")
    assert frames > 0 and steps > 0
    call = call_arguments("shapes-sd", "a red circle", 0, 96, 0, 0)
    assert call == {
        "prompt": "a red circle",
        "height": 64,
        "width": 96,
        "num_inference_steps": 25,
        "guidance_scale": 6.0,
    }
    assert call_arguments("owner/model", "x", 0, 0, 0, 0) == {"prompt": "x", "num_inference_steps": 25}


def test_a_failed_load_does_not_break_the_next_request():
    from demo.app import PipelineCache

    cache = PipelineCache()
    first = cache.get("sd15-tiny")
    with pytest.raises(accel.AccelError, match="'nosuch-model' is not a built-in pipeline"):
        cache.get("nosuch-model")
    # The failed load had freed the old pipeline but kept its name: the next request was handed None.
    again = cache.get("sd15-tiny")
    assert again is not None and type(again) is type(first)


def _demo_run():
    """The app's Generate handler, called as Gradio would, with every method's settings at their defaults."""
    pytest.importorskip("gradio")
    from demo.app import build_app

    app = build_app()
    run = next(function.fn for function in app.fns.values() if function.name == "run")
    settings = [spec.initial() for info in accel.methods() for spec in config_fields(info.config_class)]

    def generate(model, height=0, width=0, seed=0, method="dense", frames=0):
        return run(model, method, "a red circle", height, width, frames, 1, seed, 1, *settings)

    return generate


@pytest.mark.parametrize(
    ("model", "settings", "expected"),
    [
        # diffusers raises OSError for a folder without model_index.json.
        ("folder", {}, "could not be loaded (Error no file named model_index.json found in directory"),
        # FLUX rounds 8 px down to 0 and the VAE fails with a RuntimeError; the CLI's check is shared.
        ("flux-tiny", {"height": 8}, "height (--height) 8 is not a multiple of 16: FluxPipeline would round it to 0"),
        # torch: "Overflow when unpacking long long".
        ("sd15-tiny", {"seed": 99999999999999999999999}, "seed (--seed) must be a whole number from 0 to"),
        ("sd15-tiny", {"method": "gna"}, "methods that support it: agent, astar, dense, hidiffusion, structured"),
    ],
)
def test_generate_shows_input_errors_as_messages_naming_the_fix(tmp_path, model, settings, expected):
    import gradio as gr

    generate = _demo_run()
    with pytest.raises(gr.Error) as raised:
        generate(str(tmp_path) if model == "folder" else model, **settings)
    assert expected in raised.value.message


def test_each_video_run_deletes_the_previous_runs_files():
    import glob
    import tempfile

    pattern = f"{tempfile.gettempdir()}/accel-demo-*"
    generate = _demo_run()
    before = set(glob.glob(pattern))
    folders = []
    for _ in range(2):
        outputs = generate("hunyuanvideo-tiny", height=64, width=64, frames=5)
        assert outputs[2].value is not None  # the unpatched video
        folders.append(set(glob.glob(pattern)) - before)
    assert len(folders[0]) == 1 and len(folders[1]) == 1 and folders[0] != folders[1]


def _generate_handler():
    """The app's Generate handler and its input components, in the order Gradio passes their values."""
    pytest.importorskip("gradio")
    from demo.app import build_app

    app = build_app()
    function = next(function for function in app.fns.values() if function.name == "run")
    return function.fn, function.inputs


def _as_sent(component, value):
    """What the handler receives for ``value`` in ``component``: Gradio preprocesses it first."""
    return component.preprocess(value)


def test_the_form_as_first_shown_sends_every_methods_defaults():
    # The checkbox for astar's refine (True, False or None: on for A&E's loss) showed None as unticked and sent
    # False, so every A&E run in the demo quietly turned off its refinement.
    _, inputs = _generate_handler()
    by_id = {component.elem_id: component for component in inputs if component.elem_id}
    for info in accel.methods():
        specs = config_fields(info.config_class)
        sent = [_as_sent(by_id[f"{info.name}-{spec.name}"], by_id[f"{info.name}-{spec.name}"].value) for spec in specs]
        assert options_from_form(specs, sent) == {}, info.name
    refine = next(spec for spec in config_fields(accel.AStarConfig) if spec.name == "refine")
    assert [refine.parse(_as_sent(by_id["astar-refine"], raw)) for raw in ("true", "false", DEFAULT_CHOICE)] == [
        True,
        False,
        None,
    ]


@pytest.mark.parametrize(
    ("box", "value", "words"), [("steps", 2.5, "steps: 2.5"), ("gna-dense_steps", 1.5, "dense_steps: 1.5")]
)
def test_fractions_in_whole_number_boxes_are_refused_not_rounded(box, value, words):
    # Gradio's precision=0 rounded them (2.5 steps ran 2, dense_steps 1.5 ran 2) before the form could refuse them.
    import gradio as gr

    run, inputs = _generate_handler()
    values = [component.value for component in inputs]
    index = next(i for i, c in enumerate(inputs) if box in (c.elem_id, c.label))
    values[index] = value
    sent = [_as_sent(component, raw) for component, raw in zip(inputs, values, strict=True)]
    sent[:2] = ["sd15-tiny", "gna"]
    with pytest.raises(gr.Error) as raised:
        run(*sent)
    assert raised.value.message.startswith(f"{words} is not a whole number")


def test_accels_notices_are_shown_with_the_results():
    # "RAU-Net is off ... not above the UNet's training size" went to the server's terminal only: on the page,
    # HiDiffusion at this size looked like a method that does not help.
    generate = _demo_run()
    table = generate("sd15-tiny", height=128, width=128, method="hidiffusion")[-1]
    assert table.count("hidiffusion: RAU-Net is off for 16x16 latents") == 1


def test_the_results_say_what_was_timed_and_which_side_is_which():
    pytest.importorskip("gradio")
    import numpy as np

    from accel.compare import Comparison
    from demo.app import timing_table

    frames = np.zeros((2, 3, 4, 3), dtype=np.float32)  # 2 frames, 3 rows, 4 columns
    run = Comparison(
        model="m",
        method="dense",
        options={},
        device="cpu",
        dtype="torch.float32",
        call={},
        prompt="p",
        steps=1,
        seed=7,
        repeats=3,
        plain_seconds=2.0,
        patched_seconds=1.0,
        plain=frames,
        patched=frames,
        is_video=True,
    )
    table = timing_table(run)
    # Was "2x3x4": which number was the width?
    assert "2 frames, width 4, height 3, 1 step, seed 7 on both sides" in table
    assert "median of 3 timed calls" in table
    assert "text encoding, 1 step of denoising and decoding" in table and "untimed 1-step warm-up" in table


def test_demo_threads_must_be_positive(capsys):
    from demo.app import main

    with pytest.raises(SystemExit) as exit:
        main(["--threads", "-1"])
    assert exit.value.code == 2 and "argument --threads: must be at least 1, got -1" in capsys.readouterr().err


def _browser() -> str | None:
    """Chromium for the browser test; CI (ACCEL_REQUIRE_BROWSER=1) fails instead of skipping without one."""
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import gradio  # noqa: F401
        import playwright  # noqa: F401
    except ImportError:
        executable = None
    if executable is None and os.environ.get("ACCEL_REQUIRE_BROWSER") == "1":
        pytest.fail("the browser test needs chromium (apt-get install chromium), gradio and playwright")
    return executable


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url():
    if _browser() is None:
        pytest.skip("no chromium / playwright here; CI installs them (see .ci/run)")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "demo-server.log", "w")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "demo", "--port", str(port), "--threads", "2"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    message = (ARTIFACTS / "demo-server.log").read_text()[-2000:]
                    raise RuntimeError(f"the demo did not start: {message}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def page(demo_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=_browser(),
            # No sandbox as root; no background networking: this machine's network is closed.
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],  # fmt: skip
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1300})
        page.goto(demo_url)
        yield page
        browser.close()


def test_generate_on_the_default_shows_both_images_and_the_timings(page):
    page.get_by_role("button", name="Generate").click()
    table = page.locator("#timings")
    table.get_by_text("speed-up").wait_for(timeout=180_000)
    # The outputs fade in as the event ends; the screenshot waits for them to settle.
    page.wait_for_function("() => !document.querySelector('.pending, .generating')", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    text = table.inner_text()
    assert "seconds" in text and "PSNR" in text and "shapes-sd, hidiffusion" in text
    for side in ("unpatched", "patched"):
        image = page.locator(f"#{side}-image img")
        assert image.count() == 1
        # Decoded by the browser: a real picture, not a broken link.
        assert image.evaluate("img => img.complete && img.naturalWidth") == 128


def test_an_unsupported_pair_shows_accels_error(page):
    # GNA is for FLUX / HunyuanVideo: on the SD-architecture default the user sees accel's message, not a trace.
    page.get_by_label("method").click()
    page.get_by_role("option", name="gna").click()
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("supports FLUX.1 and HunyuanVideo pipelines").first.wait_for(timeout=60_000)


def test_a_video_model_shows_both_videos(page):
    page.get_by_label("model").click()
    page.get_by_role("option", name="hunyuanvideo-tiny").click()
    # Choosing the model fills in its own size and frames.
    from playwright.sync_api import expect

    expect(page.get_by_label("frames")).not_to_have_value("0", timeout=30_000)
    page.get_by_label("method").click()
    page.get_by_role("option", name="dense").click()
    page.get_by_role("button", name="Generate").click()
    page.locator("#timings").get_by_text("hunyuanvideo-tiny, dense").wait_for(timeout=180_000)
    for side in ("unpatched", "patched"):
        video = page.locator(f"#{side}-video video")
        video.wait_for(timeout=30_000)
        assert video.evaluate("v => v.src").endswith(".mp4")
    assert "inf dB" in page.locator("#timings").inner_text()  # dense is exact
