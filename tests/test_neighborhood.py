"""GNA geometry and the torch paths: NATTEN's window rule, the tiled CPU path against the explicit-mask truth."""

from __future__ import annotations

import itertools

import pytest
import torch

from accel.kernels.neighborhood import (
    Neighborhood,
    _tiled_one_grid,
    neighborhood_attention_reference,
    neighborhood_attention_tiled,
)
from accel.kernels.reference import attention_reference


def _natten_window(index: int, length: int, kernel: int, stride: int, dilation: int, causal: bool) -> set[int]:
    """One query's keys on one axis, written as a scalar transcription of NATTEN's reference mask rule."""
    group, position = index % dilation, index // dilation
    # Length of the query's dilation sub-grid (NATTEN's qkv_fix_dilation).
    sub_length = length // dilation + 1 - (group + dilation - length % dilation) // dilation
    if causal:
        leader = min((position // stride) * stride + stride - 1, sub_length - 1)
        start, end = max(leader - (kernel - 1), 0), min(position + 1, sub_length)
    else:
        left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
        leader = min((position // stride) * stride + stride // 2, sub_length - 1)
        start = max(leader - left, 0)
        if leader + right >= sub_length:
            start += sub_length - right - leader - 1
        end = start + kernel
    return {p * dilation + group for p in range(start, end)}


AXIS_CASES = [
    # (length, kernel, stride, dilation, causal)
    (9, 3, 1, 1, False),
    (10, 4, 1, 1, False),  # even kernel: k//2 on the left, k//2 - 1 on the right
    (11, 5, 2, 1, False),
    (13, 6, 3, 1, False),
    (12, 4, 4, 1, False),  # blocked
    (10, 3, 1, 2, False),
    (11, 3, 2, 3, False),  # dilation with uneven sub-grids
    (9, 4, 1, 1, True),
    (10, 4, 3, 1, True),
    (11, 3, 2, 2, True),
]


@pytest.mark.parametrize("length, kernel, stride, dilation, causal", AXIS_CASES)
def test_axis_mask_follows_the_natten_rule(length, kernel, stride, dilation, causal):
    mask = Neighborhood.create((length,), kernel, stride, dilation, causal).mask()
    for index in range(length):
        expected = _natten_window(index, length, kernel, stride, dilation, causal)
        assert set(torch.nonzero(mask[index]).flatten().tolist()) == expected, index
        if not causal:
            # Clamped at the borders, never padded: every query sees exactly kernel_size keys.
            assert len(expected) == kernel


def test_stride_groups_share_their_leaders_window():
    mask = Neighborhood.create((16,), 5, 4).mask()
    for group_start in range(0, 16, 4):
        rows = mask[group_start : group_start + 4]
        assert (rows == rows[0]).all()


def test_multi_axis_mask_is_the_product_of_axis_windows():
    hood = Neighborhood.create((5, 7), (3, 4), (1, 2), (1, 1), (False, True))
    mask = hood.mask()
    for (i0, i1), (j0, j1) in itertools.product(itertools.product(range(5), range(7)), repeat=2):
        expected = j0 in _natten_window(i0, 5, 3, 1, 1, False) and j1 in _natten_window(i1, 7, 4, 2, 1, True)
        assert bool(mask[i0 * 7 + i1, j0 * 7 + j1]) == expected


def _qkv(tokens, heads=2, dim=8, batch=2, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, heads, dim, generator=generator).to(dtype) for _ in range(3)]


TILED_CASES = [
    # grid, kernel, stride, dilation, causal, tile
    ((7, 9), (3, 5), 1, 1, False, None),
    ((8, 8), (4, 4), (4, 4), 1, False, None),  # blocked: boxes are exactly the windows, no mask
    ((12, 10), (6, 5), (3, 2), 1, False, (4, 3)),
    ((9, 11), (3, 3), 1, (2, 3), False, None),
    ((10, 6), (4, 3), (2, 1), 1, (True, False), None),
    ((4, 5, 6), (2, 3, 3), (1, 2, 1), 1, (True, False, False), None),
    ((5, 6, 7), (3, 4, 5), (2, 2, 4), (1, 1, 1), False, (2, 4, 4)),
    ((17,), (5,), (1,), (3,), False, None),
    # Keys run through strips along the axis whose box outgrows its tile most: here the last axis, no mask ...
    ((4, 6, 12), (2, 3, 6), (2, 3, 3), 1, False, (2, 3, 3)),
    # ... and here the middle one, with masks on every axis and partial tiles.
    ((5, 9, 6), (3, 5, 3), 1, 1, False, (2, 3, 2)),
]


@pytest.mark.parametrize("grid, kernel, stride, dilation, causal, tile", TILED_CASES)
def test_tiled_path_equals_the_explicit_mask(grid, kernel, stride, dilation, causal, tile):
    hood = Neighborhood.create(grid, kernel, stride, dilation, causal)
    q, k, v = _qkv(hood.tokens)
    expected = neighborhood_attention_reference(q, k, v, hood)
    actual = neighborhood_attention_tiled(q, k, v, hood, tile=tile)
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("with_padding", [False, True])
def test_extra_keys_are_seen_by_every_query(with_padding):
    hood = Neighborhood.create((6, 7), (3, 3), (1, 1))
    q, k, v = _qkv(hood.tokens)
    text_k, text_v = _qkv(5, seed=1)[:2]
    text_mask = None
    if with_padding:
        text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    expected = neighborhood_attention_reference(q, k, v, hood, text_k, text_v, text_mask)
    actual = neighborhood_attention_tiled(q, k, v, hood, text_k, text_v, text_mask)
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=2e-5)
    # Without the text keys the result differs: the test can see them.
    assert (neighborhood_attention_tiled(q, k, v, hood) - actual).abs().max() > 1e-3


@pytest.mark.parametrize(
    "grid, kernel, stride, tile",
    [
        ((8, 12), (4, 4), (4, 4), (4, 4)),  # tiles cover the grid exactly: permuted queries, no mask
        ((9, 11), (3, 5), (1, 2), (4, 4)),  # uneven tiles (repeated positions) and masked boxes
        ((5, 6, 7), (3, 4, 5), (1, 2, 2), (2, 4, 4)),
        ((4, 6, 12), (2, 3, 6), (2, 3, 3), (2, 3, 3)),
        ((5, 9, 6), (3, 5, 3), (1, 1, 1), (2, 3, 2)),
    ],
)
def test_tiles_with_text_keys_in_small_chunks_match_the_explicit_mask(grid, kernel, stride, tile):
    hood = Neighborhood.create(grid, kernel, stride)
    q, k, v = _qkv(hood.tokens)
    text_k, text_v = _qkv(4, seed=1)[:2]
    text_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    expected = neighborhood_attention_reference(q, k, v, hood, text_k, text_v, text_mask)
    # Chunks of a few tiles reuse the key buffers, so a stale box or text row would show here.
    for max_chunk_bytes in (1, 3 * 2**10, 2**30):
        actual = _tiled_one_grid(q, k, v, hood, text_k, text_v, text_mask, tile, max_chunk_bytes)
        torch.testing.assert_close(actual, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dilation", [(1, 1), (2, 1)])
def test_gradients_through_the_tiled_path_match_the_explicit_mask(dilation):
    # Latent guidance (A-STAR composed with GNA) runs the forward with autograd on, after no-grad calls have left
    # buffers to reuse; tiles past the grid's end leave query rows unused.
    hood = Neighborhood.create((9, 11), (3, 5), (1, 2), dilation)
    with torch.no_grad():
        neighborhood_attention_tiled(*_qkv(hood.tokens), hood)
    text_k, text_v = _qkv(4, seed=1)[:2]
    grads = []
    for attend in (neighborhood_attention_reference, neighborhood_attention_tiled):
        q, k, v = (x.clone().requires_grad_() for x in _qkv(hood.tokens))
        kwargs = {"max_chunk_bytes": 3 * 2**10} if attend is neighborhood_attention_tiled else {}
        out = attend(q, k, v, hood, text_k, text_v, None, **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for expected, actual in zip(*grads, strict=True):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-4)


def test_kernel_as_large_as_the_grid_is_dense_attention():
    hood = Neighborhood.create((6, 10), (6, 10))
    assert hood.is_dense and hood.density() == 1.0
    q, k, v = _qkv(hood.tokens)
    dense = attention_reference(q, k, v)
    torch.testing.assert_close(neighborhood_attention_tiled(q, k, v, hood), dense, atol=2e-6, rtol=2e-5)
    # The tiled machinery itself (which the shortcut above skips) agrees too.
    tiled = _tiled_one_grid(q, k, v, hood, None, None, None, (4, 4), 2**20)
    torch.testing.assert_close(tiled, dense, atol=2e-6, rtol=2e-5)


def test_small_chunks_give_the_same_result():
    hood = Neighborhood.create((9, 9), (3, 5), (1, 2))
    q, k, v = _qkv(hood.tokens)
    whole = neighborhood_attention_tiled(q, k, v, hood)
    torch.testing.assert_close(neighborhood_attention_tiled(q, k, v, hood, max_chunk_bytes=1), whole)


def test_density_matches_the_mask():
    hood = Neighborhood.create((12, 10), (5, 4), (2, 2), (1, 2))
    assert hood.density() == pytest.approx(float(hood.mask().float().mean()))


@pytest.mark.parametrize(
    "grid, options, message",
    [
        ((8, 8), dict(kernel_size=9), "kernel_size 9 is larger than the token grid's side 8"),
        ((8, 8), dict(kernel_size=4, stride=5), "stride 5 is larger than kernel_size 4"),
        ((8, 8), dict(kernel_size=3, dilation=3), "dilation 3 x kernel_size 3 = 9 exceeds the side 8"),
        ((8, 8), dict(kernel_size=(3, 3, 3)), "one value per grid axis"),
        ((8, 8), dict(kernel_size=0), "positive int"),
        ((8, 8), dict(kernel_size=3, is_causal=1), "bool"),
        ((2, 2, 2, 2), dict(kernel_size=1), "1 to 3"),
    ],
)
def test_bad_geometry_is_refused_with_the_fix(grid, options, message):
    with pytest.raises(ValueError, match=message):
        Neighborhood.create(grid, **options)


NATTEN_CASES = [
    # grid, kernel, stride, dilation, causal
    ((9, 11), (3, 5), (1, 2), (1, 2), (False, False)),
    ((8, 10), (4, 4), (4, 2), (1, 1), (True, False)),
    ((4, 6, 7), (2, 3, 3), (1, 1, 3), (1, 2, 1), (True, False, False)),
]


@pytest.mark.parametrize("grid, kernel, stride, dilation, causal", NATTEN_CASES)
def test_same_result_as_natten(grid, kernel, stride, dilation, causal):
    """Side by side with NATTEN where it is installed (its Flex backend runs on CPU, slowly: small sizes only)."""
    natten = pytest.importorskip("natten")
    hood = Neighborhood.create(grid, kernel, stride, dilation, causal)
    q, k, v = _qkv(hood.tokens, batch=1)
    text_k, text_v = _qkv(3, batch=1, seed=2)[:2]
    op = {2: natten.na2d, 3: natten.na3d}[len(grid)]

    def spatial(x):
        return x.reshape(1, *grid, *x.shape[2:])

    theirs = op(
        spatial(q),
        spatial(k),
        spatial(v),
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
        is_causal=causal,
        additional_keys=text_k,
        additional_values=text_v,
    ).reshape(q.shape)
    ours = neighborhood_attention_tiled(q, k, v, hood, text_k, text_v)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_precision_tiles_with_text_stay_near_the_fp32_truth(dtype, atol):
    hood = Neighborhood.create((9, 12), (5, 6), (1, 3))
    q, k, v = _qkv(hood.tokens, dim=16)
    text_k, text_v = _qkv(3, dim=16, seed=1)[:2]
    text_mask = torch.tensor([[True, True, True], [True, False, False]])
    expected = neighborhood_attention_reference(q, k, v, hood, text_k, text_v, text_mask)
    half = [x.to(dtype) for x in (q, k, v, text_k, text_v)]
    actual = neighborhood_attention_tiled(*half[:3], hood, *half[3:], text_mask, tile=(4, 6))
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=0)


def test_stale_buffer_contents_from_an_earlier_call_do_not_reach_the_result():
    # Fill the reused buffers with NaN through a call on NaN inputs, then run a problem whose partial tiles leave
    # buffer rows unwritten: those rows are computed and dropped, and no real query may read them.
    poisoned = Neighborhood.create((12, 12), (4, 4), (1, 1))
    nan = torch.full((2, poisoned.tokens, 2, 8), float("nan"))
    neighborhood_attention_tiled(nan, nan, nan, poisoned, tile=(4, 4))
    hood = Neighborhood.create((9, 11), (3, 5), (1, 2))
    q, k, v = _qkv(hood.tokens)
    actual = neighborhood_attention_tiled(q, k, v, hood, tile=(4, 4))
    torch.testing.assert_close(actual, neighborhood_attention_reference(q, k, v, hood), atol=2e-6, rtol=2e-5)


def test_a_sample_whose_text_keys_are_all_padding_attends_its_window_alone():
    hood = Neighborhood.create((6, 8), (3, 4), (1, 2))
    q, k, v = _qkv(hood.tokens)
    text_k, text_v = _qkv(3, seed=1)[:2]
    text_mask = torch.tensor([[True, False, True], [False, False, False]])
    actual = neighborhood_attention_tiled(q, k, v, hood, text_k, text_v, text_mask, tile=(3, 4))
    expected = neighborhood_attention_reference(q, k, v, hood, text_k, text_v, text_mask)
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(actual[1], neighborhood_attention_reference(q, k, v, hood)[1], atol=2e-6, rtol=2e-5)
