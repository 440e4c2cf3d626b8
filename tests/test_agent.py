"""Agent attention: kernel vs explicit reference, token merging vs brute force, processors, schedule, memory."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from helpers import PeakMemory, generate, model_fingerprint

import accel
from accel.config import AgentConfig
from accel.errors import InvalidOptionError
from accel.kernels.agent import (
    agent_attention,
    agent_attention_reference,
    bipartite_merge,
    destination_mask,
    grid_pool,
    pooled_grid,
)
from accel.pipelines.agent import settings_for
from accel.processors.agent import (
    AgentAttnProcessor,
    AgentFluxAttnProcessor,
    AgentHunyuanVideoAttnProcessor,
    AgentSettings,
)
from accel.processors.dense import AttentionCall
from accel.processors.state import LatentLayout, PatchContext, StepState

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_text", ["none", "text", "padded text", "counts only"])
def test_agent_attention_matches_the_explicit_reference(dtype, with_text):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 48, 3, 16, generator=generator).to(dtype) for _ in range(3))
    agents = torch.randn(2, 6, 3, 16, generator=generator).to(dtype)
    extra = {}
    if with_text != "none":
        extra["agent_log_counts"] = torch.rand(6, generator=generator) * 3
    if with_text in ("text", "padded text"):
        extra["extra_key"] = torch.randn(2, 5, 3, 16, generator=generator).to(dtype)
        extra["extra_value"] = torch.randn(2, 5, 3, 16, generator=generator).to(dtype)
    if with_text == "padded text":
        extra["extra_mask"] = torch.tensor([[True, True, False, False, False], [True] * 5])
    options = dict(scale=0.25, agent_scale=0.25**0.3, shortcut=0.075, **extra)
    ours = agent_attention(q, k, v, agents, **options)
    reference = agent_attention_reference(q, k, v, agents, **options)
    assert ours.dtype == dtype and ours.shape == q.shape
    assert (ours.float() - reference).abs().max() <= TOLERANCE[dtype]


def test_log_counts_weigh_agents_against_the_text_keys():
    q, k, v = (torch.randn(1, 16, 1, 8) for _ in range(3))
    agents, text = torch.randn(1, 4, 1, 8), torch.randn(1, 3, 1, 8)
    options = dict(scale=8**-0.5, agent_scale=8**-0.5, shortcut=0.0, extra_key=text, extra_value=text)
    plain = agent_attention(q, k, v, agents, **options)
    weighted = agent_attention(q, k, v, agents, agent_log_counts=torch.full((4,), math.log(4.0)), **options)
    assert (plain - weighted).abs().max() > 1e-3
    # Without extra keys a constant log count cancels in the softmax.
    alone = dict(scale=0.3, agent_scale=0.5, shortcut=0.1)
    assert torch.allclose(
        agent_attention(q, k, v, agents, **alone),
        agent_attention(q, k, v, agents, agent_log_counts=torch.full((4,), 2.0), **alone),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("grid", "pooled"), [((8,), (3,)), ((6, 9), (2, 4)), ((5, 7), (5, 7)), ((3, 4, 6), (2, 2, 3))]
)
def test_grid_pool_matches_cell_means(grid, pooled):
    tokens = torch.randn(2, math.prod(grid), 2, 3)
    ours, log_counts = grid_pool(tokens, grid, pooled)
    spatial = tokens.reshape(2, *grid, 2, 3)
    expected, counts = [], []
    for cell in np.ndindex(*pooled):
        # Adaptive pooling's cells: [floor(i L / n), ceil((i + 1) L / n)) per axis.
        region = tuple(
            slice((i * side) // out, -(-(i + 1) * side // out))
            for i, side, out in zip(cell, grid, pooled, strict=True)
        )
        block = spatial[(slice(None), *region)]
        expected.append(block.reshape(2, -1, 2, 3).mean(dim=1))
        counts.append(block[0].reshape(-1, 6).shape[0])
    assert torch.allclose(ours, torch.stack(expected, dim=1), atol=1e-6)
    assert torch.allclose(log_counts.exp(), torch.tensor(counts, dtype=torch.float32))


def test_pooled_grid_keeps_the_ratio():
    assert pooled_grid((64, 64), 1 / 16) == (16, 16)
    assert pooled_grid((30, 48, 80), 1 / 16) == (12, 19, 32)
    assert pooled_grid((2, 3), 1 / 1000) == (1, 1)
    # A video's single latent frame cannot shrink; the image axes take its share (was (1, 13, 13): 1 / 6).
    assert pooled_grid((1, 32, 32), 1 / 16) == (1, 8, 8)
    for grid in [(2, 32, 32), (3, 32, 32), (1, 18, 32), (1, 45, 80), (5, 30, 52)]:
        assert math.prod(grid) / math.prod(pooled_grid(grid, 1 / 16)) == pytest.approx(16, rel=0.05)


def test_destinations_are_one_per_whole_cell_and_seeded():
    mask = destination_mask((9, 10), (4, 4), torch.Generator().manual_seed(3)).reshape(9, 10)
    assert mask.sum() == 2 * 2
    for row in range(2):
        for col in range(2):
            assert mask[4 * row : 4 * row + 4, 4 * col : 4 * col + 4].sum() == 1
    assert not mask[8:].any() and not mask[:, 8:].any()  # partial border cells hold only sources
    again = destination_mask((9, 10), (4, 4), torch.Generator().manual_seed(3)).reshape(9, 10)
    assert torch.equal(mask, again)
    corner = destination_mask((4, 4), (2, 2), None).reshape(4, 4)
    assert corner[::2, ::2].all() and corner.sum() == 4


def _brute_force_merge(metric, tokens, grid, cell, removed, generator_seed):
    """Per sample and per source token: the most similar destination (cosine), the best ``removed`` merged away."""
    is_dst = destination_mask(grid, cell, torch.Generator().manual_seed(generator_seed))
    dst = [i for i in range(is_dst.numel()) if is_dst[i]]
    src = [i for i in range(is_dst.numel()) if not is_dst[i]]
    merged_rows = []
    for b in range(metric.shape[0]):
        normed = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        best = {s: max(dst, key=lambda d: float(normed[s] @ normed[d])) for s in src}
        score = {s: float(normed[s] @ normed[best[s]]) for s in src}
        ranked = sorted(src, key=lambda s: -score[s])
        moved, kept = ranked[:removed], ranked[removed:]
        groups = {d: [d] + [s for s in moved if best[s] == d] for d in dst}
        rows = [tokens[b, s] for s in kept] + [tokens[b, groups[d]].mean(dim=0) for d in dst]
        merged_rows.append((torch.stack(rows), best, moved, groups))
    return merged_rows


@pytest.mark.parametrize(
    ("grid", "cell", "removed"), [((8, 8), (2, 2), 20), ((6, 9), (4, 4), 40), ((8, 8), (4, 4), 0)]
)
def test_token_merging_matches_brute_force(grid, cell, removed):
    generator = torch.Generator().manual_seed(1)
    metric = torch.randn(2, math.prod(grid), 6, generator=generator)
    tokens = torch.randn(2, math.prod(grid), 4, generator=generator)
    matching = bipartite_merge(metric, grid, cell, removed, draws=torch.Generator().manual_seed(5))
    merged = matching.merge(tokens)
    expected = _brute_force_merge(metric, tokens, grid, cell, removed, 5)
    for b, (rows, _, moved, groups) in enumerate(expected):
        assert torch.allclose(merged[b], rows, atol=1e-6)
        # Unmerging gives every merged source its destination's row and every other token its own.
        spread = matching.unmerge(merged)[b]
        for members in groups.values():
            for member in members:
                assert torch.allclose(spread[member], tokens[b, members].mean(dim=0), atol=1e-6)
        alone = [i for i in range(tokens.shape[1]) if i not in moved and groups.get(i, [i]) == [i]]
        assert torch.equal(spread[alone], tokens[b, alone])


def test_agents_are_destinations_averaged_with_all_their_matches():
    grid, cell = (8, 8), (4, 4)
    metric = torch.randn(1, 64, 5, generator=torch.Generator().manual_seed(2))
    matching = bipartite_merge(metric, grid, cell, removed=10, agent_removed=64 - 4, draws=None)
    agents = matching.agents(metric)
    # Every source merged: one agent per cell, its (corner) destination averaged with the sources that chose it.
    normed = metric[0] / metric[0].norm(dim=-1, keepdim=True)
    dst = destination_mask(grid, cell, None).nonzero().squeeze(1).tolist()
    best = {s: max(dst, key=lambda d: float(normed[s] @ normed[d])) for s in range(64) if s not in dst}
    groups = [[d] + [s for s, chosen in best.items() if chosen == d] for d in dst]
    assert torch.allclose(agents[0], torch.stack([metric[0, g].mean(dim=0) for g in groups]), atol=1e-6)


def _layer(unet):
    return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1


def _settings(**overrides) -> AgentSettings:
    """The UNet defaults (AgentSD's early-phase recipe), with ``overrides``."""
    return dataclasses.replace(settings_for(AgentConfig(), "unet"), **overrides)


def _context(grid, progress=0.0) -> PatchContext:
    return PatchContext(
        family="unet",
        step=StepState(
            timestep=999 * (1 - progress), step_index=round(10 * progress), num_steps=10, progress=progress
        ),
        layout=LatentLayout(grid=grid, batch_size=2),
    )


@pytest.mark.parametrize("pooling", ["merge", "grid"])
def test_unet_processor_composes_merge_agents_and_unmerge(tiny_pipelines, pooling, monkeypatch):
    attn = _layer(tiny_pipelines["sd15-tiny"].unet)
    grid = (16, 16)
    hidden = torch.randn(2, 256, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    processor = AgentAttnProcessor(context=_context(grid), layer="layer", settings=_settings(pooling=pooling))
    matchings = []
    import accel.processors.agent as agent_module

    def recording(*args, **kwargs):
        matchings.append(bipartite_merge(*args, **kwargs))
        return matchings[-1]

    monkeypatch.setattr(agent_module, "bipartite_merge", recording)
    with torch.no_grad():
        ours = processor(attn, hidden)
        matching = matchings[0]
        merged = matching.merge(hidden)
        if pooling == "merge":
            agent_states = matching.agents(hidden)
        else:
            agent_states, _ = grid_pool(hidden, grid, (4, 4))
        heads = attn.heads

        def split(x):
            return x.unflatten(-1, (heads, -1))

        q, k, v = split(attn.to_q(merged)), split(attn.to_k(merged)), split(attn.to_v(merged))
        agents = split(attn.to_q(agent_states))
        d = q.shape[-1]
        out = agent_attention_reference(q, k, v, agents, scale=d**-0.5, agent_scale=d**-0.15, shortcut=0.075)
        expected = matching.unmerge(attn.to_out[0](out.flatten(2)))
    assert agent_states.shape[1] == 16 and merged.shape[1] == 256 - int(0.4 * 256)
    assert (ours - expected).abs().max() <= 1e-5


def _grid_cells(grid, pooled):
    """Token indices of each pooled cell (adaptive pooling's cells [floor(i L / n), ceil((i + 1) L / n)) per axis,
    which may overlap), agents in row-major order."""
    ranges = [
        [range(i * side // count, -(-(i + 1) * side // count)) for i in range(count)]
        for side, count in zip(grid, pooled, strict=True)
    ]
    strides = [math.prod(grid[axis + 1 :]) for axis in range(len(grid))]
    cells = []
    for per_axis in itertools.product(*ranges):
        cells.append(
            [sum(c * s for c, s in zip(coords, strides, strict=True)) for coords in itertools.product(*per_axis)]
        )
    return cells


def _joint_agent_reference(query, key, value, grid, pooled, text, text_first, key_mask):
    """DiT agent attention written out in fp64 from its definition, on ``[B, S, H, D]`` joint tensors.

    Text queries attend every (unpadded) key exactly. The agents are the image queries averaged over the grid's
    cells; they aggregate the image keys (softmax at d^-0.5). Image queries take one softmax over the agents (at
    d^-0.15, plus log(tokens the agent pools)) and the text keys (at d^-0.5), plus the 0.075 value shortcut.
    """
    q, k, v = (t.double().transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]
    d = q.shape[-1]
    visual = slice(text, None) if text_first else slice(0, q.shape[2] - text)
    text_part = slice(0, text) if text_first else slice(q.shape[2] - text, None)
    bias = torch.zeros(key_mask.shape, dtype=torch.float64).masked_fill(~key_mask, float("-inf"))[:, None, None]
    text_out = torch.softmax(q[:, :, text_part] @ k.transpose(-1, -2) * d**-0.5 + bias, dim=-1) @ v
    qv, kv, vv = q[:, :, visual], k[:, :, visual], v[:, :, visual]
    cells = _grid_cells(grid, pooled)
    agents = torch.stack([qv[:, :, cell].mean(dim=2) for cell in cells], dim=2)
    log_counts = torch.tensor([math.log(len(cell)) for cell in cells], dtype=torch.float64)
    agent_values = torch.softmax(agents @ kv.transpose(-1, -2) * d**-0.5, dim=-1) @ vv
    agent_logits = qv @ agents.transpose(-1, -2) * d**-0.15 + log_counts
    text_logits = qv @ k[:, :, text_part].transpose(-1, -2) * d**-0.5 + bias[..., text_part]
    weights = torch.softmax(torch.cat([agent_logits, text_logits], dim=-1), dim=-1)
    visual_out = weights @ torch.cat([agent_values, v[:, :, text_part]], dim=2) + 0.075 * vv
    parts = [text_out, visual_out] if text_first else [visual_out, text_out]
    return torch.cat(parts, dim=2).transpose(1, 2)


@pytest.mark.parametrize(
    ("processor_class", "family", "grid", "ratio", "text_first", "padded"),
    [
        (AgentFluxAttnProcessor, "flux", (6, 7), 1 / 6, True, 0),  # 2x4 agents pooling 6 or 9 tokens
        (AgentHunyuanVideoAttnProcessor, "hunyuanvideo", (3, 5, 7), 1 / 9, False, 2),  # 1x3x4, 12 to 27 tokens
    ],
)
def test_dit_processor_matches_agent_attention_written_out(processor_class, family, grid, ratio, text_first, padded):
    # The joint processor's split (text exact, image queries on agents plus text keys) and its agents' weights by
    # the tokens they pool: without those weights the text keys would take far more than their share.
    settings = dataclasses.replace(settings_for(AgentConfig(), family), agent_ratio=ratio)
    assert (settings.scale_exponent, settings.shortcut) == (0.3, 0.075)
    context = PatchContext(
        family=family,
        step=StepState(timestep=999.0, step_index=0, num_steps=10, progress=0.0),
        layout=LatentLayout(grid=grid, text_tokens=5, text_first=text_first, batch_size=2),
    )
    processor = processor_class(context=context, layer="layer", settings=settings)
    visual, text = math.prod(grid), 5
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, visual + text, 2, 16, generator=generator) for _ in range(3))
    key_mask = torch.ones(2, visual + text, dtype=torch.bool)
    if padded:
        key_mask[0, -padded:] = False  # HunyuanVideo pads the first prompt's text (last in its sequence)
    call = AttentionCall(kind="joint", visual_tokens=visual, text_tokens=text, text_first=text_first)
    with torch.no_grad():
        ours = processor.attend(query, key, value, key_mask[:, None, None] if padded else None, call)
    expected = _joint_agent_reference(query, key, value, grid, pooled_grid(grid, ratio), text, text_first, key_mask)
    assert len(_grid_cells(grid, pooled_grid(grid, ratio))) * 2 < visual  # agents run: fewer than half the tokens
    assert ours.shape == query.shape and (ours.double() - expected).abs().max() <= 1e-5


def test_unet_processor_late_phase_merges_without_agents(tiny_pipelines, monkeypatch):
    attn = _layer(tiny_pipelines["sd15-tiny"].unet)
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    calls = []
    import accel.processors.agent as agent_module

    monkeypatch.setattr(agent_module, "agent_attention", lambda *a, **k: calls.append(1))
    processor = AgentAttnProcessor(context=_context((8, 8), progress=0.5), layer="layer", settings=_settings())
    with torch.no_grad():
        out = processor(attn, hidden)
    assert not calls and out.shape == hidden.shape
    # Merged pairs share one output row: 2x2 cells, 40 % of 64 tokens merged away.
    assert len({tuple(row.tolist()) for row in out[0]}) == 64 - int(0.4 * 64)


@pytest.mark.parametrize("pipeline", ["sd15-tiny", "sdxl-tiny", "flux-tiny", "hunyuanvideo-tiny"], indirect=True)
def test_agents_as_many_as_tokens_is_dense_and_unpatch_restores(pipeline, request):
    name = request.node.callspec.params["pipeline"]
    unet = name.startswith("sd")
    denoiser = pipeline.unet if unet else pipeline.transformer
    reference = generate(pipeline, name, steps=3)
    before = model_fingerprint(denoiser)
    no_merging = dict(merge_ratio=0.0, late_merge_ratio=0.0) if unet else {}
    accel.patch(pipeline, "agent", agent_ratio=1.0, agent_steps=1.0, **no_merging)
    assert np.array_equal(generate(pipeline, name, steps=3), reference)
    accel.patch(pipeline, "agent", agent_steps=1.0)
    changed = generate(pipeline, name, steps=3)
    assert np.isfinite(changed).all() and np.abs(changed - reference).max() > 1e-3
    accel.unpatch(pipeline)
    assert model_fingerprint(denoiser) == before
    assert np.array_equal(generate(pipeline, name, steps=3), reference)


def test_default_layers_are_the_top_attention_level(tiny_pipelines):
    for name, prefixes in (
        ("sd15-tiny", ("down_blocks.0.", "up_blocks.3.")),
        ("sdxl-tiny", ("down_blocks.1.", "up_blocks.1.")),
    ):
        pipe = tiny_pipelines[name]
        try:
            layers = accel.patch(pipe, "agent").layers
        finally:
            accel.unpatch(pipe)
        assert layers and all(layer.startswith(prefixes) and layer.endswith("attn1") for layer in layers)


def _phases(pipe, monkeypatch, run, **config):
    """Per UNet call of the first agent layer: ("agents" | "merge", merge cell)."""
    import accel.processors.agent as agent_module

    events = []
    original_attention, original_merge = agent_module.agent_attention, agent_module.bipartite_merge

    def attention(*args, **kwargs):
        events.append("agents")
        return original_attention(*args, **kwargs)

    def merge(metric, grid, cell, *args, **kwargs):
        events.append(cell)
        return original_merge(metric, grid, cell, *args, **kwargs)

    monkeypatch.setattr(agent_module, "agent_attention", attention)
    monkeypatch.setattr(agent_module, "bipartite_merge", merge)
    with accel.patched(pipe, "agent", layers=r"down_blocks\.0\.attentions\.0\..*attn1", **config):
        run()
    return events


def test_phase_switch_follows_the_schedule_under_guidance_and_img2img(tiny_pipelines, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline

    sd = tiny_pipelines["sd15-tiny"]
    sd.set_progress_bar_config(disable=True)
    events = _phases(sd, monkeypatch, lambda: generate(sd, "sd15-tiny", steps=5, guidance_scale=7.5), agent_steps=0.4)
    # One batched CFG call per step: 2 of 5 steps with agents (4x4 cells), 3 merging only (2x2 cells).
    assert events == [(4, 4), "agents"] * 2 + [(2, 2)] * 3
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)

    def run():
        img2img(
            "a red circle",
            image=torch.rand(1, 3, 128, 128),
            strength=0.8,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )

    # strength 0.8 of 5 steps starts at step 1 (progress 0.2): one agent step, then three merging ones.
    assert _phases(sd, monkeypatch, run, agent_steps=0.4) == [(4, 4), "agents"] + [(2, 2)] * 3


def test_a_run_entering_the_schedule_past_the_agent_phase_says_so(tiny_pipelines, caplog):
    from diffusers import FluxImg2ImgPipeline

    flux = FluxImg2ImgPipeline(**tiny_pipelines["flux-tiny"].components)
    flux.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def run(strength: float) -> np.ndarray:
        return flux(
            "a red circle",
            image=image,
            height=64,
            width=64,
            strength=strength,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    plain = run(0.6)
    with accel.patched(flux, "agent", agent_ratio=1 / 4), caplog.at_level("WARNING", logger="accel.processors.agent"):
        guided = run(0.8)  # enters at 0.2: one agent step
        assert "past agent_steps" not in caplog.text
        skipped = run(0.6)  # enters at 0.4, the default agent_steps: no agent step, which is said once
        run(0.6)
    assert not np.array_equal(guided, run(0.8))
    assert np.array_equal(skipped, plain)
    assert (
        caplog.text.count(
            "this run enters the schedule at 0.40 (img2img / inpaint strength or denoising_start), past agent_steps"
        )
        == 1
    )


def test_a_run_entering_where_the_last_one_stopped_is_a_new_run(tiny_pipelines, caplog):
    # sd15's img2img keeps accel's step hook across calls: a full 4-step run stops at progress 0.75, and a run
    # entering at 0.75 is told apart by the new schedule the scheduler makes for it.
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**tiny_pipelines["sd15-tiny"].components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with accel.patched(img2img, "agent"), caplog.at_level("WARNING", logger="accel.processors.agent"):
        for strength in (1.0, 0.25):
            img2img("a red circle", image=image, strength=strength, num_inference_steps=4, output_type="latent")
    assert (
        "enters the schedule at 0.75 (img2img / inpaint strength or denoising_start), past agent_steps" in caplog.text
    )


def test_seeded_destinations_are_reproducible_and_leave_the_global_rng_alone(tiny_pipelines):
    # A draw from the global RNG would make the destinations depend on what ran before and shift the user's own
    # random numbers; comparing the global state itself catches it (reseeding before two runs would hide it).
    state = torch.random.get_rng_state()
    destination_mask((8, 8), (2, 2), torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    sd = tiny_pipelines["sd15-tiny"]
    with accel.patched(sd, "agent", agent_steps=1.0):
        torch.manual_seed(123)
        state = torch.random.get_rng_state()
        first = generate(sd, "sd15-tiny")
        assert torch.equal(torch.random.get_rng_state(), state)
        torch.manual_seed(456)  # another global state: the seeded destinations must not follow it
        second = generate(sd, "sd15-tiny")
    assert np.array_equal(first, second)
    with accel.patched(sd, "agent", agent_steps=1.0, seed=7):
        assert not np.array_equal(generate(sd, "sd15-tiny"), first)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(agent_ratio=0), "agent_ratio=0 must be a share"),
        (dict(agent_ratio=1.5), "in (0, 1]"),
        (dict(agent_ratio="1/16"), "agent_ratio='1/16'"),
        (dict(pooling="merge", agent_ratio=0.01), "raise it to ≥ 0.0625"),
        (dict(pooling="mean"), "pooling='mean' must be one of merge, grid"),
        (dict(agent_steps=1.5), "fraction of the schedule"),
        (dict(merge_ratio=1.0), "merge_ratio=1.0 must be a share"),
        (dict(cell=0), "cell=0 must be a positive int"),
        (dict(scale_exponent=0), "scale_exponent=0 must be a positive"),
        (dict(agent_rate=0.1), "Did you mean 'agent_ratio'"),
    ],
)
def test_bad_configs_are_refused(tiny_pipelines, options, words):
    with pytest.raises(InvalidOptionError, match=None) as error:
        accel.patch(tiny_pipelines["sd15-tiny"], "agent", **options)
    assert words in str(error.value)
    assert accel.get_patch(tiny_pipelines["sd15-tiny"]) is None


def test_token_merging_is_refused_on_transformers(tiny_pipelines):
    flux = tiny_pipelines["flux-tiny"]
    for options, words in ((dict(pooling="merge"), "use pooling='grid'"), (dict(merge_ratio=0.3), "for UNets")):
        with pytest.raises(InvalidOptionError, match=None) as error:
            accel.patch(flux, "agent", **options)
        assert words in str(error.value)


def _unet_layer_peak(attn, tokens: int) -> int:
    side = math.isqrt(tokens)
    hidden = torch.randn(2, tokens, attn.to_q.in_features)
    processor = AgentAttnProcessor(context=_context((side, side)), layer="layer", settings=_settings())
    with torch.no_grad(), PeakMemory() as memory:
        processor(attn, hidden)
    return memory.peak


def test_memory_grows_linearly_in_tokens(tiny_pipelines):
    attn = _layer(tiny_pipelines["sd15-tiny"].unet)
    growth = _unet_layer_peak(attn, 16384) / _unet_layer_peak(attn, 4096)
    assert growth <= 4.2, f"peak memory grew {growth:.1f}x for 4x the tokens"
    # The measurement sees quadratic tensors: explicit scores grow 16x.
    peaks = []
    for tokens in (4096, 16384):
        q = torch.randn(1, 1, tokens, 8)
        with PeakMemory() as memory:
            torch.softmax(q @ q.transpose(-1, -2), dim=-1)
        peaks.append(memory.peak)
    assert peaks[1] / peaks[0] >= 15
