"""Memory the CPU kernels hold: the graph GNA and VMoBA keep for backward, selection's temporaries, pair indices and
GNA's kept scratch buffer. Each bound is derived from the shapes, next to the same-math checks that the bounded paths
still compute the reference's values and gradients."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from accel.kernels import neighborhood, vmoba
from accel.kernels.neighborhood import Neighborhood, neighborhood_attention_reference, neighborhood_attention_tiled
from accel.kernels.vmoba import block_attention_reference, block_attention_sparse, block_partition, select_blocks


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def _saved_bytes(run, inputs):
    """``(output, bytes)``: what ``run()`` saves for backward, each storage once, the inputs' own storages aside."""
    inputs = {tensor.untyped_storage().data_ptr() for tensor in inputs if tensor is not None}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, sum(saved.values())


def _gradients(attend, inputs):
    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    out = attend(*leaves)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [x.grad for x in leaves if x is not None]


def _assert_same_gradients(actual, expected):
    for got, want in zip(actual, expected, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-4)


# --------------------------------------------------------------------------------------------------------------------
# GNA under autograd: a backward pass that recomputes tile rows one at a time.


def _gna_problem(text_mask):
    generator = torch.Generator().manual_seed(5)
    hood = Neighborhood.create((9, 11), (3, 5), (1, 2))
    q, k, v = (_randn(generator, 2, hood.tokens, 2, 8) for _ in range(3))
    text_key, text_value = (_randn(generator, 2, 4, 2, 8) for _ in range(2))
    return hood, [q, k, v, text_key, text_value], text_mask


@pytest.mark.parametrize("max_chunk_bytes", [1, 2**30])  # one strip per chunk, or every strip in one chunk
@pytest.mark.parametrize(
    "text_mask", [None, torch.tensor([[True, True, False, False], [False] * 4])], ids=["text", "one sample no text"]
)
def test_gna_gradients_through_recomputed_rows_match_the_explicit_mask(max_chunk_bytes, text_mask):
    hood, inputs, text_mask = _gna_problem(text_mask)

    def tiled(q, k, v, text_key, text_value):
        return neighborhood_attention_tiled(
            q, k, v, hood, text_key, text_value, text_mask, tile=(4, 4), max_chunk_bytes=max_chunk_bytes
        )

    def reference(q, k, v, text_key, text_value):
        return neighborhood_attention_reference(q, k, v, hood, text_key, text_value, text_mask)

    _assert_same_gradients(_gradients(tiled, inputs), _gradients(reference, inputs))


def test_gna_graph_keeps_no_more_than_its_output():
    # The graph used to keep every tile's fp32 scores and key copies: 8x what dense attention keeps at FLUX sizes.
    hood, inputs, _ = _gna_problem(None)
    leaves = [x.requires_grad_() for x in inputs]
    out, saved = _saved_bytes(
        lambda: neighborhood_attention_tiled(*leaves[:3], hood, *leaves[3:], tile=(4, 4)), leaves
    )
    scores = 2 * 2 * hood.tokens * (hood.tokens + 4) * 4  # one fp32 score matrix of the whole problem
    assert saved <= out.numel() * out.element_size() < scores


# --------------------------------------------------------------------------------------------------------------------
# VMoBA under autograd: a backward pass that recomputes probabilities chunk by chunk.


def _vmoba_problem(text_mask):
    generator = torch.Generator().manual_seed(13)
    grid, block = (5, 6, 7), (2, 4, 3)  # partial blocks at the far borders
    partition = block_partition(grid, block)
    q, k, v = (_randn(generator, 2, math.prod(grid), 3, 8) for _ in range(3))
    text_key, text_value = (_randn(generator, 2, 4, 3, 8) for _ in range(2))
    selected = select_blocks(q, k, partition, 0.3)
    return partition, selected, [q, k, v, text_key, text_value], text_mask


@pytest.mark.parametrize("slice_bytes", [1, None])  # one (sample, head) group per slice, or all at once
@pytest.mark.parametrize(
    "text_mask", [None, torch.tensor([[True, True, False, False], [False] * 4])], ids=["text", "one sample no text"]
)
def test_vmoba_values_and_gradients_in_small_chunks_and_slices_match_the_explicit_mask(
    slice_bytes, text_mask, monkeypatch
):
    if slice_bytes is not None:
        monkeypatch.setattr(vmoba, "_GROUP_SLICE_BYTES", slice_bytes)
    partition, selected, inputs, text_mask = _vmoba_problem(text_mask)

    def sparse(q, k, v, text_key, text_value):
        return block_attention_sparse(q, k, v, partition, selected, text_key, text_value, text_mask, 100_000)

    def reference(q, k, v, text_key, text_value):
        return block_attention_reference(q, k, v, partition, selected, text_key, text_value, text_mask)

    with torch.no_grad():
        torch.testing.assert_close(sparse(*inputs), reference(*inputs), atol=1e-5, rtol=1e-5)
    _assert_same_gradients(_gradients(sparse, inputs), _gradients(reference, inputs))


def test_vmoba_graph_keeps_its_output_one_lse_per_query_and_the_selection():
    # The graph used to keep every chunk's fp32 scores and a copy of the whole merge state per chunk.
    partition, selected, inputs, _ = _vmoba_problem(None)
    leaves = [x.requires_grad_() for x in inputs]
    out, saved = _saved_bytes(lambda: block_attention_sparse(*leaves[:3], partition, selected, *leaves[3:]), leaves)
    rows = out.shape[0] * out.shape[1] * out.shape[2]
    assert saved <= out.numel() * out.element_size() + rows * 4 + selected.numel()


def test_vmoba_pair_indices_are_built_one_slice_of_groups_at_a_time(monkeypatch):
    partition, selected, inputs, _ = _vmoba_problem(None)
    batch, heads, tokens, blocks = selected.shape
    # A slice's cost: 8 bytes per kept pair (its query index) and the [C, S] booleans searched for them.
    costs = (selected.sum(dim=(2, 3)).flatten() * 8 + tokens * blocks).tolist()
    budget = 2 * max(costs)
    monkeypatch.setattr(vmoba, "_GROUP_SLICE_BYTES", budget)
    slices = sorted(
        {(chunk[0].start, chunk[0].stop) for chunk in vmoba._unit_chunks(selected, partition, 1, 1, 2**30)}
    )
    assert len(slices) > 1
    assert [start for start, _ in slices] == [0] + [stop for _, stop in slices[:-1]] and slices[-1][1] == batch * heads
    assert all(sum(costs[start:stop]) <= budget for start, stop in slices)


# --------------------------------------------------------------------------------------------------------------------
# VMoBA selection: a byte budget for its temporaries.


def test_selection_chunks_respect_the_byte_budget_and_select_the_same(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    tokens, heads, dim = 120, 5, 8
    query, key = (_randn(generator, 2, tokens, heads, dim) for _ in range(2))
    partition = block_partition((12, 10), (4, 3))
    per_head = tokens * (partition.num_blocks * vmoba._SELECTION_BYTES_PER_GATE + dim * 4)
    budget = 2 * per_head
    gates = []
    threshold_selection = vmoba._threshold_selection

    def recording(gate, own, threshold):
        gates.append(gate.shape)
        return threshold_selection(gate, own, threshold)

    expected = select_blocks(query, key, partition, 0.3, max_chunk_bytes=2**30)
    monkeypatch.setattr(vmoba, "_threshold_selection", recording)
    actual = select_blocks(query, key, partition, 0.3, max_chunk_bytes=budget)
    assert torch.equal(actual, expected)
    assert len(gates) == 2 * math.ceil(heads / 2)  # per sample: heads 2 + 2 + 1
    assert all(shape[0] * per_head <= budget for shape in gates)


def test_block_means_in_token_chunks_are_exact():
    generator = torch.Generator().manual_seed(4)
    key = _randn(generator, 2, 120, 3, 8).to(torch.bfloat16)
    partition = block_partition((12, 10), (4, 3))
    whole = vmoba.block_means(key, partition)
    assert torch.equal(vmoba.block_means(key, partition, max_chunk_bytes=1), whole)


# --------------------------------------------------------------------------------------------------------------------
# GNA's kept scratch buffer: one per device, shared by dtypes and threads.


def test_threads_share_one_kept_scratch_buffer():
    hood = Neighborhood.create((12, 12), (5, 5), (1, 1))
    generator = torch.Generator().manual_seed(6)
    q, k, v = (_randn(generator, 1, hood.tokens, 2, 8) for _ in range(3))
    expected = neighborhood_attention_reference(q, k, v, hood)
    results = {}

    def job(index, dtype):
        results[index] = neighborhood_attention_tiled(q.to(dtype), k.to(dtype), v.to(dtype), hood, tile=(4, 4))

    threads = [
        threading.Thread(target=job, args=(index, dtype))
        for index, dtype in enumerate([torch.float32, torch.bfloat16] * 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(threads)
    for result in results.values():
        exact = result.dtype == torch.float32
        torch.testing.assert_close(result.float(), expected, atol=2e-6 if exact else 3e-2, rtol=2e-5 if exact else 0)
    assert list(neighborhood._SCRATCH) == [q.device]
    assert neighborhood._SCRATCH[q.device].nbytes <= neighborhood._SCRATCH_KEPT_BYTES


def test_a_call_that_finds_the_kept_buffer_busy_uses_its_own():
    hood = Neighborhood.create((12, 12), (5, 5), (1, 1))
    generator = torch.Generator().manual_seed(8)
    q, k, v = (_randn(generator, 1, hood.tokens, 2, 8) for _ in range(3))
    neighborhood_attention_tiled(q, k, v, hood)
    kept = neighborhood._SCRATCH[q.device]
    before = kept.clone()
    with neighborhood._SCRATCH_LOCK:  # another call holds it
        actual = neighborhood_attention_tiled(q, k, v, hood)
    assert torch.equal(kept, before)
    torch.testing.assert_close(actual, neighborhood_attention_reference(q, k, v, hood), atol=2e-6, rtol=2e-5)
