"""The "dense" method reproduces diffusers exactly, and unpatch restores the model bit for bit."""

import contextlib

import numpy as np
import pytest
import torch
from helpers import generate, model_fingerprint

import accel
from accel.pipelines.families import detect_family
from accel.processors.dense import DenseAttentionProcessorBase

TINY = ("sd15-tiny", "sdxl-tiny", "flux-tiny", "hunyuanvideo-tiny")


def denoiser_of(pipe):
    return pipe.unet if "unet" in pipe.components else pipe.transformer


@pytest.mark.parametrize("pipeline", TINY, indirect=True)
def test_dense_matches_unpatched_and_unpatch_is_bit_identical(pipeline, request):
    name = request.node.callspec.params["pipeline"]
    model = denoiser_of(pipeline)
    # Fingerprint after one plain generation: diffusers' own cache_context leaves a hook registry on FLUX / HunyuanVideo.
    reference = generate(pipeline, name)
    before = model_fingerprint(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    handle = accel.patch(pipeline, "dense")
    assert handle.layers and set(handle.layers.values()) == {"dense"}
    patched = generate(pipeline, name)
    processors = [p for p in model.attn_processors.values() if isinstance(p, DenseAttentionProcessorBase)]
    assert len(processors) == len(handle.layers)
    assert np.abs(patched - reference).max() <= 1e-5

    accel.unpatch(pipeline)
    restored = generate(pipeline, name)
    assert np.array_equal(restored, reference)
    assert model_fingerprint(model) == before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


@pytest.mark.parametrize("pipeline", TINY, indirect=True)
def test_dense_matches_every_attention_layer(pipeline, request):
    """Per-layer fp32 check: each attention module's output under "dense" is within 1e-5 of diffusers'."""
    name = request.node.callspec.params["pipeline"]
    model = denoiser_of(pipeline)
    family = detect_family(model)
    site_names = [site.name for site in family.attention_sites(model)]
    modules = dict(model.named_modules())

    def record(store):
        handles = []
        for site in site_names:

            def hook(module, args, output, site=site):
                outputs = output if isinstance(output, tuple) else (output,)
                store.setdefault(site, []).append([o.detach().clone() for o in outputs if o is not None])

            handles.append(modules[site].register_forward_hook(hook))
        return handles

    plain, dense = {}, {}
    handles = record(plain)
    generate(pipeline, name, steps=1)
    for h in handles:
        h.remove()
    accel.patch(pipeline, "dense")
    handles = record(dense)
    generate(pipeline, name, steps=1)
    for h in handles:
        h.remove()

    assert plain.keys() == dense.keys() == set(site_names)
    for site in site_names:
        for calls_plain, calls_dense in zip(plain[site], dense[site], strict=True):
            for a, b in zip(calls_plain, calls_dense, strict=True):
                assert (a - b).abs().max() <= 1e-5, site


def test_hunyuanvideo_token_refiner_is_not_patched(tiny_pipelines):
    pipe = tiny_pipelines["hunyuanvideo-tiny"]
    try:
        handle = accel.patch(pipe, "dense")
        processors = pipe.transformer.attn_processors
        refiner = [k for k in processors if k.startswith("context_embedder.token_refiner")]
        assert refiner, "the tiny model must have a token refiner for this test to mean anything"
        assert not any(isinstance(processors[k], DenseAttentionProcessorBase) for k in refiner)
        assert all(name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks") for name in handle.layers)
    finally:
        accel.unpatch(pipe)


@pytest.mark.parametrize("name", ["sd15-tiny", "flux-tiny"])
def test_dense_uses_fused_projections(name):
    pipe = accel.load_pipeline(name)
    model = denoiser_of(pipe)
    model.fuse_qkv_projections()
    fused_modules = [m for m in model.modules() if getattr(m, "fused_projections", False)]
    assert fused_modules
    reference = generate(pipe, name)
    # Poison the unfused weights: if the processor read them instead of the fused ones, the output would change.
    with torch.no_grad():
        for module in fused_modules:
            cross = getattr(module, "is_cross_attention", False)
            projections = (
                ("to_k", "to_v") if cross else ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
            )
            for proj in projections:
                if getattr(module, proj, None) is not None:
                    getattr(module, proj).weight.fill_(float("nan"))
    accel.patch(pipe, "dense")
    patched = generate(pipe, name)
    assert np.abs(patched - reference).max() <= 1e-5


def test_dense_keeps_the_attention_backend_set_on_the_model(tiny_pipelines):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    pipe = tiny_pipelines["flux-tiny"]
    saved_global = _AttentionBackendRegistry._active_backend
    try:
        reference = generate(pipe, "flux-tiny")
        pipe.transformer.set_attention_backend("_native_math")
        accel.patch(pipe, "dense")
        processors = [
            p for p in pipe.transformer.attn_processors.values() if isinstance(p, DenseAttentionProcessorBase)
        ]
        assert processors and all(p._attention_backend == "_native_math" for p in processors)
        assert np.abs(generate(pipe, "flux-tiny") - reference).max() <= 1e-5
        accel.unpatch(pipe)
        assert all(p._attention_backend == "_native_math" for p in pipe.transformer.attn_processors.values())
    finally:
        accel.unpatch(pipe)
        pipe.transformer.reset_attention_backend()
        # diffusers' set_attention_backend also changes a global that reset_attention_backend leaves alone.
        _AttentionBackendRegistry._active_backend = saved_global


# Methods that split HunyuanVideo's joint attention into visual and text parts; each must keep the padded text keys
# masked. Their exact shortcuts (agent_ratio=1, threshold=1, a whole-grid window) are avoided on purpose.
JOINT_METHODS = {
    "unpatched": None,
    "dense": ("dense", {}),
    "agent": ("agent", {"agent_steps": 1.0}),
    "vmoba": ("vmoba", {"threshold": 0.5, "blocks": [(1, 4, 4)]}),
    "gna": ("gna", {"kernel_size": (2, 5, 5), "stride": 1, "backend": "torch"}),
}


@pytest.mark.parametrize("method", JOINT_METHODS)
def test_padded_text_tokens_do_not_reach_the_output(tiny_pipelines, method):
    pipe = tiny_pipelines["hunyuanvideo-tiny"]
    noise = torch.Generator().manual_seed(1)

    def scramble_padding(module, args, kwargs):
        mask = kwargs["encoder_attention_mask"].bool()
        assert not mask.all(), "the prompt must leave padded text tokens for this test to mean anything"
        text = kwargs["encoder_hidden_states"].clone()
        text[~mask] = 10 * torch.randn(text[~mask].shape, generator=noise).to(text)
        return args, {**kwargs, "encoder_hidden_states": text}

    spec = JOINT_METHODS[method]
    with accel.patched(pipe, spec[0], **spec[1]) if spec else contextlib.nullcontext():
        clean = generate(pipe, "hunyuanvideo-tiny")
        hook = pipe.transformer.register_forward_pre_hook(scramble_padding, with_kwargs=True)
        try:
            scrambled = generate(pipe, "hunyuanvideo-tiny")
        finally:
            hook.remove()
    assert np.abs(scrambled - clean).max() <= 1e-5
