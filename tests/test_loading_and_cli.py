"""accel.load_pipeline and the `accel` command line."""

import json
import math
import subprocess
import sys

import pytest

import accel
from accel.cli import main


def test_unknown_builtin_name_suggests_the_closest():
    with pytest.raises(accel.PipelineNotFoundError, match="Did you mean 'sd15-tiny'"):
        accel.load_pipeline("sd15-tiyn")


def test_hub_id_without_local_weights_says_how_to_get_them():
    with pytest.raises(accel.PipelineNotFoundError, match="not on this machine.*hf download"):
        accel.load_pipeline("no-such-owner/no-such-model")


def test_local_folder_round_trip(tmp_path, tiny_pipelines):
    import torch

    pipe = tiny_pipelines["sd15-tiny"]
    pipe.save_pretrained(tmp_path)
    loaded = accel.load_pipeline(str(tmp_path))
    assert type(loaded) is type(pipe)
    original, reloaded = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert loaded.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids


def strict_json_loads(text: str):
    """``json.loads`` refusing the Infinity / NaN literals Python writes by default, which strict parsers reject."""

    def refuse(literal):
        raise ValueError(f"not strict JSON: {literal}")

    return json.loads(text, parse_constant=refuse)


def test_cli_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "FLUX.1" in out and "HunyuanVideo" in out


@pytest.mark.parametrize(
    ("model", "extension"), [("sd15-tiny", "png"), ("flux-tiny", "png"), ("hunyuanvideo-tiny", "mp4")]
)
def test_cli_compare_writes_outputs_and_prints_the_table(tmp_path, capsys, model, extension):
    assert main(["compare", "--model", model, "--steps", "2", "--threads", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "PSNR dB" in out and model in out
    result = strict_json_loads((tmp_path / "results.json").read_text())
    # "dense" is exact: the two sides are bit-identical, and strict JSON spells the infinite PSNR as a string.
    assert result["max_abs_diff"] == 0.0 and result["psnr_db"] == "inf" and float(result["psnr_db"]) == math.inf
    assert "PSNR dB" in out and " inf " in out  # the table prints it as before
    for label in ("unpatched", "patched"):
        path = tmp_path / f"{label}.{extension}"
        assert path.is_file() and path.stat().st_size > 0


def test_cli_rejects_a_bad_method_before_loading(capsys):
    assert main(["compare", "--model", "sd15-tiny", "--method", "fast"]) == 2
    assert "unknown method 'fast'; registered methods: agent, astar, dense" in capsys.readouterr().err
    assert main(["compare", "--model", "sd15-tiny", "--option", "window=8"]) == 2
    assert "no option 'window'" in capsys.readouterr().err
    assert main(["compare", "--model", "sd15-tinyy"]) == 2
    assert "Did you mean 'sd15-tiny'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "accel", "methods"], capture_output=True, text=True, check=True)
    assert "dense" in result.stdout


def test_compare_refuses_an_unsupported_method_before_generating(tiny_pipelines, monkeypatch):
    from accel.compare import compare

    pipe = tiny_pipelines["sd15-tiny"]
    calls = []
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: calls.append(k))
    # The families by the names users know them, and the methods that do fit the model.
    expected = (
        r"method 'gna' supports FLUX.1 and HunyuanVideo pipelines, not this one \(Stable Diffusion 1.x / 2.x, SDXL: "
        r"UNet2DConditionModel\); methods that support it: agent, astar, dense, hidiffusion, structured"
    )
    with pytest.raises(accel.UnsupportedModelError, match=expected):
        compare(pipe, "gna", {}, {"prompt": "a red circle", "num_inference_steps": 2})
    assert calls == [] and accel.get_patch(pipe) is None


def test_compare_refuses_an_already_patched_pipeline(tiny_pipelines):
    from accel.compare import compare

    pipe = tiny_pipelines["sd15-tiny"]
    with accel.patched(pipe, "agent"):
        with pytest.raises(accel.InvalidOptionError, match="already patched; call accel.unpatch"):
            compare(pipe, "dense", {}, {"prompt": "a red circle", "num_inference_steps": 2})
        assert accel.get_patch(pipe) is not None


def test_compare_dense_is_exact_and_records_the_run(tiny_pipelines, tmp_path):
    from accel.compare import compare

    pipe = tiny_pipelines["sd15-tiny"]
    call = {"prompt": "a red circle", "num_inference_steps": 2, "height": 64, "width": 64}
    # Dense output equals unpatched, so record which side each denoising step ran under: a compare whose "patched"
    # side forgot to patch would pass the equality below.
    patched_steps = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args: patched_steps.append(accel.get_patch(pipe) is not None)
    )
    try:
        run = compare(pipe, "dense", {}, call, model="sd15-tiny", seed=3, repeats=2, warmup=False)
    finally:
        hook.remove()
    assert patched_steps == [False, False, True, True] * 2
    assert run.plain.shape == (64, 64, 3) and run.max_abs_diff == 0.0
    summary = run.summary()
    assert summary["repeats"] == 2 and summary["call"] == {"num_inference_steps": 2, "height": 64, "width": 64}
    assert summary["output_size"] == {"height": 64, "width": 64}
    assert [p.rsplit("/", 1)[1] for p in run.save(tmp_path)] == ["unpatched.png", "patched.png"]
    assert accel.get_patch(pipe) is None


def test_results_record_the_size_made_when_the_pipeline_chose_it(tiny_pipelines):
    from accel.compare import compare

    # No size in the call: the pipeline's own default (the UNet's sample size), which the call does not name.
    pipe = tiny_pipelines["sd15-tiny"]
    run = compare(pipe, "dense", {}, {"prompt": "a red circle", "num_inference_steps": 1})
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert run.summary()["output_size"] == {"height": side, "width": side}
    video = compare(
        tiny_pipelines["hunyuanvideo-tiny"],
        "dense",
        {},
        {"prompt": "a cat", "num_inference_steps": 1, "num_frames": 5, "height": 32, "width": 48},
    )
    assert video.summary()["output_size"] == {"num_frames": 5, "height": 32, "width": 48}


def test_strict_json_spells_non_finite_numbers_as_strings():
    from accel.compare import strict_json

    text = strict_json({"psnr_db": math.inf, "rows": [{"a": -math.inf, "b": (math.nan, 1.5)}]})
    assert strict_json_loads(text) == {"psnr_db": "inf", "rows": [{"a": "-inf", "b": ["nan", 1.5]}]}


def test_outputs_path_is_printed_once_slashed(tmp_path, capsys):
    out = f"{tmp_path}/"
    assert main(["compare", "--model", "sd15-tiny", "--steps", "1", "--threads", "2", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert f"outputs in {tmp_path}/" in printed and "//" not in printed


def test_distributed_with_one_prompt_writes_the_combined_results(tmp_path):
    # One process without a launcher is a world of one; its folders are numbered like any --distributed run's.
    argv = ["--model", "sd15-tiny", "--steps", "1", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)]
    subprocess.run([sys.executable, "-m", "accel", "compare", "--distributed", *argv], check=True, capture_output=True)
    combined = strict_json_loads((tmp_path / "results.json").read_text())
    assert [r["prompt"] for r in combined] == ["a red circle and a blue square"]
    assert combined[0] == strict_json_loads((tmp_path / "000" / "results.json").read_text())
