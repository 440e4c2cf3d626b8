"""accel.patch, then torch.compile: the order accel's refusal of a compiled denoiser names must work for every method.

Dynamo's "aot_eager" backend traces, guards and runs AOTAutograd as inductor would, without inductor's code generation (minutes
on this CPU). What accel decides in Python per call runs eagerly before the denoiser's body (the step hook, the
controls' guidance), as graph breaks of its own; per-step facts (RAU-Net's stage, MSW-MSA's shifts, the agent phase and
its random destinations) are prepared there, and GNA's and VMoBA's attention, planned in Python from data, is one
opaque operator per layer. So every method compiles the denoiser's body to one graph per phase.
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
    ("flux-tiny", "agent", {}),
    ("flux-tiny", "astar", {"tokens": ["circle", "square"]}),
    ("flux-tiny", "structured", {}),
    ("hunyuanvideo-tiny", "dense", {}),
    ("hunyuanvideo-tiny", "vmoba", {}),
]
# Where the tiny default size is one VMoBA block (dense), a size that makes the layers sparse.
SIZES = {("hunyuanvideo-tiny", "vmoba"): {"height": 384, "width": 384}}


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
    size = SIZES.get((name, method), {})
    patched = generate(pipeline, name, steps=2, **size)
    attribute = _denoiser_name(pipeline)
    denoiser = getattr(pipeline, attribute)
    setattr(pipeline, attribute, torch.compile(denoiser, backend="aot_eager"))
    try:
        compiled = generate(pipeline, name, steps=2, **size)
    finally:
        setattr(pipeline, attribute, denoiser)
        accel.unpatch(pipeline)
    assert fresh_dynamo["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(compiled, patched, atol=1e-5, rtol=0)
    # The denoiser's body compiles whole (one graph per phase): only the hooks' eager parts before it break the
    # graph (the step hook; A-STAR's guided passes; FLUX structured guidance's prompt match), never a layer.
    reasons = [reason.splitlines()[0] for reason in fresh_dynamo["graph_break"]]
    assert reasons and all("torch.compiler.disable" in reason for reason in reasons), reasons
    inside = [reason for reason in fresh_dynamo["graph_break"] if "Hook." not in reason]
    assert not inside, inside


@pytest.mark.parametrize(
    ("method", "options"),
    [
        # RAU-Net's stage changes at half the schedule; MSW-MSA's shifts change at every step.
        ("hidiffusion", {"raunet_switch": 0.5}),
        # The agent phase changes at half the schedule; the merge's random destinations change at every step.
        ("agent", {"agent_steps": 0.5}),
    ],
)
def test_per_step_settings_compile_once_per_phase_not_once_per_step(tiny_pipelines, method, options, fresh_dynamo):
    # A value read from the step inside the graph would be a guard: a new graph at every step, until Dynamo's
    # recompile limit (8) sends the denoiser back to eager.
    pipe = tiny_pipelines["sd15-tiny"]
    accel.patch(pipe, method, **options)
    unet = pipe.unet
    pipe.unet = torch.compile(unet, backend="eager")
    try:
        generate(pipe, "sd15-tiny", steps=6)
    finally:
        pipe.unet = unet
        accel.unpatch(pipe)
    assert fresh_dynamo["stats"]["unique_graphs"] == 2


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


@pytest.mark.parametrize(("name", "method", "options"), [("sd15-tiny", "hidiffusion", {}), CASES[3], CASES[9]])
def test_fullgraph_compile_names_the_fix(tiny_pipelines, name, method, options, fresh_dynamo):
    # Diffusers' docs compile the UNet with fullgraph=True; Dynamo's own hint at accel's eager hooks is to remove
    # torch.compiler.disable, which is not the fix, so the error must carry accel's reason.
    pipe = tiny_pipelines[name]
    accel.patch(pipe, method, **options)
    attribute = _denoiser_name(pipe)
    denoiser = getattr(pipe, attribute)
    setattr(pipe, attribute, torch.compile(denoiser, backend="aot_eager", fullgraph=True))
    try:
        with pytest.raises(torch._dynamo.exc.Unsupported, match="without fullgraph=True"):
            generate(pipe, name, steps=1)
    finally:
        setattr(pipe, attribute, denoiser)
        accel.unpatch(pipe)


def test_every_eager_hook_gives_the_fullgraph_fix():
    from accel.pipelines.controls import LatentGuidanceHook
    from accel.pipelines.hooks import EAGER_HOOK_REASON, StepStateHook
    from accel.pipelines.structured import StructuredTextHook

    # The step hook comes first in a call, so the end-to-end test above meets only its reason.
    for eager in (StepStateHook.pre_forward, LatentGuidanceHook._guided_inputs, StructuredTextHook.pre_forward):
        assert getattr(eager, "_torchdynamo_disable_msg", None) == EAGER_HOOK_REASON, eager.__qualname__


def test_the_triton_entry_points_run_eagerly_under_compile():
    from accel.kernels import block_sparse

    for entry in (block_sparse.block_sparse_attention, block_sparse.block_select_attention):
        assert getattr(entry, "_torchdynamo_disable", False), entry.__name__


@pytest.mark.parametrize(("name", "method"), [("flux-tiny", "gna"), ("hunyuanvideo-tiny", "vmoba")])
def test_sparse_attention_is_one_operator_per_layer_in_the_graph(tiny_pipelines, name, method, fresh_dynamo):
    # GNA and VMoBA plan their attention in Python from data: the graph calls each layer's as one opaque operator
    # (which runs it eagerly), rather than breaking at every layer, whose frames Dynamo would compile once per layer
    # and, past its recompile limit (8), leave eager on real models with dozens of layers.
    pipeline = tiny_pipelines[name]
    accel.patch(pipeline, method)
    transformer = pipeline.transformer
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    from accel.processors.joint import JointVisualAttend

    layers = sum(isinstance(p, JointVisualAttend) for p in transformer.attn_processors.values())
    pipeline.transformer = torch.compile(transformer, backend=recording_backend)
    try:
        generate(pipeline, name, steps=2, **SIZES.get((name, method), {}))
    finally:
        pipeline.transformer = transformer
        accel.unpatch(pipeline)
    assert len(graphs) == 1
    calls = [
        node
        for node in graphs[0].graph.nodes
        if node.target in (torch.ops.accel.joint_attention, torch.ops.accel.joint_attention.default)
    ]
    assert len(calls) == layers
