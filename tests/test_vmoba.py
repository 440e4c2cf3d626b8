"""VMoBA: partitions, the global threshold selection vs brute force, the sparse path vs the explicit mask, pipelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import generate, model_fingerprint

import accel
from accel.errors import InvalidOptionError
from accel.kernels.vmoba import (
    block_attention_reference,
    block_attention_sparse,
    block_means,
    block_partition,
    select_blocks,
)
from accel.pipelines.vmoba import default_block_shape

PARTITIONS = [
    ((4, 6, 8), (2, None, None)),  # 1-D: whole frames
    ((4, 6, 8), (None, 3, 4)),  # 2-D: patches through all frames
    ((5, 6, 7), (2, 4, 3)),  # 3-D cubes, partial at the far borders
    ((12, 10), (4, 3)),  # an image grid
    ((9,), (4,)),
]


@pytest.mark.parametrize(("grid", "block"), PARTITIONS)
def test_partitions_cover_every_token_exactly_once(grid, block):
    partition = block_partition(grid, block)
    tokens = partition.block_tokens[partition.block_tokens >= 0]
    assert torch.equal(tokens.sort().values, torch.arange(math.prod(grid)))
    for index, members in enumerate(partition.block_tokens):
        members = members[members >= 0]
        assert members.numel() > 0 and (partition.block_of_token[members] == index).all()
        # A block is a box of the grid: its members' coordinates span at most the block's sides.
        coords = torch.stack(torch.unravel_index(members, grid), dim=-1)
        sides = [side if size is None else size for side, size in zip(grid, block, strict=True)]
        assert ((coords.amax(0) - coords.amin(0) + 1) <= torch.tensor(sides)).all()
    full_blocks = math.prod(side // (s if s else side) for side, s in zip(grid, block, strict=True))
    sizes = (partition.block_tokens >= 0).sum(dim=1)
    assert (sizes == partition.block_tokens.shape[1]).sum() >= full_blocks


@pytest.mark.parametrize(
    ("grid", "block", "words"),
    [
        ((4, 6, 8), (2, 3), "one side per grid axis"),
        ((4, 6, 8), (0, None, None), "must be a positive int"),
        ((4, 6, 8), (2, 7, None), "larger than the token grid (4, 6, 8) on axis 1 (7 > 6)"),
    ],
)
def test_bad_blocks_are_rejected_with_the_fix(grid, block, words):
    with pytest.raises(ValueError, match=None) as error:
        block_partition(grid, block)
    assert words in str(error.value)


def _brute_force_selection(query, key, partition, threshold):
    """Per (batch, head), in Python: normalise, keep own blocks, add the best other pairs until τ of the mass."""
    batch, tokens, heads, _ = query.shape
    blocks = partition.num_blocks
    means = block_means(key, partition)
    own = partition.block_of_token.tolist()
    selected = torch.zeros(batch, heads, tokens, blocks, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            gate = query[b, :, h].float() @ means[b, :, h].T  # [S, C]
            low, high = float(gate.min()), float(gate.max())
            spread = high - low if high > low else 1.0
            norm = ((gate - low) / spread).tolist()
            total = sum(map(sum, norm))
            reached = sum(norm[s][own[s]] for s in range(tokens))
            others = sorted(
                ((norm[s][c], s * blocks + c) for s in range(tokens) for c in range(blocks) if c != own[s]),
                key=lambda item: (-item[0], item[1]),
            )
            for s in range(tokens):
                selected[b, h, s, own[s]] = True
            for value, flat in others:
                if reached >= threshold * total:
                    break
                selected[b, h, flat // blocks, flat % blocks] = True
                reached += value
    return selected


@pytest.mark.parametrize(("grid", "block"), PARTITIONS[:4])
@pytest.mark.parametrize("threshold", [0.1, 0.25, 0.5, 0.9])
def test_selection_equals_brute_force(grid, block, threshold):
    generator = torch.Generator().manual_seed(7)
    tokens = math.prod(grid)
    query, key = (torch.randn(2, tokens, 2, 8, generator=generator) for _ in range(2))
    partition = block_partition(grid, block)
    ours = select_blocks(query, key, partition, threshold, max_chunk_bytes=1)
    assert torch.equal(ours, _brute_force_selection(query, key, partition, threshold))


def test_selection_keeps_own_blocks_and_grows_with_the_threshold():
    generator = torch.Generator().manual_seed(3)
    query, key = (torch.randn(1, 120, 3, 8, generator=generator) for _ in range(2))
    partition = block_partition((12, 10), (4, 3))
    own = F.one_hot(partition.block_of_token, partition.num_blocks).bool()
    previous = None
    for threshold in (0.05, 0.2, 0.4, 0.8, 1.0):
        selected = select_blocks(query, key, partition, threshold)
        assert (selected | ~own).all()
        if previous is not None:
            assert (selected | ~previous).all() and selected.sum() >= previous.sum()
        previous = selected
    assert previous.all()


@pytest.mark.parametrize(("grid", "block"), PARTITIONS)
@pytest.mark.parametrize("text", ["none", "text", "padded text", "all padding"])
def test_sparse_path_equals_the_explicit_mask(grid, block, text):
    generator = torch.Generator().manual_seed(11)
    tokens = math.prod(grid)
    q, k, v = (torch.randn(2, tokens, 3, 8, generator=generator) for _ in range(3))
    extra = {}
    if text != "none":
        extra = dict(extra_key=torch.randn(2, 4, 3, 8), extra_value=torch.randn(2, 4, 3, 8))
    if text == "padded text":
        extra["extra_mask"] = torch.tensor([[True, True, False, False], [True] * 4])
    if text == "all padding":  # the second sample has no text at all: its visual keys alone
        extra["extra_mask"] = torch.tensor([[True, True, False, False], [False] * 4])
    partition = block_partition(grid, block)
    selected = select_blocks(q, k, partition, 0.3)
    reference = block_attention_reference(q, k, v, partition, selected, **extra)
    # A small budget forces several chunks of groups.
    ours = block_attention_sparse(q, k, v, partition, selected, max_chunk_bytes=30_000, **extra)
    assert (ours - reference).abs().max() <= 1e-5


def test_gradients_through_the_sparse_path_match_the_explicit_mask():
    # Latent guidance (A-STAR composed with VMoBA) differentiates through the log-sum-exp merges.
    generator = torch.Generator().manual_seed(11)
    grid, block = (4, 6, 6), (2, 3, 3)
    inputs = [torch.randn(2, math.prod(grid), 3, 8, generator=generator) for _ in range(3)]
    extra = dict(
        extra_key=torch.randn(2, 4, 3, 8, generator=generator),
        extra_value=torch.randn(2, 4, 3, 8, generator=generator),
        extra_mask=torch.tensor([[True, True, False, False], [True] * 4]),
    )
    partition = block_partition(grid, block)
    selected = select_blocks(*inputs[:2], partition, 0.3)
    grads = []
    for attend, options in ((block_attention_reference, {}), (block_attention_sparse, {"max_chunk_bytes": 30_000})):
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        out = attend(q, k, v, partition, selected, **extra, **options)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for expected, actual in zip(*grads, strict=True):
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-4)


def test_threshold_one_is_dense_attention():
    q, k, v = (torch.randn(1, 96, 2, 8) for _ in range(3))
    partition = block_partition((4, 4, 6), (2, 2, 3))
    selected = select_blocks(q, k, partition, 1.0)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert (block_attention_sparse(q, k, v, partition, selected) - dense).abs().max() <= 1e-6


def test_default_blocks_cycle_frames_patches_and_cubes():
    grid = (30, 48, 80)
    shapes = [default_block_shape("hunyuanvideo", index)(grid) for index in range(4)]
    # A tenth of the frames; a tenth x a thirteenth of rows x cols; cubes grown to at least 1024 tokens.
    assert shapes == [(3, None, None), (None, 5, 7), (9, 14, 10), (3, None, None)]
    assert default_block_shape("flux", 5)((256, 256)) == (32, 32)
    # Grids smaller than a block are one block: dense attention.
    assert default_block_shape("hunyuanvideo", 2)((3, 8, 8)) == (3, 8, 8)


FAMILIES = ("flux-tiny", "hunyuanvideo-tiny")
# The tiny pipelines' grids (FLUX 8x8, HunyuanVideo 3x8x8) are smaller than a default block: name small ones.
SMALL_BLOCKS = {"flux-tiny": [(4, 4), (2, 8)], "hunyuanvideo-tiny": [(1, None, None), (None, 4, 4), (1, 4, 4)]}


@pytest.mark.parametrize("pipeline", FAMILIES, indirect=True)
def test_threshold_one_equals_unpatched_and_the_sparse_paths_agree(pipeline, request, caplog):
    name = request.node.callspec.params["pipeline"]
    reference = generate(pipeline, name)
    before = model_fingerprint(pipeline.transformer)
    accel.patch(pipeline, "vmoba", threshold=1.0)
    assert np.array_equal(generate(pipeline, name), reference)
    accel.patch(pipeline, "vmoba", threshold=0.25)
    with caplog.at_level("WARNING", logger="accel.processors.vmoba"):
        assert np.array_equal(generate(pipeline, name), reference)  # default blocks hold the whole tiny grid
        generate(pipeline, name)
    assert caplog.text.count("token grid is one block") == 1  # said once per patch, not per layer and step
    assert "attend densely" in caplog.text and "so all layers attend densely" in caplog.text
    blocks = SMALL_BLOCKS[name]
    accel.patch(pipeline, "vmoba", threshold=0.25, blocks=blocks)
    sparse = generate(pipeline, name)
    assert np.isfinite(sparse).all() and np.abs(sparse - reference).max() > 1e-3
    accel.patch(pipeline, "vmoba", threshold=0.25, blocks=blocks, backend="reference")
    assert np.abs(generate(pipeline, name) - sparse).max() <= 1e-4
    from accel.kernels.block_sparse import triton_usable

    if triton_usable("cpu"):  # the Triton kernel under the interpreter (natively on a GPU)
        accel.patch(pipeline, "vmoba", threshold=0.25, blocks=blocks, backend="triton")
        assert np.abs(generate(pipeline, name) - sparse).max() <= 1e-4
    accel.patch(pipeline, "vmoba", threshold=0.25, blocks=blocks, dense_steps=2)
    assert np.array_equal(generate(pipeline, name), reference)  # both steps dense
    accel.unpatch(pipeline)
    assert model_fingerprint(pipeline.transformer) == before
    assert np.array_equal(generate(pipeline, name), reference)


def _patched_block_shapes(pipe, grid) -> list[tuple[int | None, ...]]:
    """The block shape each patched layer uses at ``grid``, layers in the denoiser's order."""
    from accel.processors.vmoba import _BlockAttend

    processors = [p for p in pipe.transformer.attn_processors.values() if isinstance(p, _BlockAttend)]
    return [processor.block_shape(grid) for processor in processors]


@pytest.mark.parametrize("pipeline", ["hunyuanvideo-tiny"], indirect=True)
def test_consecutive_layers_cycle_through_the_block_shapes(pipeline):
    # VMoBA's layer-wise recurrent partitions: layer i takes shape i mod len(cycle), for the configured blocks and for
    # the default frames / patches / cubes cycle alike (hunyuanvideo-tiny patches 2 double and 4 single blocks).
    a, b = (1, None, None), (None, 4, 4)
    with accel.patched(pipeline, "vmoba", blocks=[a, b]) as handle:
        shapes = _patched_block_shapes(pipeline, (3, 8, 8))
        assert len(shapes) == len(handle.layers) == 6
    assert shapes == [a, b, a, b, a, b]
    grid = (30, 48, 80)
    with accel.patched(pipeline, "vmoba"):
        shapes = _patched_block_shapes(pipeline, grid)
    cycle = [default_block_shape("hunyuanvideo", index)(grid) for index in range(3)]
    assert len(set(cycle)) == 3 and shapes == cycle * 2


@pytest.mark.parametrize("pipeline", ["hunyuanvideo-tiny"], indirect=True)
def test_a_grid_that_is_one_block_for_some_layers_only_says_which(pipeline, caplog):
    # 128 px, 9 frames: 3x8x8 tokens. Frame blocks (1, all, all) split it in 3; a whole cube (all, all, all) does
    # not, and only the layers with it attend densely.
    with caplog.at_level("WARNING", logger="accel.processors.vmoba"):
        with accel.patched(pipeline, "vmoba", threshold=0.25, blocks=[(1, None, None), (None, None, None)]):
            generate(pipeline, "hunyuanvideo-tiny")
    assert (
        "the 3x8x8 token grid is one block of allxallxall, so the layers with that block shape attend" in caplog.text
    )


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("pipeline", FAMILIES, indirect=True)
def test_every_block_selected_through_the_sparse_path_equals_unpatched(pipeline, backend, request, monkeypatch):
    # threshold=1 returns before the sparse path; selecting every block runs it whole, so padded text keys must
    # stay masked there too (hunyuanvideo-tiny pads 24 of its 32 text tokens).
    import accel.processors.vmoba as vmoba_processors

    name = request.node.callspec.params["pipeline"]
    reference = generate(pipeline, name)

    def every_block(query, key, partition, threshold):
        return torch.ones(
            query.shape[0], query.shape[2], query.shape[1], partition.num_blocks, dtype=torch.bool, device=query.device
        )

    monkeypatch.setattr(vmoba_processors, "select_blocks", every_block)
    accel.patch(pipeline, "vmoba", threshold=0.5, blocks=SMALL_BLOCKS[name][:1], backend=backend)
    assert np.abs(generate(pipeline, name) - reference).max() <= 1e-5


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(threshold=0), "threshold=0 must be a share"),
        (dict(threshold=1.5), "(0, 1]"),
        (dict(blocks=[]), "non-empty list of block shapes"),
        (dict(blocks=[(2, 0, None)]), "must hold positive ints or None"),
        (dict(blocks=[(2, 4)]), "block (2, 4) has 2 sides but hunyuanvideo token grids have 3"),
        (dict(backend="cuda"), "backend='cuda' must be one of auto, torch, triton, reference"),
    ],
)
def test_bad_configs_are_refused(tiny_pipelines, options, words):
    pipe = tiny_pipelines["hunyuanvideo-tiny"]
    before = model_fingerprint(pipe.transformer)
    with pytest.raises(InvalidOptionError, match=None) as error:
        accel.patch(pipe, "vmoba", **options)
    assert words in str(error.value)
    assert model_fingerprint(pipe.transformer) == before and accel.get_patch(pipe) is None


def test_blocks_larger_than_the_grid_name_it_at_call_time(tiny_pipelines):
    pipe = tiny_pipelines["hunyuanvideo-tiny"]
    with accel.patched(pipe, "vmoba", blocks=[(1, 100, None)]):
        with pytest.raises(ValueError, match=r"at token grid \(\d+, \d+, \d+\).*larger than the token grid"):
            generate(pipe, "hunyuanvideo-tiny")


def test_unets_are_refused(tiny_pipelines):
    with pytest.raises(accel.UnsupportedModelError, match="vmoba"):
        accel.patch(tiny_pipelines["sd15-tiny"], "vmoba")
