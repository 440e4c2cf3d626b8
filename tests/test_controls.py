"""The substrate of the cross-attention controls: recorded maps and the A-STAR / Attend-and-Excite losses."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import backward_in_another_thread, controlnet_pipeline, generate_shapes, losses_over_latent_updates

import accel
from accel.kernels import controls
from accel.pipelines.prompts import word_positions
from accel.processors.controls import CrossAttentionStore, StoreAttnProcessor
from accel.processors.state import LatentLayout, PatchContext

PROMPT = "a red circle and a blue square"


def test_soft_overlap_and_the_a_star_losses():
    square = torch.zeros(1, 2, 4, 4)
    square[0, 0, :2, :2] = 1.0
    square[0, 1, 2:, 2:] = 1.0  # disjoint from the first
    assert controls.soft_overlap(square[:, 0], square[:, 0]).item() == pytest.approx(0.5)
    assert controls.segregation_loss(square).item() == 0.0
    same = square[:, :1].expand(1, 3, 4, 4)
    assert controls.segregation_loss(same).item() == pytest.approx(3 * 0.5)  # three pairs, each 0.5
    regions = controls.binarise(square)
    assert torch.equal(regions, square)
    assert controls.retention_loss(square, regions).item() == pytest.approx(2 * 0.5)
    assert controls.retention_loss(square, regions.flip(1)).item() == pytest.approx(2.0)
    # A-STAR's maps are smoothed before they are compared: adjacent single cells overlap a little, scaled to [0, 1].
    cells = torch.zeros(1, 2, 5, 5)
    cells[0, 0, 1, 1] = cells[0, 1, 1, 2] = 1.0
    maps = controls.segregation_maps(cells)
    assert controls.segregation_loss(controls.normalise(cells)).item() == 0.0
    assert 0.0 < controls.segregation_loss(maps).item() < 0.5
    assert maps.amin().item() == 0.0 and maps.flatten(2).amax(-1).allclose(torch.ones(1, 2))
    assert torch.equal(controls.binarise(maps, 0.99), cells)


def test_attend_and_excite_loss_is_the_most_neglected_concept():
    maps = torch.full((1, 2, 5, 5), 0.01)
    maps[0, 0, 2, 2] = 1.0
    maps[0, 0, 1:4, 1:4] = 1.0  # a peak that survives smoothing
    loss = controls.attend_excite_loss(maps)
    assert loss.item() == pytest.approx(0.99, abs=1e-6)  # concept 1 is absent
    assert controls.gaussian_smooth(torch.full((1, 1, 5, 5), 0.3)).sub(0.3).abs().max() < 1e-6
    # Sides too short to reflect (a 16 px FLUX image has one token row) keep their shape.
    for shape in ((1, 1, 1, 4), (1, 2, 1, 1), (1, 1, 2, 3)):
        assert controls.gaussian_smooth(torch.full(shape, 0.3)).sub(0.3).abs().max() < 1e-6


def test_step_sizes_follow_attend_and_excite():
    assert controls.step_size(20.0, 0.0) == pytest.approx(20.0)
    assert controls.step_size(20.0, 0.5) == pytest.approx(20 * 0.75**0.5)
    assert controls.step_size(30.0, 1.0) == pytest.approx(30 * 0.5**0.5)


@pytest.fixture(scope="module")
def recording_unet():
    pipe = accel.load_pipeline("shapes-sd")
    unet = pipe.unet
    context = PatchContext(family="unet")
    context.layout = LatentLayout(grid=(16, 16), batch_size=1)
    store = CrossAttentionStore()
    originals = unet.attn_processors
    processors = {
        name: StoreAttnProcessor(context, name.removesuffix(".processor"), store) if ".attn2." in name else p
        for name, p in originals.items()
    }
    unet.set_attn_processor(dict(processors))
    embedding = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipe.scheduler.set_timesteps(25)
    yield pipe, unet, store, embedding, pipe.scheduler.timesteps[2]
    unet.set_attn_processor(dict(originals))


def test_recorded_maps_and_exact_outputs(recording_unet):
    pipe, unet, store, embedding, timestep = recording_unet
    latent = torch.randn(1, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = unet(latent, timestep, embedding).sample
        assert store.maps == {}
        with store.record():
            recorded = unet(latent, timestep, embedding).sample
    assert torch.equal(recorded, plain)  # the recorded layers keep their own attention as output
    # Every cross-attention layer is recorded; the 16 x 16 level (down_blocks.0 and up_blocks.3) is aggregated.
    assert all(name.endswith("attn2") for name in store.maps)
    assert sorted(name for name, (grid, _) in store.maps.items() if grid == (16, 16)) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.3.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.3.attentions.1.transformer_blocks.0.attn2",
    ]
    maps = store.aggregate()
    assert maps.shape == (1, 16, 16, pipe.tokenizer.model_max_length)
    torch.testing.assert_close(maps.sum(dim=-1), torch.ones(1, 16, 16))
    # map_side picks another level: the 8 x 8 one is down_blocks.1 and up_blocks.2.
    store.map_side = 8
    eight = [m for name, (grid, m) in store.maps.items() if grid == (8, 8)]
    assert len(eight) == 3 and torch.equal(store.aggregate(), torch.stack(eight).mean(0).view(1, 8, 8, -1))
    store.map_side = 16


def test_another_threads_forward_neither_records_nor_stops_at_this_threads_plan(recording_unet):
    # A pipeline made with from_pipe shares the patched UNet and may run it from another thread (a server's second
    # tab) while the patched one is inside a planned recording pass.
    import threading

    pipe, unet, store, embedding, timestep = recording_unet
    latent = torch.randn(1, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    outputs, errors = {}, []

    def sibling_call():
        try:
            outputs["sibling"] = unet(latent, timestep, embedding).sample
        except Exception as error:  # noqa: BLE001  (reported by the assertion below)
            errors.append(error)

    with torch.no_grad():
        plain = unet(latent, timestep, embedding).sample
        with store.record():
            unet(latent, timestep, embedding)
        plan = store.whole_pass_plan()
        with store.record(plan=plan):
            worker = threading.Thread(target=sibling_call)
            worker.start()
            worker.join()
            assert store.maps == {} and store.met == []
    assert errors == [] and torch.equal(outputs["sibling"], plain)


@pytest.mark.parametrize("loss_name", ["segregation", "attend_excite"])
def test_losses_decrease_over_latent_updates(recording_unet, loss_name):
    pipe, unet, store, embedding, timestep = recording_unet
    positions = word_positions(pipe.tokenizer, PROMPT, ["circle", "square"])
    prompt_tokens = len(pipe.tokenizer(PROMPT)["input_ids"]) - 1
    latent = torch.randn(1, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))

    def record_maps(latent):
        with store.record():
            unet(latent, timestep, embedding)
        return store.aggregate()

    losses = losses_over_latent_updates(
        record_maps, lambda maps: controls.concept_maps(maps, positions, prompt_tokens), latent, loss_name
    )
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses


def _guidance_state(pipe):
    from accel.pipelines.controls import GUIDANCE_HOOK_NAME

    return pipe.unet._diffusers_hook.get_hook(GUIDANCE_HOOK_NAME).state


def test_zero_step_size_or_no_guided_steps_is_the_unpatched_pipeline(shapes_pipe):
    reference = generate_shapes(shapes_pipe, PROMPT)
    for options in ({"step_size": 0}, {"guided_steps": 0}, {"loss": "attend_excite", "step_size": 0}):
        with accel.patched(shapes_pipe, "astar", **options):
            assert (generate_shapes(shapes_pipe, PROMPT) == reference).all()


@pytest.mark.parametrize("loss", ["astar", "attend_excite"])
def test_guidance_moves_the_latents_every_guided_step(shapes_pipe, loss, monkeypatch):
    import numpy as np

    from accel.pipelines.controls import LatentGuidanceHook

    # What each guided step adds to the latent, and the step size it was scaled by.
    updates, alphas = [], []
    own_update, own_step_size = LatentGuidanceHook._update, controls.step_size

    def recorded_update(self, *args, **kwargs):
        update = own_update(self, *args, **kwargs)
        updates.append(float(update.abs().max()))
        return update

    def recorded_step_size(scale, progress):
        alphas.append((scale, progress))
        return own_step_size(scale, progress)

    monkeypatch.setattr(LatentGuidanceHook, "_update", recorded_update)
    monkeypatch.setattr(controls, "step_size", recorded_step_size)
    reference = generate_shapes(shapes_pipe, PROMPT)
    with accel.patched(shapes_pipe, "astar", loss=loss, guided_steps=0.5):
        guided = generate_shapes(shapes_pipe, PROMPT)
        assert len(updates) == 2 and min(updates) > 0  # both guided steps move the latent
        assert alphas == [(20.0, 0.0), (20.0, 0.25)]  # A&E's decay, by the schedule's progress
        state = _guidance_state(shapes_pipe)
        # Subjects default to the noun phrases' head nouns: "circle" and "square".
        assert state.positions == [[(3,), (7,)]]
        assert [step for step, _ in state.losses] == [0, 1]  # the first half of 4 steps
        assert len(state.wrapped_schedulers) == 1
    assert np.abs(guided - reference).max() > 1e-3
    assert "step" not in vars(shapes_pipe.scheduler) and "encode_prompt" not in vars(shapes_pipe)
    assert (generate_shapes(shapes_pipe, PROMPT) == reference).all()


def test_refinement_falls_on_attend_and_excites_steps_at_any_step_count():
    from accel.pipelines.controls import refinement_target
    from accel.processors.state import StepState

    def refined(steps: int) -> dict[int, float]:
        targets = {i: refinement_target(StepState(0.0, i, steps, i / steps)) for i in range(steps)}
        return {i: round(target, 6) for i, target in targets.items() if target is not None}

    assert refined(50) == {0: 0.95, 10: 0.5, 20: 0.2}  # A&E's {0: 0.05, 10: 0.5, 20: 0.8} as loss targets
    assert refined(25) == {0: 0.95, 5: 0.5, 10: 0.2}
    assert refined(4) == {0: 0.95, 1: 0.5, 2: 0.2}


def test_attend_and_excite_repeats_its_update_until_the_target_at_refinement_steps(shapes_pipe):
    from accel.pipelines.controls import MAX_REFINEMENTS

    options = {"loss": "attend_excite", "guided_steps": 0.5}
    with accel.patched(shapes_pipe, "astar", **options):
        refined = generate_shapes(shapes_pipe, PROMPT, steps=5)
        state = _guidance_state(shapes_pipe)
        first_losses = dict(state.losses)
        assert [step for step, _, _ in state.refinements] == [0, 1, 2]  # 0, 0.2, 0.4 of 5 steps
        targets = {0: 0.95, 1: 0.5, 2: 0.2}
        for step, repeats, loss in state.refinements:
            assert loss <= targets[step] + 1e-6 or repeats == MAX_REFINEMENTS
            if repeats:
                assert loss < first_losses[step]  # the repeats lowered the loss
        assert sum(repeats for _, repeats, _ in state.refinements) > 0
    with accel.patched(shapes_pipe, "astar", refine=False, **options):
        once = generate_shapes(shapes_pipe, PROMPT, steps=5)
        assert _guidance_state(shapes_pipe).refinements == []
        assert [step for step, _ in _guidance_state(shapes_pipe).losses] == [0, 1, 2]
    assert abs(refined - once).max() > 1e-3
    with accel.patched(shapes_pipe, "astar", guided_steps=0.5):  # A-STAR's loss: one update a step
        generate_shapes(shapes_pipe, PROMPT, steps=5)
        assert _guidance_state(shapes_pipe).refinements == []


def test_phrase_subjects_take_each_noun_phrases_content_words(shapes_pipe):
    from accel.pipelines.prompts import phrase_positions

    tokenizer = shapes_pipe.tokenizer
    # BOS is position 0: "a"=1, "red"=2, "circle"=3, "and"=4, "a"=5, "blue"=6, "square"=7.
    assert phrase_positions(tokenizer, PROMPT) == [(2, 3), (6, 7)]
    assert phrase_positions(tokenizer, "two red circles") == [(2, 3)]
    assert phrase_positions(tokenizer, "a green star left of a red circle") == [(2, 3), (7, 8)]
    with accel.patched(shapes_pipe, "astar", subjects="phrases", guided_steps=0.5, map_side=8):
        generate_shapes(shapes_pipe, PROMPT)
        state = _guidance_state(shapes_pipe)
        assert state.positions == [[(2, 3), (6, 7)]]
        assert len(state.losses) == 2
        # The settings measured on the shipped model: the retained regions are of the 8 x 8 level.
        assert state.previous_regions[0].shape == (1, 2, 8, 8)


def test_a_swapped_scheduler_is_guided_too_and_restored(shapes_pipe):
    from diffusers import EulerDiscreteScheduler

    original = shapes_pipe.scheduler
    shapes_pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        reference = generate_shapes(shapes_pipe, PROMPT)
        with accel.patched(shapes_pipe, "astar"):
            guided = generate_shapes(shapes_pipe, PROMPT)
            assert [s for s, _ in _guidance_state(shapes_pipe).wrapped_schedulers] == [shapes_pipe.scheduler]
        assert "step" not in vars(shapes_pipe.scheduler)
        assert abs(guided - reference).max() > 1e-3
    finally:
        shapes_pipe.scheduler = original


def test_the_step_shim_keeps_eta_and_the_generator_reaching_the_scheduler(shapes_pipe):
    # Pipelines pass eta / generator only to a step whose signature names them; the shim stays installed between
    # calls, so a second call would lose them (DDIM's eta ignored, an ancestral sampler's noise from the global RNG).
    from diffusers import EulerAncestralDiscreteScheduler

    original = shapes_pipe.scheduler
    try:
        for scheduler, options in ((original, {"eta": 0.5}), (EulerAncestralDiscreteScheduler, {})):
            if scheduler is not original:
                shapes_pipe.scheduler = scheduler.from_config(original.config)
            with accel.patched(shapes_pipe, "astar"):
                first = generate_shapes(shapes_pipe, PROMPT, **options)
                torch.manual_seed(123)  # the global RNG must not matter
                assert (generate_shapes(shapes_pipe, PROMPT, **options) == first).all()
                assert "generator" in inspect.signature(shapes_pipe.scheduler.step).parameters
                if options:  # eta reaches DDIM on the second call too: its noise makes a different image
                    assert not (generate_shapes(shapes_pipe, PROMPT) == first).all()
    finally:
        shapes_pipe.scheduler = original


def test_a_deep_copy_of_the_guided_scheduler_steps_itself(shapes_pipe):
    import copy

    reference = copy.deepcopy(shapes_pipe.scheduler)
    with accel.patched(shapes_pipe, "astar"):
        generate_shapes(shapes_pipe, PROMPT)
        copied = copy.deepcopy(shapes_pipe.scheduler)  # e.g. kept to restart from
    assert "step" not in vars(shapes_pipe.scheduler)
    own = shapes_pipe.scheduler
    try:
        # Another step count than the guided call's: a copy stepping the original scheduler would take its
        # schedule's spacing (DDIM reads num_inference_steps off the scheduler it steps).
        shapes_pipe.scheduler = copied
        from_copy = generate_shapes(shapes_pipe, PROMPT, steps=6)
        shapes_pipe.scheduler = reference
        assert (from_copy == generate_shapes(shapes_pipe, PROMPT, steps=6)).all()
    finally:
        shapes_pipe.scheduler = own


def test_a_second_order_scheduler_is_guided_once_per_step(shapes_pipe):
    from diffusers import HeunDiscreteScheduler

    original = shapes_pipe.scheduler
    shapes_pipe.scheduler = HeunDiscreteScheduler.from_config(original.config)
    try:
        with accel.patched(shapes_pipe, "astar", guided_steps=0.5):
            generate_shapes(shapes_pipe, PROMPT)
            # 4 steps are 7 model calls; the corrector of step 0 and the predictor of step 1 share a timestep.
            assert [step for step, _ in _guidance_state(shapes_pipe).losses] == [0, 1]
    finally:
        shapes_pipe.scheduler = original


def test_subject_errors_name_the_prompt_words(shapes_pipe):
    from accel.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="'dog' is not a word of the prompt.*'circle'"):
        with accel.patched(shapes_pipe, "astar", tokens=["circle", "dog"]):
            generate_shapes(shapes_pipe, PROMPT)
    for options, words in (
        ({"tokens": "circle"}, "non-empty list of words"),
        ({"loss": "dice"}, "one of astar, attend_excite"),
        ({"step_size": -1}, "non-negative"),
        ({"threshold": 1.0}, "in (0, 1)"),
        ({"map_side": 0}, "positive int"),
        ({"map_side": 8.0}, "positive int"),
        ({"subjects": "verbs"}, "one of nouns, phrases"),
        ({"subjects": "phrases", "tokens": ["circle"]}, "names the subjects itself"),
    ):
        with pytest.raises(InvalidOptionError, match=None) as error:
            accel.patch(shapes_pipe, "astar", **options)
        assert words in str(error.value)
    assert accel.get_patch(shapes_pipe) is None


def test_guidance_runs_under_inference_mode(shapes_pipe):
    reference = generate_shapes(shapes_pipe, PROMPT)
    with accel.patched(shapes_pipe, "astar"):
        with torch.inference_mode():
            guided = generate_shapes(shapes_pipe, PROMPT)
        assert (guided == generate_shapes(shapes_pipe, PROMPT)).all()
    assert abs(guided - reference).max() > 1e-3


def test_composes_with_hidiffusion(shapes_pipe):
    # RAU-Net changes the deep levels' resolution early in the schedule; the maps follow the recorded levels.
    def generate():
        return shapes_pipe(
            PROMPT, num_inference_steps=4, guidance_scale=6.0, height=128, width=128,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images  # fmt: skip

    with accel.patched(shapes_pipe, "hidiffusion"):
        reference = generate()
    with accel.patched(shapes_pipe, [accel.HiDiffusionConfig(), accel.AStarConfig(step_size=0)]):
        assert (generate() == reference).all()
    with accel.patched(shapes_pipe, [accel.HiDiffusionConfig(), accel.AStarConfig()]):
        guided = generate()
        assert len(_guidance_state(shapes_pipe).losses) == 4
    assert abs(guided - reference).max() > 1e-3


def _guided_runs(pipe, block: torch.nn.Module, methods, generate):
    """For whole guided passes and for passes stopped early: the output, the losses, and how often ``block`` ran."""
    runs = {}
    calls = []
    handle = block.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for early in (False, True):
            with accel.patched(pipe, methods):
                state = _guidance_state(pipe)
                state.stop_passes_early = early
                calls.clear()
                output = generate()
                runs[early] = (output, [loss for _, loss in state.losses], len(calls))
    finally:
        handle.remove()
    return runs


@pytest.mark.parametrize("loss", ["astar", "attend_excite"])
def test_guided_passes_stop_after_the_last_layer_the_loss_reads(shapes_pipe, loss):
    # map_side=8 reads down_blocks.1 and up_blocks.2 of the 16 x 16 latent: a pass that follows the call's plan
    # never reaches up_blocks.3.
    runs = _guided_runs(
        shapes_pipe, shapes_pipe.unet.up_blocks[3], accel.AStarConfig(loss=loss, map_side=8),
        lambda: generate_shapes(shapes_pipe, PROMPT),
    )  # fmt: skip
    (whole, whole_losses, whole_calls), (early, early_losses, early_calls) = runs[False], runs[True]
    assert early_calls == 4 + 1  # the 4 denoiser calls and the first guided pass, which plans
    # Whole, one guided pass a step (A&E repeats its update at its refinement steps).
    assert whole_calls == 4 + 4 if loss == "astar" else whole_calls > 4 + 4
    # Up to where it stops, a planned pass runs the same operations as a whole one.
    assert (early == whole).all() and early_losses == whole_losses


def test_a_plan_serves_later_calls_at_its_latent_shape(shapes_pipe):
    calls = []
    handle = shapes_pipe.unet.up_blocks[3].register_forward_pre_hook(lambda *_: calls.append(1))
    counts = []
    try:
        with accel.patched(shapes_pipe, "astar", map_side=8):
            for size in (64, 64, 96, 64):
                calls.clear()
                generate_shapes(shapes_pipe, PROMPT, size=size)
                counts.append(len(calls))
    finally:
        handle.remove()
    # 4 denoiser calls each, and a whole guided pass wherever the latent's shape is not the last plan's.
    assert counts == [5, 4, 5, 5]


def test_a_pass_that_strays_from_its_plan_runs_again_whole(shapes_pipe):
    # At 128 px RAU-Net's first stage runs for steps 0 and 1 of 4 and changes the deep levels' resolution; step 2's
    # planned pass meets a level its plan (from step 0) does not list, stops there and runs again whole.
    def generate():
        return generate_shapes(shapes_pipe, PROMPT, size=128)

    runs = _guided_runs(
        shapes_pipe, shapes_pipe.unet.up_blocks[3], [accel.HiDiffusionConfig(), accel.AStarConfig()], generate
    )
    (whole, whole_losses, whole_calls), (early, early_losses, early_calls) = runs[False], runs[True]
    assert whole_calls == 4 + 4 and early_calls == 4 + 2
    assert (early == whole).all() and early_losses == whole_losses


@pytest.mark.parametrize(
    ("methods", "backward_thread"),
    [
        (accel.AStarConfig(map_side=8), False),  # its planned passes stop inside a checkpointed block
        (accel.AStarConfig(loss="attend_excite", guided_steps=0.5), False),
        ([accel.HiDiffusionConfig(), accel.AStarConfig()], False),
        ([accel.HiDiffusionConfig(), accel.AStarConfig()], True),  # every kind of per-thread state
    ],
    ids=["astar", "attend_excite", "hidiffusion+astar", "hidiffusion+astar, backward in a device thread"],
)
def test_gradient_checkpointing_gives_the_same_guidance(shapes_pipe, methods, backward_thread, monkeypatch):
    # Checkpointed blocks run again in the backward pass; the recorded layers must redo their maps there, or torch
    # refuses the recomputation ("a different number of tensors was saved"). On a GPU that happens in torch's own
    # threads, which must see the call's layout, step, RAU-Net stages and recording decisions.
    if backward_thread:
        backward_in_another_thread(monkeypatch)
    size = 128 if isinstance(methods, list) else 64
    with accel.patched(shapes_pipe, methods):
        plain = generate_shapes(shapes_pipe, PROMPT, size=size)
    shapes_pipe.unet.enable_gradient_checkpointing()
    try:
        with accel.patched(shapes_pipe, methods):
            checkpointed = generate_shapes(shapes_pipe, PROMPT, size=size)
    finally:
        shapes_pipe.unet.disable_gradient_checkpointing()
    assert (checkpointed == plain).all()


def test_a_users_own_scheduler_step_comes_back(shapes_pipe):
    own = shapes_pipe.scheduler.step  # a bound method set on the instance, as a user's wrapper would be
    shapes_pipe.scheduler.step = own
    try:
        with accel.patched(shapes_pipe, "astar"):
            generate_shapes(shapes_pipe, PROMPT)
            assert vars(shapes_pipe.scheduler)["step"] is not own
        assert vars(shapes_pipe.scheduler)["step"] is own
    finally:
        vars(shapes_pipe.scheduler).pop("step", None)


def test_an_interrupted_call_leaves_no_update_for_the_next(shapes_pipe):
    unguided = "circles"  # no noun phrase with a subject: the call is not guided
    with accel.patched(shapes_pipe, "astar"):
        before = generate_shapes(shapes_pipe, unguided)
        calls = []

        def interrupt(module, args, output):
            calls.append(1)
            if len(calls) == 2:  # the guided forward has run and left its update for the scheduler step
                raise KeyboardInterrupt

        hook = shapes_pipe.unet.conv_out.register_forward_hook(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                generate_shapes(shapes_pipe, PROMPT)
        finally:
            hook.remove()
        assert (generate_shapes(shapes_pipe, unguided) == before).all()


def test_img2img_runs_start_afresh_and_a_run_past_the_guided_steps_says_so(shapes_pipe, caplog):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**shapes_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def run(strength: float):
        return img2img(
            PROMPT,
            image=image,
            strength=strength,
            num_inference_steps=5,
            guidance_scale=6.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    unguided = run(0.4)
    with accel.patched(img2img, "astar", guided_steps=0.5), caplog.at_level("WARNING"):
        first = run(0.8)
        # The retention regions are the run's own: a second run (entering at step 1, never at 0) repeats the first.
        assert (run(0.8) == first).all()
        assert "past guided_steps" not in caplog.text
        assert (run(0.4) == unguided).all()  # enters at 0.6, past guided_steps=0.5
        run(0.4)
    assert (
        caplog.text.count(
            "enters the schedule at 0.60 (img2img / inpaint strength or denoising_start), past guided_steps=0.50"
        )
        == 1
    )
    assert abs(first - run(0.8)).max() > 1e-3


@pytest.mark.parametrize("kind", ["inpaint", "controlnet"])
def test_astar_guides_inpainting_and_controlnet_pipelines(tiny_pipelines, kind):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    sd = tiny_pipelines["sd15-tiny"]
    torch.manual_seed(0)
    if kind == "inpaint":  # latent + mask + masked image: 9 input channels, 4 out
        unet = UNet2DConditionModel.from_config({**sd.unet.config, "in_channels": 9})
        pipe = StableDiffusionInpaintPipeline(**{**sd.components, "unet": unet})
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., 32:96, 32:96] = 1
        inputs = {"image": torch.rand(1, 3, 128, 128), "mask_image": mask}
    else:
        pipe = controlnet_pipeline(sd)
        inputs = {"image": torch.rand(1, 3, 128, 128)}
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(
            PROMPT,
            num_inference_steps=3,
            height=128,
            width=128,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **inputs,
        ).images

    reference = run()
    with accel.patched(pipe, "astar", step_size=0):
        assert (run() == reference).all()
    with accel.patched(pipe, "astar"):
        guided = run()
    assert abs(guided - reference).max() > 1e-3


def test_default_subjects_past_the_encoded_length_are_dropped_with_a_warning(shapes_pipe, caplog):
    long_prompt = "a red circle and " + "big " * 80 + "a blue square"
    reference = generate_shapes(shapes_pipe, long_prompt, steps=2)
    with accel.patched(shapes_pipe, "astar"), caplog.at_level("WARNING"):
        guided = generate_shapes(shapes_pipe, long_prompt, steps=2)
        assert _guidance_state(shapes_pipe).positions == [[(3,)]]  # the red circle alone
    assert "1 of the 2 noun phrases" in caplog.text and "tokens=[...]" in caplog.text
    assert abs(guided - reference).max() > 0


@pytest.mark.parametrize("method", ["astar", "structured"])
def test_a_pipeline_sharing_the_patched_unet_is_told_it_is_not_controlled(shapes_pipe, method, caplog):
    from diffusers import StableDiffusionPipeline

    other = StableDiffusionPipeline.from_pipe(shapes_pipe)
    other.set_progress_bar_config(disable=True)
    unpatched = [generate_shapes(other, prompt, steps=2) for prompt in (PROMPT, "a green star and a yellow circle")]
    with accel.patched(shapes_pipe, method), caplog.at_level("WARNING"):
        generate_shapes(shapes_pipe, PROMPT, steps=2)
        assert "did not encode" not in caplog.text  # its own pipeline: no warning
        # Neither a prompt its pipeline never encoded nor the one it just did (same embeddings) is controlled,
        # and nothing of the patched pipeline's last call (a latent update) carries over.
        for prompt, expected in zip((PROMPT, "a green star and a yellow circle"), unpatched, strict=True):
            assert (generate_shapes(other, prompt, steps=2) == expected).all()
            generate_shapes(shapes_pipe, PROMPT, steps=2)
    assert f"{method}: the " in caplog.text and "its patched pipeline did not encode" in caplog.text
