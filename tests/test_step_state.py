"""Step and layout facts reach processors correctly under CFG, img2img, step counts and repeated generations."""

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import generate

import accel
from accel.pipelines import tiny


@dataclass(kw_only=True)
class _ProbeConfig(accel.MethodConfig):
    """Test-only method: exact attention that records what each attention call was told."""

    name: ClassVar[str] = "test-probe"


@pytest.fixture
def probe():
    records = []

    def make(base):
        class Probe(base):
            def attend(self, query, key, value, attention_mask, call):
                step, layout = self.context.step, self.context.layout
                records.append(
                    {"call": call, "layer": self.layer, "step": step, "layout": layout, "batch": query.shape[0]}
                )
                return super().attend(query, key, value, attention_mask, call)

        return Probe

    @accel.register_method(_ProbeConfig, families=("unet", "flux", "hunyuanvideo"))
    def apply_probe(plan, config):
        probe_class = make(plan.family.dense_processor_class)
        for site in plan.select(config):
            plan.set_processor(site, probe_class(context=plan.context, layer=site.name))

    yield records
    accel.unregister_method("test-probe")


def scheduler_steps(pipe, records):
    """The distinct (step_index, timestep) pairs seen, in call order."""
    seen = []
    for record in records:
        pair = (record["step"].step_index, record["step"].timestep)
        if not seen or seen[-1] != pair:
            seen.append(pair)
    return seen


@pytest.mark.parametrize("steps", [3, 5])
def test_unet_steps_under_classifier_free_guidance(tiny_pipelines, probe, steps):
    pipe = tiny_pipelines["sd15-tiny"]
    with accel.patched(pipe, "test-probe"):
        generate(pipe, "sd15-tiny", steps=steps, guidance_scale=7.5)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert scheduler_steps(pipe, probe) == [(i, float(t)) for i, t in enumerate(timesteps)]
    assert {r["step"].num_steps for r in probe} == {steps}
    assert [r["step"].progress for r in probe][-1] == pytest.approx((steps - 1) / steps)
    # Batched CFG: both halves in one call, and the hook saw the doubled batch.
    assert {r["batch"] for r in probe} == {2} and {r["layout"].batch_size for r in probe} == {2}


def test_unet_level_grids_and_call_kinds(tiny_pipelines, probe):
    pipe = tiny_pipelines["sd15-tiny"]
    with accel.patched(pipe, "test-probe"):
        generate(pipe, "sd15-tiny", steps=1, height=72, width=40)
    latent = (72 // 8, 40 // 8)
    assert {r["layout"].grid for r in probe} == {latent}
    grids = set()
    for record in probe:
        call = record["call"]
        grid = record["layout"].level_grid(call.visual_tokens)
        assert math.prod(grid) == call.visual_tokens
        grids.add(grid)
        assert call.kind == ("self" if record["layer"].endswith("attn1") else "cross")
        if call.kind == "cross":
            assert call.text_tokens == pipe.tokenizer.model_max_length
    # 9x5 latent halves with ceil at each down-sampling: odd sides must not break level detection.
    assert {(9, 5), (5, 3), (3, 2)} <= grids


def test_img2img_with_partial_strength_starts_late_in_the_schedule(tiny_pipelines, probe):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_pipelines["sd15-tiny"].components)
    image = torch.rand(1, 3, 64, 64)
    with accel.patched(pipe, "test-probe"):
        pipe(
            "a red circle",
            image=image,
            strength=0.5,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    seen = scheduler_steps(pipe, probe)
    assert [index for index, _ in seen] == [2, 3]
    assert [r["step"].progress for r in probe][0] == pytest.approx(0.5)


def test_repeated_generations_see_the_same_facts(tiny_pipelines, probe):
    pipe = tiny_pipelines["sd15-tiny"]
    with accel.patched(pipe, "test-probe"):
        generate(pipe, "sd15-tiny", steps=2)
        first = list(probe)
        probe.clear()
        generate(pipe, "sd15-tiny", steps=2)
    assert [(r["step"], r["layout"], r["call"]) for r in probe] == [(r["step"], r["layout"], r["call"]) for r in first]


def test_flux_layout_and_timesteps(tiny_pipelines, probe):
    pipe = tiny_pipelines["flux-tiny"]
    kwargs = tiny.default_generation_kwargs("flux-tiny")
    with accel.patched(pipe, "test-probe"):
        generate(pipe, "flux-tiny", steps=3)
    # FLUX packs 2x2 latent patches: grid = pixels / (vae factor * 2).
    factor = pipe.vae_scale_factor * 2
    grid = (kwargs["height"] // factor, kwargs["width"] // factor)
    text = kwargs.get("max_sequence_length", 512)
    assert {r["layout"].grid for r in probe} == {grid}
    assert {r["layout"].text_tokens for r in probe} == {text}
    for record in probe:
        call = record["call"]
        assert call.kind == "joint" and call.text_first
        assert (call.visual_tokens, call.text_tokens) == (math.prod(grid), text), record["layer"]
    # The transformer receives t / 1000; the hook reports scheduler units.
    expected = [(i, pytest.approx(float(t), rel=1e-5)) for i, t in enumerate(pipe.scheduler.timesteps.tolist())]
    assert scheduler_steps(pipe, probe) == expected


def test_hunyuanvideo_layout(tiny_pipelines, probe):
    pipe = tiny_pipelines["hunyuanvideo-tiny"]
    kwargs = tiny.default_generation_kwargs("hunyuanvideo-tiny")
    with accel.patched(pipe, "test-probe"):
        generate(pipe, "hunyuanvideo-tiny", steps=2)
    config = pipe.transformer.config
    frames = (kwargs["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    grid = (
        frames // config.patch_size_t,
        kwargs["height"] // pipe.vae_scale_factor_spatial // config.patch_size,
        kwargs["width"] // pipe.vae_scale_factor_spatial // config.patch_size,
    )
    assert {r["layout"].grid for r in probe} == {grid}
    for record in probe:
        call = record["call"]
        assert call.kind == "joint" and not call.text_first
        assert call.visual_tokens == math.prod(grid)
        assert call.text_tokens == record["layout"].text_tokens > 0
    assert [i for i, _ in scheduler_steps(pipe, probe)] == [0, 1]


@pytest.mark.parametrize("scheduler_name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_second_order_schedulers_give_a_steps_two_calls_its_index(tiny_pipelines, probe, scheduler_name):
    import diffusers

    pipe = tiny_pipelines["sd15-tiny"]
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(original.config)
    try:
        with accel.patched(pipe, "test-probe"):
            generate(pipe, "sd15-tiny", steps=3, guidance_scale=7.5)
        schedule = pipe.scheduler.timesteps.tolist()
    finally:
        pipe.scheduler = original
    assert len(schedule) == 5  # predictor and corrector of steps 0 and 1, the last step's single call
    seen = scheduler_steps(pipe, probe)
    assert [i for i, _ in seen] == [0, 0, 1, 1, 2]
    assert [t for _, t in seen] == pytest.approx(schedule)
    assert {record["step"].num_steps for record in probe} == {3}


def test_a_pipeline_sharing_the_denoiser_is_placed_in_its_own_schedule(tiny_pipelines, probe):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = tiny_pipelines["sd15-tiny"]
    with accel.patched(pipe, "test-probe"):
        generate(pipe, "sd15-tiny", steps=10)
        sharing = StableDiffusionPipeline.from_pipe(
            pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        )
        probe.clear()
        generate(sharing, "sd15-tiny", steps=4)
        # The patched pipeline's 10-step schedule lies nearby: placed there, they were steps 0, 2, 6, 9.
        assert [i for i, _ in scheduler_steps(sharing, probe)] == [0, 1, 2, 3]
        assert {record["step"].num_steps for record in probe} == {4}


def test_bare_denoiser_has_no_schedule_but_a_noise_level(tiny_pipelines, probe):
    pipe = tiny_pipelines["sd15-tiny"]
    unet = pipe.unet
    sample = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    with accel.patched(unet, "test-probe"), torch.no_grad():
        unet(sample, torch.tensor([250]), encoder_hidden_states=text)
    step = probe[0]["step"]
    assert (step.timestep, step.step_index, step.num_steps) == (250.0, None, None)
    assert step.progress == pytest.approx(0.75)


def test_a_timestep_rounded_to_bf16_is_placed_by_the_pipelines_exact_one():
    from types import SimpleNamespace

    from accel.pipelines.families import FAMILIES
    from accel.pipelines.hooks import StepStateHook
    from accel.processors.state import PatchContext

    class Pipeline:  # what the hook reads of a pipeline (held weakly, so not a SimpleNamespace)
        _current_timestep = None

    # A long shifted flow-matching schedule: steps 0 and 1 both round to 1000 in bf16.
    schedule = torch.tensor([999.0, 998.2, 997.3, 996.4, 995.4])
    rounded = float(schedule[1].to(torch.bfloat16))
    assert rounded == float(schedule[0].to(torch.bfloat16))
    pipeline = Pipeline()
    pipeline.scheduler = SimpleNamespace(timesteps=schedule, config=SimpleNamespace())
    hook = StepStateHook(FAMILIES["flux"], PatchContext(family="flux"), pipeline)
    pipeline._current_timestep = schedule[1]
    assert hook._step_state(rounded, pipeline).step_index == 1
    pipeline._current_timestep = torch.tensor(500.0)  # another call's (a pipeline sharing the denoiser): ignored
    assert hook._step_state(rounded, pipeline).step_index == 0


@pytest.mark.parametrize(("method", "options"), [("hidiffusion", {"raunet_switch": 0.5}), ("agent", {})])
def test_siblings_sharing_a_patched_unet_run_at_once_from_two_threads(tiny_pipelines, method, options):
    # A server's two tabs: txt2img and a from_pipe sibling with its own scheduler and step count, at the same time.
    import threading

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = tiny_pipelines["sd15-tiny"]
    with accel.patched(pipe, method, **options):
        sibling = StableDiffusionPipeline.from_pipe(
            pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        )
        sibling.set_progress_bar_config(disable=True)
        runs = {"pipe": (pipe, 4), "sibling": (sibling, 7)}
        alone = {key: generate(p, "sd15-tiny", steps=steps) for key, (p, steps) in runs.items()}
        together = {key: [] for key in runs}

        def work(key):
            p, steps = runs[key]
            for _ in range(2):
                together[key].append(generate(p, "sd15-tiny", steps=steps))

        threads = [threading.Thread(target=work, args=(key,)) for key in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for key in runs:
        assert len(together[key]) == 2 and all((image == alone[key]).all() for image in together[key])


def test_lent_state_reaches_threads_without_their_own_and_spares_those_with_it():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from accel.processors.state import LatentLayout, PatchContext, lend_per_thread_state

    context = PatchContext(family="unet", layout=LatentLayout(grid=(8, 8)))
    sibling_saw = []

    def sibling_call():  # a from_pipe sibling's call sets its own facts
        context.layout = LatentLayout(grid=(4, 4))
        sibling_saw.append(context.layout)

    # One long-lived thread, as torch's device threads are: it reads (and caches) the default before the lend.
    with ThreadPoolExecutor(max_workers=1) as device_thread:
        before = device_thread.submit(lambda: context.layout).result()
        with lend_per_thread_state([context]):
            during = device_thread.submit(lambda: context.layout).result()
            sibling = threading.Thread(target=sibling_call)
            sibling.start()
            sibling.join()
        after = device_thread.submit(lambda: context.layout).result()
    assert before is None and after is None  # nothing is lent outside the block
    assert during.grid == (8, 8) and sibling_saw[0].grid == (4, 4)
    assert context.layout.grid == (8, 8)
