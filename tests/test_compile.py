"""accel.patch, then torch.compile: the order accel's refusal of a compiled denoiser names must work for every method.

Dynamo's "aot_eager" backend traces, guards and runs AOTAutograd as inductor would, without inductor's code generation (minutes
on this CPU). Where accel decides in Python (the step hook, the controls' guidance, Triton launches) it runs eagerly,
as graph breaks; the dense path and A-STAR's denoiser calls compile without any other.
"""

import pytest
import torch
from helpers import generate

import accel

CASES = [
    ("sd15-tiny", "dense", {}),
    # a raunet_switch given by name makes RAU-Net act even at the tiny UNet's own training size
    ("sd15-tiny", "hidiffusion", {"raunet_switch": 1.0}),
    ("sd15-tiny", "agent", {}),
    ("sd15-tiny", "astar", {"tokens": ["circle", "square"]}),
    ("sd15-tiny", "structured", {}),
    ("flux-tiny", "dense", {}),
    ("flux-tiny", "gna", {}),
    ("flux-tiny", "astar", {"tokens": ["circle", "square"]}),
    ("flux-tiny", "structured", {}),
    ("hunyuanvideo-tiny", "dense", {}),
    ("hunyuanvideo-tiny", "vmoba", {}),
]
ONLY_ACCELS_OWN_BREAKS = {
    ("sd15-tiny", "dense"),
    ("sd15-tiny", "astar"),
    ("flux-tiny", "dense"),
    ("flux-tiny", "astar"),
    ("hunyuanvideo-tiny", "dense"),
}


def _denoiser_name(pipe) -> str:
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


@pytest.fixture
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize(("name", "method", "options"), CASES)
def test_a_patched_then_compiled_pipeline_matches_the_patched_one(tiny_pipelines, name, method, options, fresh_dynamo):
    pipeline = tiny_pipelines[name]
    accel.patch(pipeline, method, **options)
    patched = generate(pipeline, name, steps=2)
    attribute = _denoiser_name(pipeline)
    denoiser = getattr(pipeline, attribute)
    setattr(pipeline, attribute, torch.compile(denoiser, backend="aot_eager"))
    try:
        compiled = generate(pipeline, name, steps=2)
    finally:
        setattr(pipeline, attribute, denoiser)
        accel.unpatch(pipeline)
    assert fresh_dynamo["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(compiled, patched, atol=1e-5, rtol=0)
    if (name, method) in ONLY_ACCELS_OWN_BREAKS:
        reasons = [reason.splitlines()[0] for reason in fresh_dynamo["graph_break"]]
        assert reasons and all("torch.compiler.disable" in reason for reason in reasons), reasons


def test_unpatch_through_the_compiled_wrapper_restores_the_compiled_pipeline(tiny_pipelines, fresh_dynamo):
    pipe = tiny_pipelines["sd15-tiny"]
    unpatched = generate(pipe, "sd15-tiny", steps=2)
    accel.patch(pipe, "hidiffusion", raunet_switch=1.0)
    unet = pipe.unet
    pipe.unet = torch.compile(unet, backend="aot_eager")
    try:
        patched = generate(pipe, "sd15-tiny", steps=2)
        accel.unpatch(pipe)
        # The compiled graphs were traced through accel's processors and hooks; their guards must see them gone.
        after = generate(pipe, "sd15-tiny", steps=2)
    finally:
        pipe.unet = unet
        accel.unpatch(pipe)
    assert not torch.equal(torch.as_tensor(patched), torch.as_tensor(unpatched))
    torch.testing.assert_close(after, unpatched, atol=1e-5, rtol=0)


def test_the_triton_entry_points_run_eagerly_under_compile():
    from accel.kernels import block_sparse

    for entry in (block_sparse.block_sparse_attention, block_sparse.block_select_attention):
        assert getattr(entry, "_torchdynamo_disable", False), entry.__name__
