"""The Triton block-sparse GNA kernel against the explicit-mask reference (interpreter on CPU, native on GPU)."""

from __future__ import annotations

import pytest
import torch

from accel.kernels import block_sparse
from accel.kernels.neighborhood import Neighborhood, neighborhood_attention_reference

pytestmark = pytest.mark.skipif(
    not block_sparse.triton_usable("cuda" if torch.cuda.is_available() else "cpu"),
    reason="needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Flash-attention's bound: the kernel's error against the fp32 truth may be a small multiple of the error PyTorch
# itself makes at that precision; fp32 compares directly.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(tokens, heads, dim, dtype, text=0, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def make(count):
        return torch.randn(batch, count, heads, dim, generator=generator).to(DEVICE, dtype)

    q, k, v = make(tokens), make(tokens), make(tokens)
    extra = (make(text), make(text)) if text else (None, None)
    return q, k, v, *extra


CASES = [
    # grid, kernel, stride, dilation, causal, tile, head_dim
    ((6, 7), (3, 5), 1, 1, False, (4, 4), 16),
    ((8, 8), (4, 4), (4, 4), 1, False, (4, 4), 16),  # blocked and tile-aligned: every visited tile is full
    ((9, 10), (5, 4), (2, 3), (1, 2), False, (4, 4), 24),  # odd head dim is padded to 32
    ((3, 5, 6), (2, 3, 3), (1, 2, 1), 1, (True, False, False), (1, 4, 4), 16),
    ((19,), (5,), (2,), (3,), False, (16,), 16),
]


@pytest.mark.parametrize("grid, kernel, stride, dilation, causal, tile, head_dim", CASES)
def test_kernel_matches_the_reference(grid, kernel, stride, dilation, causal, tile, head_dim):
    hood = Neighborhood.create(grid, kernel, stride, dilation, causal)
    q, k, v, _, _ = _inputs(hood.tokens, 2, head_dim, torch.float32)
    out, lse = block_sparse.block_sparse_attention(q, k, v, hood, tile=tile)
    expected = neighborhood_attention_reference(q, k, v, hood)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * head_dim**-0.5
    scores = scores.masked_fill(~hood.mask(q.device), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision_with_text_keys(dtype):
    hood = Neighborhood.create((7, 9), (3, 3), (1, 1))
    q, k, v, text_k, text_v = _inputs(hood.tokens, 2, 16, dtype, text=70)
    text_mask = torch.ones(2, 70, dtype=torch.bool, device=DEVICE)
    text_mask[1, 40:] = False
    out, _ = block_sparse.block_sparse_attention(q, k, v, hood, text_k, text_v, text_mask, tile=(4, 4))
    expected = neighborhood_attention_reference(q, k, v, hood, text_k, text_v, text_mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_kernel_reads_strided_slices_of_a_joint_sequence():
    """FLUX's joint sequence holds text first: the kernel reads the image part in place, without a copy."""
    hood = Neighborhood.create((5, 6), (3, 3))
    joint_q, joint_k, joint_v, _, _ = _inputs(7 + hood.tokens, 2, 16, torch.float32)
    q, k, v = joint_q[:, 7:], joint_k[:, 7:], joint_v[:, 7:]
    assert not q.is_contiguous()
    out, _ = block_sparse.block_sparse_attention(q, k, v, hood, joint_k[:, :7], joint_v[:, :7], tile=(4, 4))
    expected = neighborhood_attention_reference(q, k, v, hood, joint_k[:, :7], joint_v[:, :7])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_kernel_as_large_as_the_grid_is_dense():
    hood = Neighborhood.create((5, 7), (5, 7))
    q, k, v, _, _ = _inputs(hood.tokens, 1, 16, torch.float32)
    plan = block_sparse.block_sparse_plan(hood, (4, 4), q.device)
    # Every tile pair is visited and none needs the fine mask.
    assert plan.density == 1.0 and bool((plan.key_tiles % 2 == 0).all())
    out, _ = block_sparse.block_sparse_attention(q, k, v, hood, tile=(4, 4))
    torch.testing.assert_close(
        out,
        torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2),
        atol=2e-5,
        rtol=2e-5,
    )


def test_plan_visits_only_tiles_inside_the_windows():
    hood = Neighborhood.create((64, 64), (16, 16), (16, 16))
    plan = block_sparse.block_sparse_plan(hood, (16, 16), torch.device("cpu"))
    # Blocked 16x16 windows on 16x16 tiles: each query tile sees exactly its own tile, with no fine mask.
    assert plan.key_tile_counts.tolist() == [1] * 16
    assert plan.key_tiles[:, 0].tolist() == [2 * t for t in range(16)]


def test_bad_tile_is_refused():
    hood = Neighborhood.create((8, 8), 3)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse.block_sparse_plan(hood, (3, 4), torch.device("cpu"))


VMOBA_CASES = [
    # grid, block, tile, head_dim, threshold
    ((6, 10), (3, 4), (4, 4), 16, 0.3),  # partial blocks and partial tiles
    ((3, 6, 8), (1, None, None), (1, 4, 4), 16, 0.5),  # frames
    ((3, 6, 8), (3, 3, 3), (2, 4, 4), 24, 0.25),  # cubes; odd head dim padded to 32
    ((40,), (7,), (16,), 16, 0.4),
]


@pytest.mark.parametrize("grid, block, tile, head_dim, threshold", VMOBA_CASES)
def test_vmoba_kernel_matches_the_reference(grid, block, tile, head_dim, threshold):
    from accel.kernels.vmoba import block_attention_reference, block_partition, select_blocks

    partition = block_partition(grid, block)
    q, k, v, text_k, text_v = _inputs(partition.tokens, 2, head_dim, torch.float32, text=20)
    selected = select_blocks(q, k, partition, threshold)
    # Each query keeps its own selection: some rows of a tile keep a block the others do not.
    assert not bool(selected.all()) and bool(selected.any(dim=2).any())
    text_mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    text_mask[0, 13:] = False
    out, lse = block_sparse.block_select_attention(q, k, v, partition, selected, text_k, text_v, text_mask, tile=tile)
    expected = block_attention_reference(q, k, v, partition, selected, text_k, text_v, text_mask)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])
    mask = selected[..., partition.block_of_token.to(q.device)]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * head_dim**-0.5
    text_scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), text_k.double()) * head_dim**-0.5
    scores = torch.cat(
        [scores.masked_fill(~mask, float("-inf")), text_scores.masked_fill(~text_mask[:, None, None], float("-inf"))],
        -1,
    )
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vmoba_kernel_half_precision(dtype):
    from accel.kernels.vmoba import block_attention_reference, block_partition, select_blocks

    partition = block_partition((4, 8, 8), (2, 4, 4))
    q, k, v, _, _ = _inputs(partition.tokens, 2, 16, dtype)
    selected = select_blocks(q, k, partition, 0.3)
    out, _ = block_sparse.block_select_attention(q, k, v, partition, selected, tile=(2, 4, 4))
    expected = block_attention_reference(q.float(), k.float(), v.float(), partition, selected)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_vmoba_kernel_rejects_a_mismatched_selection():
    from accel.kernels.vmoba import block_partition

    partition = block_partition((4, 8), (2, 4))
    q, k, v, _, _ = _inputs(partition.tokens, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"selected must be \[B, H, S, C\]"):
        block_sparse.block_select_attention(q, k, v, partition, torch.ones(2, 2, 32, 3, dtype=torch.bool))


def test_calls_that_record_gradients_leave_the_triton_kernels_for_the_torch_path(monkeypatch, caplog):
    # The Triton kernels have no backward pass: under latent guidance their outputs would cut the gradient.
    from accel.processors.dense import resolve_kernel_backend
    from accel.processors.state import PatchContext

    monkeypatch.setattr(block_sparse, "triton_usable", lambda device: True)
    cuda = torch.device("cuda")
    assert resolve_kernel_backend("gna", "auto", cuda) == "triton"
    assert resolve_kernel_backend("gna", "auto", cuda, tracked=True) == "torch"
    context = PatchContext(family="flux")
    with caplog.at_level("WARNING", logger="accel.processors.dense"):
        for _ in range(3):
            assert resolve_kernel_backend("vmoba", "triton", cuda, tracked=True, context=context) == "torch"
    assert caplog.text.count("vmoba: the Triton kernel has no backward pass") == 1
    assert resolve_kernel_backend("vmoba", "triton", cuda, context=context) == "triton"
