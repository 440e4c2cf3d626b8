"""A-STAR / Attend-and-Excite and Structured Diffusion Guidance on FLUX's joint attention (flux-tiny, 128 px)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import backward_in_another_thread, losses_over_latent_updates, model_fingerprint

import accel
from accel.errors import InvalidOptionError
from accel.kernels import controls
from accel.pipelines.controls import GUIDANCE_HOOK_NAME, default_recorded_layers
from accel.pipelines.families import FAMILIES
from accel.pipelines.prompts import prompt_span, word_positions
from accel.processors.controls import CrossAttentionStore, FluxStoreAttnProcessor
from accel.processors.state import LatentLayout, PatchContext

PROMPT = "a red circle and a blue square"
SIZE, TEXT_TOKENS = 128, 32  # 8 x 8 image tokens (2x2 patches of the 16 x 16 latent), T5 padded to 32
GRID = (SIZE // 16, SIZE // 16)


@pytest.fixture(scope="module")
def flux():
    pipe = accel.load_pipeline("flux-tiny")
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    accel.unpatch(pipe)


def generate(pipe, prompt=PROMPT, steps: int = 3, **overrides):
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=SIZE,
        width=SIZE,
        max_sequence_length=TEXT_TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **overrides,
    ).images


def _guidance_state(pipe):
    return pipe.transformer._diffusers_hook.get_hook(GUIDANCE_HOOK_NAME).state


def test_t5_positions_and_the_token_softmax_without_bos(flux):
    tokenizer = flux.tokenizer_2
    # T5 has no BOS: the prompt's words start at 0 and its own tokens end before EOS.
    assert word_positions(tokenizer, PROMPT, ["circle", "square"], TEXT_TOKENS) == [(2,), (6,)]
    assert prompt_span(tokenizer, PROMPT, TEXT_TOKENS) == (0, 7)
    assert prompt_span(flux.tokenizer, PROMPT) == (1, 8)  # CLIP: BOS at 0, EOS at 8
    maps = torch.rand(1, 3, 3, 12)
    positions = [(2,), (3, 4)]
    # An int is CLIP's span (1, n); an explicit span takes T5's tokens from 0.
    torch.testing.assert_close(
        controls.concept_maps(maps, positions, 7), controls.concept_maps(maps, positions, (1, 7)), rtol=0, atol=0
    )
    weights = torch.softmax(100 * maps[..., 0:7], dim=-1)
    torch.testing.assert_close(controls.concept_maps(maps, positions, (0, 7))[:, 0], weights[..., 2])
    with pytest.raises(ValueError, match=r"outside the prompt's own tokens 0\.\.6"):
        controls.concept_maps(maps, [(7,)], (0, 7))


def test_text_token_maps_are_the_joint_softmax_renormalised_over_the_prompt():
    generator = torch.Generator().manual_seed(0)
    batch, text, image, heads, dim = 2, 9, 13, 3, 8
    query, key = (torch.randn(batch, text + image, heads, dim, generator=generator) for _ in range(2))
    keep = torch.zeros(batch, text, dtype=torch.bool)
    keep[0, :5], keep[1, :7] = True, True
    maps = controls.text_token_maps(query[:, text:], key[:, :text], keep)
    # The joint softmax (text first) over every key, its image x prompt-token block renormalised to sum to 1.
    joint = torch.softmax(query.transpose(1, 2) @ key.transpose(1, 2).transpose(-1, -2) * dim**-0.5, dim=-1)
    block = joint[:, :, text:, :text] * keep[:, None, None, :]
    expected = (block / block.sum(dim=-1, keepdim=True)).mean(dim=1)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(maps.sum(dim=-1), torch.ones(batch, image))


@pytest.fixture
def recording_transformer(flux):
    """flux-tiny's transformer with recording processors on the default (middle third) blocks, and its inputs."""
    transformer = flux.transformer
    names = default_recorded_layers(FAMILIES["flux"].attention_sites(transformer))
    context = PatchContext(family="flux")
    context.layout = LatentLayout(grid=GRID, text_tokens=TEXT_TOKENS, text_first=True)
    store = CrossAttentionStore()
    originals = transformer.attn_processors
    processors = {
        key: FluxStoreAttnProcessor(context, key.removesuffix(".processor"), store)
        if key.removesuffix(".processor") in names
        else processor
        for key, processor in originals.items()
    }
    transformer.set_attn_processor(dict(processors))
    with torch.no_grad():
        embeds, pooled, text_ids = flux.encode_prompt(PROMPT, max_sequence_length=TEXT_TOKENS)
    rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1).float()

    def run(latent):
        return transformer(
            hidden_states=latent,
            timestep=torch.tensor([0.9]),
            guidance=torch.tensor([3.5]),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    yield run, store, sorted(names)
    transformer.set_attn_processor(dict(originals))


def _latent():
    return torch.randn(1, GRID[0] * GRID[1], 16, generator=torch.Generator().manual_seed(0))


def test_recorded_maps_and_exact_outputs(flux, recording_transformer):
    run, store, names = recording_transformer
    # flux-tiny has 2 double + 4 single blocks: the middle third is the first two single blocks.
    assert names == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    span = prompt_span(flux.tokenizer_2, PROMPT, TEXT_TOKENS)
    with torch.no_grad():
        plain = run(_latent())
        assert store.maps == {}
        with store.record(text_spans=[span]):
            recorded = run(_latent())
    assert torch.equal(recorded, plain)  # the layer output is the ordinary joint attention
    assert sorted(store.maps) == names
    maps = store.aggregate()
    assert maps.shape == (1, *GRID, TEXT_TOKENS)
    torch.testing.assert_close(maps[..., span[0] : span[1]].sum(dim=-1), torch.ones(1, *GRID))
    assert maps[..., span[1] :].abs().max() == 0  # EOS and padding are left out


@pytest.mark.parametrize("loss_name", ["segregation", "attend_excite"])
def test_losses_decrease_over_latent_updates(flux, recording_transformer, loss_name):
    run, store, _ = recording_transformer
    positions = word_positions(flux.tokenizer_2, PROMPT, ["circle", "square"], TEXT_TOKENS)
    span = prompt_span(flux.tokenizer_2, PROMPT, TEXT_TOKENS)
    latent = _latent()

    def record_maps(latent):
        with store.record(text_spans=[span]):
            run(latent)
        return store.aggregate()

    losses = losses_over_latent_updates(
        record_maps, lambda maps: controls.concept_maps(maps, positions, span), latent, loss_name
    )
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses


def test_zero_step_size_or_no_guided_steps_is_the_unpatched_pipeline(flux):
    reference = generate(flux)
    for options in ({"step_size": 0}, {"guided_steps": 0}, {"loss": "attend_excite", "step_size": 0}):
        with accel.patched(flux, "astar", **options):
            assert np.array_equal(generate(flux), reference)


@pytest.mark.parametrize("loss", ["astar", "attend_excite"])
def test_guidance_moves_the_latents_and_unpatch_restores_everything(flux, loss):
    reference = generate(flux)
    before = model_fingerprint(flux.transformer)
    processors = dict(flux.transformer.attn_processors)
    with accel.patched(flux, "astar", loss=loss) as handle:
        guided = generate(flux)
        state = _guidance_state(flux)
        assert sorted(handle.layers) == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
        assert state.positions == [[(2,), (6,)]] and state.spans == [(0, 7)]  # "circle" and "square" in T5
        assert [step for step, _ in state.losses] == [0, 1, 2]
        assert len(state.wrapped_schedulers) == 1
    assert np.abs(guided - reference).max() > 1e-2
    assert model_fingerprint(flux.transformer) == before
    assert all(flux.transformer.attn_processors[k] is p for k, p in processors.items())
    assert "step" not in vars(flux.scheduler) and "encode_prompt" not in vars(flux)
    assert np.array_equal(generate(flux), reference)


def test_guided_passes_stop_after_the_last_recorded_block(flux):
    # The default recorded blocks are single_transformer_blocks 0 and 1 of 4: a planned pass stops inside block 1.
    counted = flux.transformer.single_transformer_blocks[-1]
    calls = []
    handle = counted.register_forward_pre_hook(lambda *_: calls.append(1))
    runs = {}
    try:
        for early in (False, True):
            with accel.patched(flux, "astar"):
                state = _guidance_state(flux)
                state.stop_passes_early = early
                calls.clear()
                runs[early] = (generate(flux), [loss for _, loss in state.losses], len(calls))
    finally:
        handle.remove()
    assert runs[False][2] == 3 + 3 and runs[True][2] == 3 + 1  # 3 denoiser calls; only the planning pass is whole
    # Every layer before the stop runs as in a whole pass, so the update is the same.
    assert np.array_equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]


@pytest.mark.parametrize("backward_thread", [False, True], ids=["backward here", "backward in a device thread"])
def test_gradient_checkpointing_gives_the_same_guidance(flux, backward_thread, monkeypatch):
    # In a device thread (a GPU's backward) the single blocks must still see the call's text length.
    if backward_thread:
        backward_in_another_thread(monkeypatch)
    with accel.patched(flux, "astar"):
        plain = generate(flux)
    flux.transformer.enable_gradient_checkpointing()
    try:
        with accel.patched(flux, "astar"):
            checkpointed = generate(flux)
    finally:
        flux.transformer.disable_gradient_checkpointing()
    assert np.array_equal(checkpointed, plain)


def test_true_cfg_negative_call_sees_the_moved_latent(flux):
    # FLUX encodes the negative prompt separately (the subjects need not be in it) and calls the transformer for it
    # under the "uncond" cache context: not guided, but on the same latent as the guided call.
    seen = []
    spy = flux.transformer.x_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with accel.patched(flux, "astar"):
            generate(flux, steps=2, true_cfg_scale=2.0, negative_prompt="blurry")
            assert [step for step, _ in _guidance_state(flux).losses] == [0, 1]
    finally:
        spy.remove()
    assert len(seen) == 6  # per step: the gradient pass, the guided call, the negative call
    for step in range(2):
        gradient_pass, guided, negative = seen[3 * step : 3 * step + 3]
        assert torch.equal(guided, negative) and not torch.equal(guided, gradient_pass)


def test_errors_name_the_prompt_words_and_the_fix(flux):
    with pytest.raises(InvalidOptionError, match="'dog' is not a word of the prompt.*'circle'"):
        with accel.patched(flux, "astar", tokens=["circle", "dog"]):
            generate(flux, steps=1)
    embeds, pooled, _ = flux.encode_prompt(PROMPT, max_sequence_length=TEXT_TOKENS)
    for method in ("astar", "structured"):
        with pytest.raises(InvalidOptionError, match="pass prompt=... instead of prompt_embeds"):
            with accel.patched(flux, method):
                generate(flux, None, steps=1, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        with pytest.raises(InvalidOptionError, match="pass the pipeline to accel.patch"):
            accel.patch(flux.transformer, method)
    with pytest.raises(InvalidOptionError, match="layers=... does not apply"):
        accel.patch(flux, "structured", layers=".*")
    with pytest.raises(InvalidOptionError, match="leave map_side out"):
        accel.patch(flux, "astar", map_side=8)
    with pytest.raises(accel.PatchConflictError, match="cannot be combined"):
        accel.patch(flux, [accel.AStarConfig(), accel.StructuredConfig()])
    with pytest.raises(InvalidOptionError, match="noun phrase 'a green star' is not in the prompt"):
        with accel.patched(flux, "structured", noun_phrases=["a green star"]):
            generate(flux, steps=1)
    assert accel.get_patch(flux) is None and "encode_prompt" not in vars(flux)


def test_structured_single_phrase_is_exact_and_phrases_change_the_output(flux):
    reference = generate(flux)
    before = model_fingerprint(flux.transformer)
    single = generate(flux, "a red circle")
    with accel.patched(flux, "structured", noun_phrases=[PROMPT]):
        assert np.array_equal(generate(flux), reference)
    with accel.patched(flux, "structured"):  # the prompt is one noun phrase
        assert np.array_equal(generate(flux, "a red circle"), single)
    with accel.patched(flux, "structured"):
        structured = generate(flux)
        hook = flux.transformer._diffusers_hook.get_hook("accel_structured_text")
        values = hook.encodings.items[-1].data
    assert np.abs(structured - reference).max() > 1e-5
    assert model_fingerprint(flux.transformer) == before and "encode_prompt" not in vars(flux)
    assert np.array_equal(generate(flux), reference)

    def encode(text):
        return flux.encode_prompt(text, max_sequence_length=TEXT_TOKENS)[0]

    whole, first, second = encode(PROMPT), encode("a red circle"), encode("a blue square")
    # T5 has no BOS: words 0-2 are tokens 0-2, words 4-6 are tokens 4-6 (one token per word in this vocabulary).
    copy_first, copy_second = whole.clone(), whole.clone()
    copy_first[:, 0:3] = first[:, 0:3]
    copy_second[:, 4:7] = second[:, 0:3]
    torch.testing.assert_close(values, (whole + copy_first + copy_second) / 3, atol=1e-6, rtol=1e-6)


def test_a_batch_of_prompts_with_different_subject_counts(flux):
    # Row by row: two subjects, one subject (A-STAR's first step has nothing to retain: a zero update), none.
    prompts = [PROMPT, "a red circle", "circles"]
    reference = generate(flux, prompts, steps=2)
    with accel.patched(flux, "astar"):
        guided = generate(flux, prompts, steps=2)
        state = _guidance_state(flux)
        assert state.positions == [[(2,), (6,)], [(2,)], []]
        assert [step for step, _ in state.losses] == [0, 1]
    assert np.abs(guided[0] - reference[0]).max() > 1e-2 and np.abs(guided[1] - reference[1]).max() > 1e-2
    # The row without subjects has no loss: its latent must not take the other rows' gradient.
    assert np.array_equal(guided[2], reference[2])


@pytest.mark.parametrize(
    "sparse",
    [{"name": "gna", "kernel_size": 5}, {"name": "vmoba", "blocks": [(4, 4), (2, 8)], "threshold": 0.25}],
    ids=["gna", "vmoba"],
)
def test_a_star_differentiates_through_a_sparse_method_on_earlier_blocks(flux, sparse):
    # A-STAR reads the single blocks' maps, so its gradient passes back through the double blocks' sparse attention:
    # the CPU path must give the explicit-mask reference's gradients.
    options = {key: value for key, value in sparse.items() if key != "name"}
    config_class = accel.registry.method_info(sparse["name"]).config_class
    early, late = r"transformer_blocks\..*", r"single_transformer_blocks\..*"
    images = {}
    for backend in ("torch", "reference"):
        with accel.patched(
            flux, [config_class(layers=early, backend=backend, **options), accel.AStarConfig(layers=late)]
        ):
            images[backend] = generate(flux)
    with accel.patched(flux, config_class(layers=early, **options)):
        unguided = generate(flux)
    assert np.abs(images["torch"] - images["reference"]).max() <= 1e-4
    assert np.abs(images["reference"] - unguided).max() > 1e-3


@pytest.mark.parametrize("method", ["astar", "structured"])
def test_a_pipeline_sharing_the_patched_transformer_is_told_it_is_not_controlled(flux, method, caplog):
    from diffusers import FluxImg2ImgPipeline

    other = FluxImg2ImgPipeline.from_pipe(flux)
    other.set_progress_bar_config(disable=True)

    def run_other(prompt):
        return generate(other, prompt, image=np.zeros((SIZE, SIZE, 3), dtype=np.float32), strength=0.9)

    unpatched = run_other(PROMPT)
    with accel.patched(flux, method), caplog.at_level("WARNING"):
        generate(flux, steps=2)
        assert "did not encode" not in caplog.text  # its own pipeline: no warning
        # The prompt its pipeline just encoded (same embeddings) is not controlled in the sibling's call either.
        assert np.array_equal(run_other(PROMPT), unpatched)
    assert f"{method}: the " in caplog.text and "its patched pipeline did not encode" in caplog.text
