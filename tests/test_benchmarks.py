"""The benchmarks' --quick modes, as CI runs them: each writes JSON naming its device, baseline and versions, and
a plot. Numbers are not asserted here (speed belongs in benchmarks/results), only what they must be made of."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _refuse_non_strict_json(literal: str):
    raise AssertionError(f"results.json holds {literal}, which strict JSON parsers refuse")


def _run(script: str, *args: str, out: Path) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / script), *args, "--threads", "2", "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((out / "results.json").read_text(), parse_constant=_refuse_non_strict_json)
    assert result["device"].startswith(("cpu", "NVIDIA"))
    assert {"torch", "diffusers", "accel"} <= set(result["versions"])
    assert result["baseline"]
    return result


def test_attention_sweep_quick(tmp_path):
    result = _run("attention.py", "sweep", "--quick", out=tmp_path)
    methods = {"gna", "vmoba", "agent", "mswmsa"}
    assert {r["method"] for r in result["rows"]} == methods
    assert sorted({r["tokens"] for r in result["rows"]}) == [1024, 2025, 4096]
    for row in result["rows"]:
        assert 0 < row["density"] <= 1 and row["speed_of_light"] == pytest.approx(1 / row["density"])
        assert row["speedup"] > 0 and row["share_of_speed_of_light"] == pytest.approx(row["speedup"] * row["density"])
    # 2x2 windows keep a quarter of the pairs; about N/16 agents cost 2 x 1/16 of dense attention.
    assert all(r["density"] == 0.25 for r in result["rows"] if r["method"] == "mswmsa")
    assert all(r["density"] == pytest.approx(1 / 8, rel=0.1) for r in result["rows"] if r["method"] == "agent")
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_compile_quick(tmp_path):
    result = _run("compile.py", "--quick", "--models", "sd15-tiny", "--methods", "hidiffusion", out=tmp_path)
    assert [r["method"] for r in result["rows"]] == ["unpatched", "hidiffusion"]
    unpatched, patched = result["rows"]
    # The unpatched UNet compiles whole; the patched one breaks only at accel's step hook, before its body.
    assert (unpatched["graphs"], unpatched["graph_breaks"]) == (1, 0)
    assert patched["graphs"] >= 1 and patched["graph_breaks"] >= 1
    for row in result["rows"]:
        assert row["finite"] and row["max_abs_drift"] < 1e-4
        assert row["compiled_speedup"] == pytest.approx(unpatched["eager_s"] / row["compiled_s"])
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_pipeline_quick(tmp_path):
    result = _run("pipeline.py", "--quick", out=tmp_path)
    sides = {(r["model"], r["side"]) for r in result["rows"]}
    expected = {("sd15-tiny", "agent"), ("sd15-tiny", "hidiffusion")}
    expected |= {(model, m) for model in ("flux-tiny", "hunyuanvideo-tiny") for m in ("gna", "agent", "vmoba")}
    assert expected <= sides
    # Peers run where installed (not in CI's required path) and are labelled as peers.
    has_tomesd = importlib.util.find_spec("tomesd") is not None
    assert (("sd15-tiny", "tomesd") in sides) == has_tomesd
    assert all(r["kind"] == "peer" for r in result["rows"] if r["side"] in ("tomesd", "hidiffusion package"))
    for row in result["rows"]:
        assert row["speedup"] == pytest.approx(row["unpatched_s"] / row["seconds"])
        assert float(row["psnr_db"]) > 20  # "inf" where exact
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_quality_quick(tmp_path):
    result = _run("quality.py", "--quick", "--method", "dense", "agent", out=tmp_path)
    assert len(result["images"]) == 4  # 2 prompts x 1 image x 2 scales
    entry = result["summary"]["1x"]["all"]
    assert set(entry) >= {"images", "unpatched", "dense", "agent", "fidelity"}
    # "dense" is exact: the patched images equal the unpatched ones; agent attention is not.
    assert entry["fidelity"]["dense"]["ssim"] == pytest.approx(1.0)
    assert entry["fidelity"]["agent"]["ssim"] < 1.0
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "quality.png").stat().st_size > 0


def test_editing_quick(tmp_path):
    result = _run("editing.py", "--quick", out=tmp_path)
    assert set(result["summary"]) == {"p2p", "dpl"}
    assert all(len(rows) == 2 for rows in result["rows"].values())
    for rows in result["rows"].values():
        # The recoloured object changes more than the rest of the image (an edit that changed nothing would not).
        assert all(row["inside"] > row["outside"] + 1 for row in rows)
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "editing.png").stat().st_size > 0


def test_controls_cost_quick(tmp_path):
    result = _run("controls_cost.py", "--quick", out=tmp_path)
    (row,) = result["rows"]
    assert row["model"] == "sd15-tiny" and row["size"] == 256
    # Stopping early changes no number of the update and keeps less of the graph (16 x 16 of the 32 x 32 latent is
    # read, so the top up block never runs).
    assert row["latent_max_abs_difference"] == 0
    peaks = row["peak_bytes_one_step"]
    assert peaks["astar, stopping early"] < peaks["astar, whole passes"]
    assert (tmp_path / "controls-cost.png").stat().st_size > 0


def test_controls_cost_edit_quick(tmp_path):
    result = _run("controls_cost.py", "--quick", "--edit", out=tmp_path)
    (row,) = result["rows"]
    assert row["model"] == "sd15-tiny" and row["size"] == 256
    # DPL's learning passes stopped after the read level (16 x 16 of the 32 x 32 latent) learn the same tokens.
    assert row["image_max_abs_difference"] == 0
    assert set(row["learning_seconds"]) == {"dpl, whole passes", "dpl, stopping early"}
    assert (tmp_path / "controls-cost-dpl.png").stat().st_size > 0


@pytest.fixture
def benchmark_modules(monkeypatch):
    """The benchmarks' own modules importable as the scripts import them (from their folder)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))


def test_a_single_timed_call_follows_a_warm_up_call(benchmark_modules):
    from common import timed_generation

    calls = []

    def call(output_type):
        calls.append(output_type)
        return [[0.0]]

    # Timed cold, the first side on a freshly loaded pipeline was charged its one-time costs.
    timed_generation(call, repeats=1)
    assert calls == ["np", "np"]


def test_hidiffusion_peer_warms_up_before_timing(benchmark_modules):
    import hidiffusion_peer

    calls = []
    _, result = hidiffusion_peer._median(lambda: calls.append(1) or len(calls), repeats=1)
    assert calls == [1, 1] and result == 2


@pytest.mark.parametrize(
    ("script", "package", "arguments", "install"),
    [
        ("hidiffusion_peer.py", "hidiffusion", ["--models", "sd15-tiny", "--sizes", "64"], "hidiffusion==0.1.10"),
        ("quality.py", "tomesd", ["--method", "agent", "tomesd"], "tomesd"),
    ],
)
def test_a_missing_peer_package_is_named_with_its_install_before_anything_runs(
    tmp_path, script, package, arguments, install
):
    # Setting the module to None makes its import fail as if it were not installed.
    argv = [script, *arguments, "--out", str(tmp_path)]
    code = (
        f"import runpy, sys; sys.modules[{package!r}] = None; sys.path.insert(0, 'benchmarks'); "
        f"sys.argv = {argv!r}; runpy.run_path('benchmarks/{script}', run_name='__main__')"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert completed.returncode != 0 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().endswith(f"install it: pip install {install}")
    assert not (tmp_path / "results.json").exists()
