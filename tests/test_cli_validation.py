"""Bad command-line input ends in one line naming the fix (exit code 2), never a traceback, and is never ignored."""

import pytest
from PIL import Image

import accel
from accel.cli import main

TINY = ["--model", "sd15-tiny", "--steps", "2", "--threads", "1"]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``accel ARGV``, whether the error came from argparse (SystemExit) or from a run."""
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--steps", "0", "argument --steps: must be at least 1, got 0"),
        ("--steps", "-3", "argument --steps: must be at least 1, got -3"),
        ("--repeats", "0", "argument --repeats: must be at least 1, got 0"),
        ("--threads", "0", "argument --threads: must be at least 1, got 0"),
        ("--height", "-64", "argument --height: must be at least 1, got -64"),
        ("--frames", "0", "argument --frames: must be at least 1, got 0"),
        ("--steps", "two", "argument --steps: expected a whole number of at least 1, got 'two'"),
        ("--guidance", "nan", "argument --guidance: expected a finite number, got 'nan'"),
        # torch's own error, after loading, was "Overflow when unpacking long long".
        ("--seed", "99999999999999999999999", "argument --seed: expected a whole number from 0 to 2**64 - 1"),
        ("--seed", "-1", "argument --seed: expected a whole number from 0 to 2**64 - 1, got '-1'"),
    ],
)
def test_compare_refuses_bad_numbers_while_parsing(capsys, tmp_path, flag, value, expected):
    code, err = run_cli(["compare", *TINY, "--out", str(tmp_path), flag, value], capsys)
    assert code == 2 and expected in err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--steps", "0", "argument --steps: must be at least 1, got 0"),
        ("--threads", "-1", "argument --threads: must be at least 1, got -1"),
        ("--guidance", "inf", "argument --guidance: expected a finite number, got 'inf'"),
    ],
)
def test_edit_refuses_bad_numbers_while_parsing(capsys, tmp_path, flag, value, expected):
    argv = ["edit", "--model", "sd15-tiny", "--image", "x.png", "--source", "a", "--target", "b", flag, value]
    code, err = run_cli(argv, capsys)
    assert code == 2 and expected in err


@pytest.mark.parametrize("command", ["compare", "edit"])
def test_option_pairs_are_checked_while_parsing(capsys, command):
    base = ["edit", "--image", "x.png", "--source", "a", "--target", "b"] if command == "edit" else ["compare"]
    code, err = run_cli([*base, "--option", "kernel_size"], capsys)
    assert code == 2 and "expected KEY=VALUE (e.g. kernel_size=16), got 'kernel_size'" in err
    code, err = run_cli([*base, "--option", "a=1", "--option", "a=2"], capsys)
    assert code == 2 and "'a' is given twice" in err


def test_frames_on_an_image_model_names_the_video_models(capsys, tmp_path):
    code, err = run_cli(["compare", *TINY, "--frames", "5", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "num_frames (--frames) is for video models (hunyuanvideo-tiny, hunyuanvideo-arch" in err
    assert "StableDiffusionPipeline makes images" in err


@pytest.mark.parametrize(
    ("model", "flag", "value", "expected"),
    [
        # diffusers' FLUX pipeline rounds 8 px down to 0 with a warning, and the VAE then fails.
        (
            "flux-tiny",
            "--height",
            "8",
            "height (--height) 8 is not a multiple of 16: FluxPipeline would round it to 0",
        ),
        # ... and 24 to 16, which results.json would have recorded as 24.
        ("flux-tiny", "--width", "24", "width (--width) 24 is not a multiple of 16: FluxPipeline would make 16 px; "),
        ("hunyuanvideo-tiny", "--frames", "2", "HunyuanVideoPipeline would make 1 frame; give 1 or 5"),
    ],
)
def test_sizes_the_pipeline_would_round_are_refused_naming_the_size_made(
    capsys, tmp_path, model, flag, value, expected
):
    argv = ["compare", "--model", model, "--steps", "1", "--threads", "1", flag, value]
    code, err = run_cli([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and expected in err
    assert not (tmp_path / "results.json").exists()


def test_compare_function_refuses_sizes_the_pipeline_would_round(tiny_pipelines):
    from accel.compare import compare

    call = {"prompt": "a red circle", "num_inference_steps": 1, "height": 24}
    with pytest.raises(ValueError, match="give 16 or 32"):
        compare(tiny_pipelines["flux-tiny"], "dense", {}, call)
    assert accel.get_patch(tiny_pipelines["flux-tiny"]) is None


def test_device_without_cuda_says_what_is_available(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_cli(["compare", *TINY, "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--device cuda: CUDA is not available" in err and "available here: cpu" in err


def test_device_index_past_the_gpus_there_are(capsys, tmp_path, monkeypatch):
    import torch

    # The check runs before anything touches a GPU, so one GPU can be pretended on any machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = run_cli(["compare", *TINY, "--device", "cuda:3", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--device cuda:3 is not available here; available: cpu, cuda:0" in err


def test_device_that_is_no_device_name(capsys, tmp_path):
    code, err = run_cli(["compare", *TINY, "--device", "gpu", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--device 'gpu' is not a device name; available here: cpu" in err


def test_prompts_file_missing_or_empty(capsys, tmp_path):
    missing = tmp_path / "prompts.txt"
    code, err = run_cli(["compare", *TINY, "--prompts-file", str(missing)], capsys)
    assert code == 2 and f"--prompts-file {missing}: no such file" in err
    missing.write_text("\n  \n")
    code, err = run_cli(["compare", *TINY, "--prompts-file", str(missing)], capsys)
    assert code == 2 and "holds no prompts; write one prompt per line" in err


def test_out_that_is_a_file(capsys, tmp_path):
    taken = tmp_path / "results"
    taken.write_text("")
    code, err = run_cli(["compare", *TINY, "--out", str(taken)], capsys)
    assert code == 2 and f"--out {taken} cannot be used as the output folder" in err


@pytest.mark.parametrize("command", ["compare", "edit"])
def test_model_folder_that_is_no_pipeline(capsys, tmp_path, command):
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 64)).save(image)
    base = (
        ["compare", *TINY]
        if command == "compare"
        else ["edit", "--image", str(image), "--source", "a", "--target", "b"]
    )
    code, err = run_cli([*base, "--model", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "model_index.json" in err and "built-in name: shapes-sd, sd15-tiny" in err


def test_value_error_during_generation_is_one_line(capsys, tmp_path):
    # The GNA kernel is checked against the token grid only when the first attention call sees that grid.
    argv = ["compare", "--model", "flux-tiny", "--method", "gna", "--option", "kernel_size=64", "--steps", "2"]
    code, err = run_cli([*argv, "--threads", "1", "--out", str(tmp_path)], capsys)
    # stderr also holds diffusers' progress bars; the error is its last line, whole.
    assert code == 2 and err.strip().splitlines()[-1].startswith("accel: error: gna: transformer_blocks.0.attn")
    assert "kernel_size 64 is larger than the token grid" in err.strip().splitlines()[-1]


def test_other_errors_during_generation_keep_their_traceback(monkeypatch, tmp_path):
    import accel.compare

    def broken(*args, **kwargs):
        raise RuntimeError("an accel bug")

    monkeypatch.setattr(accel.compare, "compare", broken)
    with pytest.raises(RuntimeError, match="an accel bug"):
        main(["compare", *TINY, "--out", str(tmp_path)])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "no such file; give the path of a PNG or JPEG image"),
        ("not an image", "could not be read as an image"),
    ],
)
def test_edit_image_missing_or_unreadable(capsys, tmp_path, kind, expected):
    image = tmp_path / "photo.png"
    if kind == "not an image":
        image.write_text("not pixels")
    argv = ["edit", "--model", "sd15-tiny", "--image", str(image), "--source", "a red circle"]
    code, err = run_cli([*argv, "--target", "a blue circle", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"--image {image}" in err and expected in err


def test_compare_function_refuses_what_it_cannot_run(tiny_pipelines):
    from accel.compare import compare

    pipe = tiny_pipelines["sd15-tiny"]
    call = {"prompt": "a red circle", "num_inference_steps": 2}
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        compare(pipe, "dense", {}, call, repeats=0)
    with pytest.raises(ValueError, match=r"num_inference_steps \(--steps\) must be at least 1, got -3"):
        compare(pipe, "dense", {}, {**call, "num_inference_steps": -3})
    with pytest.raises(ValueError, match="is for video models"):
        compare(pipe, "dense", {}, {**call, "num_frames": 5})


def test_options_take_python_booleans_and_keep_text_values():
    from accel.cli import parse_options

    assert parse_options(["mswmsa=False", "raunet=true", "shift=none", "windows=[2, 3]"]) == {
        "mswmsa": False,
        "raunet": True,
        "shift": "none",
        "windows": [2, 3],
    }


def test_options_take_python_literals_as_accels_own_messages_write_them():
    from accel.cli import parse_options

    # EditConfig's errors give examples such as ['circle'] and {'green': 2.0}: JSON refuses the single quotes.
    options = parse_options(["blend_words=['triangle']", "reweight={'green': 2.0}", "cell=(2, 4)", "seed=None"])
    assert options == {"blend_words": ["triangle"], "reweight": {"green": 2.0}, "cell": (2, 4), "seed": None}
    # What is neither JSON nor a Python literal stays text.
    assert parse_options([r"layers=.*attn1", "pooling=grid", "x=[1, 2"]) == {
        "layers": ".*attn1",
        "pooling": "grid",
        "x": "[1, 2",
    }


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("method=p2p", "--option method=p2p: method has its own flag; give --method p2p instead"),
        ("num_inference_steps=3", "num_inference_steps has its own flag; give --steps 3 instead"),
        ("guidance_scale=2", "guidance_scale has its own flag; give --guidance 2 instead"),
        ("config=x", "--option config: accel.EditConfig has no such field"),
        (
            "blend_wrds=['circle']",
            "--option blend_wrds: accel.EditConfig has no such field; did you mean 'blend_words'",
        ),
        ("blend_words=circle", "edit: blend_words='circle' must be a non-empty list of words"),
    ],
)
def test_edit_options_clashing_with_flags_or_unknown_fail_before_loading(capsys, monkeypatch, option, expected):
    import accel.compare

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(accel.compare, "load_pipeline_or_explain", no_loading)
    # accel.edit saw these keys twice ("got multiple values for keyword argument") after loading the model.
    argv = ["edit", "--model", "sd15-tiny", "--image", "x.png", "--source", "a", "--target", "b", "--option", option]
    code, err = run_cli(argv, capsys)
    assert code == 2 and expected in err


def test_compare_options_that_have_a_flag_name_it(capsys, monkeypatch):
    import accel.compare

    monkeypatch.setattr(accel.compare, "load_pipeline_or_explain", lambda *a, **k: pytest.fail("loaded"))
    code, err = run_cli(["compare", *TINY, "--option", "num_inference_steps=3"], capsys)
    assert code == 2 and "num_inference_steps has its own flag; give --steps 3 instead" in err
    code, err = run_cli(["compare", *TINY, "--option", "seed=3"], capsys)
    assert code == 2 and "seed has its own flag; give --seed 3 instead" in err
    # Where the method has an option of that name, it is the method's: agent's seed draws its random agents.
    from accel.cli import _refuse_options_with_flags

    _refuse_options_with_flags(["seed=3"], {"seed": "--seed"}, accepted=["seed"])


def test_edit_image_reaches_accel_edit_in_its_own_mode(tmp_path):
    import numpy as np
    from PIL import Image

    from accel.cli import _open_image

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    image = _open_image(str(tmp_path / "grey16.png"))
    assert image.mode.startswith("I")  # not clipped to 8-bit RGB before accel.edit scales it
