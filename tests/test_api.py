"""The public surface: patch / unpatch / patched, configs, the registry, and clear errors that leave models untouched."""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from helpers import generate, model_fingerprint

import accel
from accel.processors.dense import DenseAttnProcessor


@pytest.fixture
def sd(tiny_pipelines):
    pipe = tiny_pipelines["sd15-tiny"]
    yield pipe
    accel.unpatch(pipe)


def test_methods_lists_dense_with_its_families():
    listing = {m.name: m for m in accel.methods()}
    assert listing["dense"].families == ("unet", "flux", "hunyuanvideo")
    assert listing["dense"].config_class is accel.DenseConfig


def test_patch_accepts_the_denoiser_and_unpatch_accepts_either(sd):
    before = model_fingerprint(sd.unet)
    handle = accel.patch(sd.unet, "dense")
    assert accel.get_patch(sd) is handle
    accel.unpatch(sd)
    assert not handle.active and accel.get_patch(sd.unet) is None
    assert model_fingerprint(sd.unet) == before


def test_patching_twice_replaces_and_one_unpatch_restores(sd):
    before = model_fingerprint(sd.unet)
    first = accel.patch(sd, "dense", layers=r".*attn1")
    second = accel.patch(sd, accel.DenseConfig(layers=r".*attn2"))
    assert not first.active and second.active
    kinds = {name.rsplit(".", 1)[-1] for name in second.layers}
    assert kinds == {"attn2"}
    # attn1 layers are back to diffusers' own processors, not wrapped twice.
    assert not any(isinstance(p, DenseAttnProcessor) for k, p in sd.unet.attn_processors.items() if "attn1" in k)
    accel.unpatch(sd)
    assert model_fingerprint(sd.unet) == before


@pytest.mark.parametrize("method", ["dense", "astar", "hidiffusion"])
def test_unpatch_keeps_an_accelerate_hook_added_after_patch(sd, method):
    # enable_model_cpu_offload() after accel.patch: accelerate wraps the forward accel's hooks pinned.
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    reference = generate(sd, "sd15-tiny")
    before = model_fingerprint(sd.unet)
    accel.patch(sd, method)
    add_hook_to_module(sd.unet, Counting())
    try:
        accel.unpatch(sd)
        Counting.calls = 0
        assert np.array_equal(generate(sd, "sd15-tiny"), reference)
        assert Counting.calls == 2 and not hasattr(sd.unet, "_diffusers_hook")
    finally:
        remove_hook_from_module(sd.unet)
        vars(sd.unet).pop("forward", None)  # accelerate pins the forward it restores
    assert np.array_equal(generate(sd, "sd15-tiny"), reference)
    assert model_fingerprint(sd.unet) == before


def test_a_block_on_the_denoiser_restores_a_patch_made_on_the_pipeline(sd):
    accel.patch(sd, "astar")  # A-STAR needs the pipeline (it wraps encode_prompt and the scheduler step)
    guided = generate(sd, "sd15-tiny")
    with accel.patched(sd.unet, "dense"):
        pass
    handle = accel.get_patch(sd)
    assert handle is not None and [c.name for c in handle.configs] == ["astar"]
    assert np.array_equal(generate(sd, "sd15-tiny"), guided)


def test_handle_and_context_manager_restore(sd):
    before = model_fingerprint(sd.unet)
    with accel.patch(sd) as handle:
        assert handle.configs == (accel.DenseConfig(),)
    assert model_fingerprint(sd.unet) == before
    handle.remove()  # idempotent

    outer = accel.patch(sd, "dense", layers=r".*attn1")
    with accel.patched(sd, "dense", layers=r".*attn2") as inner:
        assert not outer.active and inner.active
    restored = accel.get_patch(sd)
    assert restored is not None and restored.configs == outer.configs
    accel.unpatch(sd)
    assert model_fingerprint(sd.unet) == before


def test_nested_blocks_each_restore_what_they_found(sd):
    before = model_fingerprint(sd.unet)
    plain = generate(sd, "sd15-tiny")
    with accel.patched(sd, "agent", agent_ratio=1 / 4):
        agent_output = generate(sd, "sd15-tiny")
        with accel.patched(sd, "dense", layers=r".*attn2"):
            pass
        # The inner block brought the agent patch back under a new handle; the outer block's exit removes it too.
        assert np.array_equal(generate(sd, "sd15-tiny"), agent_output)
    assert accel.get_patch(sd) is None and model_fingerprint(sd.unet) == before
    assert np.array_equal(generate(sd, "sd15-tiny"), plain)
    with accel.patched(sd, "agent", agent_ratio=1 / 4):
        with accel.patch(sd, "dense"):
            pass
    assert accel.get_patch(sd) is None and model_fingerprint(sd.unet) == before


def test_unpatch_on_a_never_patched_model_is_a_no_op(sd):
    before = model_fingerprint(sd.unet)
    accel.unpatch(sd)
    accel.unpatch(sd.unet)
    assert model_fingerprint(sd.unet) == before


def test_layers_option_narrows_the_patch(sd):
    handle = accel.patch(sd, "dense", layers=r"up_blocks\..*attn1")
    assert handle.layers and all(n.startswith("up_blocks.") and n.endswith("attn1") for n in handle.layers)
    patched = {k for k, p in sd.unet.attn_processors.items() if isinstance(p, DenseAttnProcessor)}
    assert patched == {f"{n}.processor" for n in handle.layers}


def test_config_round_trips_through_dict():
    config = accel.DenseConfig(layers=r".*attn1")
    data = config.to_dict()
    assert data == {"method": "dense", "layers": r".*attn1", "version": 1}
    assert accel.DenseConfig.from_dict(data) == config
    # Configs whose options depend on each other round-trip too: only what differs from the defaults is written.
    for config in (
        accel.HiDiffusionConfig(mswmsa=False),
        accel.AStarConfig(loss="attend_excite"),
        accel.StructuredConfig(noun_phrases=["a red circle"]),
    ):
        assert type(config).from_dict(config.to_dict()) == config
    with pytest.raises(accel.InvalidOptionError, match="for method 'dense', not 'astar'"):
        accel.AStarConfig.from_dict(data)
    edit = accel.EditConfig(method="p2p")
    assert accel.EditConfig(**edit.to_dict()) == edit
    # Through JSON, where tuples come back as lists.
    gna = accel.GNAConfig(kernel_size=(3, 5), per_layer={r"transformer_blocks\.0\..*": {"kernel_size": (5, 5)}})
    assert accel.GNAConfig.from_dict(json.loads(json.dumps(gna.to_dict()))) == gna


def test_replace_keeps_options_set_by_assignment():
    config = accel.HiDiffusionConfig()
    config.shift_seed, config.raunet_switch = 5, 0.3
    replaced = config.replace(windows=4)
    assert (replaced.shift_seed, replaced.raunet_switch, replaced.windows) == (5, 0.3, (4, 4))
    assert accel.HiDiffusionConfig().replace(window_size=8).window_size == (8, 8)  # no conflict with windows


@pytest.mark.parametrize(
    ("target", "words"),
    [
        (42, ["int", "pipeline"]),
        (torch.nn.Linear(2, 2), ["Linear", "UNet2DConditionModel", "FluxTransformer2DModel"]),
    ],
)
def test_unsupported_targets_are_refused(target, words):
    with pytest.raises(accel.UnsupportedModelError) as error:
        accel.patch(target)
    assert all(w in str(error.value) for w in words)


def test_a_compiled_denoiser_is_refused_with_the_order_that_works(sd):
    compiled = torch.compile(sd.unet)  # wrapping only; nothing is traced until it is called
    with pytest.raises(
        accel.UnsupportedModelError, match=r"wrapper around a UNet2DConditionModel; patch before compiling"
    ):
        accel.patch(compiled, "dense")


def test_unsupported_pipeline_family_is_refused():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())

    def processors():
        return {name: id(m.processor) for name, m in unet.named_modules() if hasattr(m, "processor")}

    before = processors()
    assert before
    with pytest.raises(accel.UnsupportedModelError, match="UNet2DModel.*supported denoisers"):
        accel.patch(pipe)
    assert processors() == before


@pytest.mark.parametrize(
    ("method", "options", "error", "words"),
    [
        ("dens", {}, accel.UnknownMethodError, ["'dens'", "dense", "Did you mean"]),
        ("dense", {"layer": ".*"}, accel.InvalidOptionError, ["no option 'layer'", "layers", "Did you mean"]),
        ("dense", {"layers": 5}, accel.InvalidOptionError, ["regex string"]),
        ("dense", {"layers": "attn1("}, accel.InvalidOptionError, ["not a valid regex"]),
        ("dense", {"layers": "attn1"}, accel.InvalidOptionError, ["matches none", "whole name"]),
        (["dense", "dense"], {}, accel.InvalidOptionError, ["twice"]),
        (["dense"], {"layers": ".*"}, accel.InvalidOptionError, ["ambiguous"]),
        ([], {}, accel.InvalidOptionError, ["empty"]),
        (3.5, {}, accel.InvalidOptionError, ["method name"]),
    ],
)
def test_bad_methods_and_options_leave_the_model_untouched(sd, method, options, error, words):
    previous = accel.patch(sd, "dense", layers=r".*attn2")
    before = model_fingerprint(sd.unet)
    with pytest.raises(error) as raised:
        accel.patch(sd, method, **options)
    assert all(w in str(raised.value) for w in words), str(raised.value)
    assert model_fingerprint(sd.unet) == before
    assert previous.active


def test_a_re_patch_that_fails_while_installing_keeps_the_earlier_patch(sd, monkeypatch):
    import accel.api as api

    accel.patch(sd, "agent")
    agent_output = generate(sd, "sd15-tiny")
    installed = api.install_hook

    def failing(module, hook, name):
        if name != api.STEP_HOOK_NAME:
            raise RuntimeError("hook registry refused")
        return installed(module, hook, name)

    monkeypatch.setattr(api, "install_hook", failing)
    with pytest.raises(RuntimeError, match="hook registry refused"):
        accel.patch(sd, "astar")  # astar adds its guidance hook after the step hook
    monkeypatch.setattr(api, "install_hook", installed)
    handle = accel.get_patch(sd)
    assert handle is not None and [c.name for c in handle.configs] == ["agent"]
    assert np.array_equal(generate(sd, "sd15-tiny"), agent_output)


def test_a_foreign_processor_is_never_silently_replaced(sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class UserProcessor(AttnProcessor2_0):
        pass

    key = next(k for k in sd.unet.attn_processors if k.endswith("attn1.processor"))
    processors = dict(sd.unet.attn_processors)
    original = processors[key]
    processors[key] = UserProcessor()
    sd.unet.set_attn_processor(processors)
    try:
        before = model_fingerprint(sd.unet)
        with pytest.raises(accel.PatchConflictError, match="UserProcessor"):
            accel.patch(sd, "dense")
        assert model_fingerprint(sd.unet) == before
        # Excluding that layer is the documented way around it.
        layer = key.removesuffix(".processor").replace(".", r"\.")
        handle = accel.patch(sd, "dense", layers=rf"(?!{layer}$).*")
        assert key.removesuffix(".processor") not in handle.layers
    finally:
        accel.unpatch(sd)
        processors = dict(sd.unet.attn_processors)
        processors[key] = original
        sd.unet.set_attn_processor(processors)


def test_attention_slicing_is_refused_with_the_switch_that_turns_it_off(sd):
    processors = dict(sd.unet.attn_processors)
    sd.enable_attention_slicing()
    try:
        with pytest.raises(
            accel.PatchConflictError, match=r"turn it off first \(pipe.disable_attention_slicing\(\)\)"
        ):
            accel.patch(sd, "dense")
    finally:
        sd.unet.set_attn_processor(processors)


@dataclass(kw_only=True)
class _TaggedConfig(accel.MethodConfig):
    """Test-only method: dense attention that counts its calls."""

    name: ClassVar[str] = "test-tagged"
    scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.scale <= 0:
            raise accel.InvalidOptionError(f"scale must be > 0, got {self.scale}")


class _CountingProcessor(DenseAttnProcessor):
    def __init__(self, context, layer, counter):
        super().__init__(context=context, layer=layer)
        self.counter = counter

    def attend(self, query, key, value, attention_mask, call):
        self.counter[self.layer] = self.counter.get(self.layer, 0) + 1
        return super().attend(query, key, value, attention_mask, call)


@pytest.fixture
def tagged_method():
    counter = {}

    @accel.register_method(_TaggedConfig, families=("unet",))
    def apply_tagged(plan, config):
        for site in plan.select(config, kinds=("cross",)):
            plan.set_processor(site, _CountingProcessor(plan.context, site.name, counter))

    yield counter
    accel.unregister_method("test-tagged")


def test_third_party_methods_register_and_compose(sd, tagged_method):
    assert "test-tagged" in {m.name for m in accel.methods()}
    with pytest.raises(accel.InvalidOptionError, match="scale must be > 0"):
        accel.patch(sd, "test-tagged", scale=-1.0)
    handle = accel.patch(sd, [accel.DenseConfig(layers=r".*attn1"), _TaggedConfig()])
    assert set(handle.layers.values()) == {"dense", "test-tagged"}
    generate(sd, "sd15-tiny", steps=1)
    cross_layers = {n for n, owner in handle.layers.items() if owner == "test-tagged"}
    assert set(tagged_method) == cross_layers
    with pytest.raises(accel.PatchConflictError, match="both replace"):
        accel.patch(sd, [accel.DenseConfig(), _TaggedConfig()])
    assert handle.active


def test_method_refuses_families_it_does_not_support(tiny_pipelines, tagged_method):
    pipe = tiny_pipelines["flux-tiny"]
    with pytest.raises(
        accel.UnsupportedModelError,
        match=r"supports Stable Diffusion 1.x / 2.x, SDXL pipelines, not this one \(FLUX.1",
    ):
        accel.patch(pipe, "test-tagged")
    assert accel.get_patch(pipe) is None


def test_two_pipelines_patched_differently_do_not_share_state(tiny_pipelines):
    first = tiny_pipelines["sd15-tiny"]
    second = accel.load_pipeline("sd15-tiny", seed=1)
    try:
        handle_a = accel.patch(first, "dense", layers=r".*attn1")
        handle_b = accel.patch(second, "dense", layers=r".*attn2")
        assert handle_a.context is not handle_b.context
        reference_a = generate(first, "sd15-tiny", height=64, width=64)
        generate(second, "sd15-tiny", height=32, width=32)
        assert handle_a.context.layout.grid == (8, 8)
        assert handle_b.context.layout.grid == (4, 4)
        accel.unpatch(second)
        assert handle_a.active
        assert np.array_equal(generate(first, "sd15-tiny", height=64, width=64), reference_a)
    finally:
        accel.unpatch(first)
        accel.unpatch(second)


@pytest.mark.parametrize("method", ["astar", "structured"])
def test_a_patched_denoiser_does_not_keep_its_pipeline_alive(method):
    # A from_pipe sibling may hold the UNet long after the patched pipeline is dropped.
    import gc
    import weakref

    pipe = accel.load_pipeline("sd15-tiny")
    accel.patch(pipe, method)
    unet, pipeline_ref = pipe.unet, weakref.ref(pipe)
    del pipe
    gc.collect()
    assert pipeline_ref() is None
    accel.unpatch(unet)  # what is left to restore is the denoiser's own
    assert not hasattr(unet, "_accel_patch")


def test_processors_replaced_while_patched_are_refused_and_kept_by_unpatch(sd):
    from diffusers.models.attention_processor import AttnProcessor

    plain = generate(sd, "sd15-tiny")
    before = dict(sd.unet.attn_processors)
    try:
        with accel.patched(sd, "agent", agent_ratio=1 / 4):
            sd.enable_attention_slicing()  # replaces every processor, accel's too
            with pytest.raises(RuntimeError, match=r"replaced after accel.patch .* accel\.unpatch\(pipe\), make that"):
                generate(sd, "sd15-tiny")
    finally:
        sd.disable_attention_slicing()
    np.testing.assert_array_equal(generate(sd, "sd15-tiny"), plain)

    # A processor the user sets on one layer while patched is theirs: unpatch restores the others around it.
    sd.unet.set_attn_processor(dict(before))
    handle = accel.patch(sd, "agent", agent_ratio=1 / 4)
    layer = next(iter(handle.layers))
    own = AttnProcessor()
    sd.unet.get_submodule(layer).set_processor(own)
    accel.unpatch(sd)
    after = sd.unet.attn_processors
    sd.unet.set_attn_processor(dict(before))
    assert after.pop(f"{layer}.processor") is own
    assert all(after[key] is processor for key, processor in before.items() if key != f"{layer}.processor")


def test_qkv_fused_while_patched_unfuses_to_the_unpatched_processors():
    # Its own pipeline: fusing adds to_qkv modules that stay after unfusing (ControlNet.from_unet would refuse them).
    sd = accel.load_pipeline("sd15-tiny")
    sd.set_progress_bar_config(disable=True)
    plain = generate(sd, "sd15-tiny")
    with accel.patched(sd, "agent", agent_ratio=1 / 4):
        sd.fuse_qkv_projections()
    sd.unfuse_qkv_projections()  # puts back what fuse saved, which were accel's processors
    assert all(not type(p).__module__.startswith("accel") for p in sd.unet.attn_processors.values())
    np.testing.assert_allclose(generate(sd, "sd15-tiny"), plain, atol=1e-5)


def test_a_patched_model_is_not_copied_and_its_processors_are_not_rebuilt_bare(sd):
    import copy

    with accel.patched(sd, "agent") as handle:
        with pytest.raises(TypeError, match="cannot be copied or pickled .* accel.unpatch it first"):
            copy.deepcopy(sd.unet)
        # diffusers rebuilds every processor as type(processor)() when it loads or unloads an IP-Adapter.
        processor = sd.unet.get_submodule(next(iter(handle.layers))).processor
        with pytest.raises(TypeError, match=r"needs what accel.patch gives it; .* IP-Adapter"):
            type(processor)()
    copy.deepcopy(sd.unet)  # unpatched, it copies
