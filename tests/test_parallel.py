"""Beyond one process: diffusers' Ulysses context parallelism over gloo, and data-parallel `accel compare`.

Both run real `torchrun --nproc-per-node 2` launches on the CPU and compare with one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import accel
from accel.processors.dense import AttentionCall
from accel.processors.parallel import UnsupportedParallelismError, model_order, ulysses_group

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


@pytest.mark.parametrize("text_first", [True, False])
def test_model_order_undoes_the_rank_chunks(text_first):
    # Two ranks, each with 2 text and 3 visual tokens; after the exchange: rank 0's then rank 1's.
    call = AttentionCall(kind="joint", visual_tokens=3, text_tokens=2, text_first=text_first)
    local = ["t0", "t1", "v0", "v1", "v2"] if text_first else ["v0", "v1", "v2", "t0", "t1"]
    chunked = [f"{token}@{rank}" for rank in range(2) for token in local]
    ordered = [chunked[i] for i in model_order(call, 2, torch.device("cpu")).tolist()]
    text = ["t0@0", "t1@0", "t0@1", "t1@1"]
    visual = ["v0@0", "v1@0", "v2@0", "v0@1", "v1@1", "v2@1"]
    assert ordered == (text + visual if text_first else visual + text)


def test_ring_attention_is_refused_with_the_fix():
    from types import SimpleNamespace

    ring = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1))
    with pytest.raises(UnsupportedParallelismError, match="ulysses_degree"):
        ulysses_group(ring, "gna")
    assert ulysses_group(None, "gna") is None


def test_a_model_without_a_plan_is_refused(tiny_pipelines):
    with pytest.raises(accel.UnsupportedModelError, match="no context-parallel split plan"):
        accel.enable_context_parallel(tiny_pipelines["sd15-tiny"], None)


def test_unpatch_keeps_switches_made_while_patched(tiny_pipelines):
    pipe = tiny_pipelines["flux-tiny"]
    with accel.patched(pipe, "dense"):
        pipe.transformer.set_attention_backend("native")
    try:
        backends = {
            getattr(p._attention_backend, "value", p._attention_backend)
            for p in pipe.transformer.attn_processors.values()
        }
        assert backends == {"native"}
    finally:
        pipe.transformer.reset_attention_backend()


@pytest.fixture(scope="module")
def context_parallel_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    _torchrun(str(REPO / "tests" / "cp_worker.py"), "--out", str(out))
    return json.loads((out / "cp.json").read_text())


@pytest.mark.parametrize("model", ["flux-tiny", "hunyuanvideo-tiny"])
@pytest.mark.parametrize("method", ["unpatched", "dense", "gna", "agent", "vmoba"])
def test_context_parallel_equals_one_process(context_parallel_results, model, method):
    # Ulysses moves whole heads between ranks and every method runs per head, so two ranks compute what one does;
    # only the order of floating-point sums may differ.
    assert context_parallel_results[f"{model}/{method}"] < 1e-5
    assert context_parallel_results[f"{model}/spread"] > 1e-3


def test_data_parallel_compare_equals_one_process(tmp_path):
    prompts = ["a red circle", "a blue square", "a green star"]
    common = ["--model", "sd15-tiny", "--method", "agent", "--steps", "2", "--threads", "1", "--height", "64"]
    common += ["--width", "64"] + [arg for prompt in prompts for arg in ("--prompt", prompt)]
    single, shared = tmp_path / "single", tmp_path / "shared"
    subprocess.run(
        [sys.executable, "-m", "accel", "compare", *common, "--out", str(single)], check=True, capture_output=True
    )
    _torchrun("-m", "accel", "compare", "--distributed", *common, "--out", str(shared))
    combined = json.loads((shared / "results.json").read_text())
    assert [r["prompt"] for r in combined] == prompts
    assert sorted({r["process"] for r in combined}) == [0, 1]  # both processes took prompts
    from PIL import Image

    for index in range(len(prompts)):
        for side in ("unpatched", "patched"):
            mine = np.asarray(Image.open(shared / f"{index:03d}" / f"{side}.png"))
            reference = np.asarray(Image.open(single / f"{index:03d}" / f"{side}.png"))
            assert np.array_equal(mine, reference)


def test_enable_context_parallel_puts_a_patch_back_over_the_split_hooks(tiny_pipelines, monkeypatch):
    # accel's step hook must run before diffusers' split hooks (hooks registered later run first): a patch in
    # place is taken off while diffusers installs its hooks, then put back.
    pipe = tiny_pipelines["flux-tiny"]
    seen = []

    def fake_enable_parallelism(config, cp_plan):
        seen.append((accel.get_patch(pipe) is None, cp_plan is type(pipe.transformer)._cp_plan))

    monkeypatch.setattr(pipe.transformer, "enable_parallelism", fake_enable_parallelism, raising=False)
    accel.patch(pipe, "gna", kernel_size=5)
    try:
        accel.enable_context_parallel(pipe, object())
        assert seen == [(True, True)]
        handle = accel.get_patch(pipe)
        assert handle is not None and handle.configs[0].kernel_size == 5
    finally:
        accel.unpatch(pipe)
