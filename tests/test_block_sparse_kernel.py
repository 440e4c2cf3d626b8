"""The Triton block-sparse GNA kernel against the explicit-mask reference (interpreter on CPU, native on GPU)."""

from __future__ import annotations

import math

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
    # tl.dot on a GPU needs 16 keys; the interpreter would accept fewer, so only a GPU would fail.
    with pytest.raises(ValueError, match="16 or more"):
        block_sparse.block_sparse_plan(hood, (2, 4), torch.device("cpu"))


@pytest.mark.parametrize(
    "grid, tile",
    [((3, 2), (4, 4)), ((1, 40), (1, 16)), ((6,), (16,)), ((2, 2, 2), (2, 2, 4)), ((5, 1), (8, 2))]
    + [((64, 64), (16, 8)), ((9, 32, 32), (2, 8, 8)), ((1000,), (128,))],  # large grids keep NATTEN's tiles
)
def test_default_tiles_hold_at_least_16_positions(grid, tile):
    assert block_sparse.default_tile(grid) == tile


def test_small_grid_on_its_default_tile_matches_the_reference():
    # 6 tokens in a 4x4 tile: 10 positions masked as past the grid.
    hood = Neighborhood.create((3, 2), (3, 1))
    q, k, v, _, _ = _inputs(hood.tokens, 2, 16, torch.float32)
    out, _ = block_sparse.block_sparse_attention(q, k, v, hood)
    expected = neighborhood_attention_reference(q, k, v, hood)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("spread", ["batches", "features"])
def test_kernel_addresses_tensors_past_2_31_elements(spread):
    """A query whose last batch, or last feature, lies past 2**31 elements, while each stride fits in int32 (so
    Triton passes them as int32): offsets multiplied in int32 would wrap (a crash, or a read elsewhere)."""
    hood = Neighborhood.create((5, 6), (3, 3))
    q, k, v, _, _ = _inputs(hood.tokens, 1, 16, torch.float16, batch=3)
    if spread == "batches":
        strides = (2**30 + 2**20, 16, 16, 1)
    else:
        strides = (hood.tokens, 1, 1, 2**27 + 2**24)
    span = sum((size - 1) * stride for size, stride in zip(q.shape, strides, strict=True)) + 1
    assert span > 2**31 and max(strides) < 2**31
    try:
        # Over 4 GiB of address space; on CPU only the pages written and read are ever backed by memory.
        storage = torch.empty(span, dtype=torch.float16, device=DEVICE)
    except RuntimeError:
        pytest.skip("cannot reserve the address space of a tensor spanning 2**31 elements")
    wide_q = storage.as_strided(q.shape, strides)
    wide_q.copy_(q)
    out, _ = block_sparse.block_sparse_attention(wide_q, k, v, hood)
    expected = neighborhood_attention_reference(q, k, v, hood)
    tolerance = TOLERANCE[torch.float16]
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)


# Text operands of a call on 2 x 15 queries (2 heads, head dim 16) with 4 text tokens, each gone wrong in one way.
TEXT_MISTAKES = {
    "mask shared by the batch": (lambda k, v, mask: (k, v, mask[:1]), r"extra_mask must be \[B, T\] = \[2, 4\]"),
    "fewer values than keys": (lambda k, v, mask: (k, v[:, :2], None), "extra_value must have extra_key's shape"),
    "one head for two": (lambda k, v, mask: (k[:, :, :1], v[:, :, :1], None), r"extra_key must be \[B, T, H, D\]"),
    "another head dim": (lambda k, v, mask: (k[..., :8], v[..., :8], None), r"extra_key must be \[B, T, H, D\]"),
    "another dtype": (lambda k, v, mask: (k.half(), v.half(), None), "extra_key is torch.float16"),
    "another device": (lambda k, v, mask: (k.to("meta"), v.to("meta"), None), "extra_key is on meta"),
    "values without keys": (lambda k, v, mask: (None, v, None), "give both or neither"),
    "mask without keys": (lambda k, v, mask: (None, None, mask), "no extra_key"),
    "mask of integers": (lambda k, v, mask: (k, v, mask.int()), "booleans"),
}


@pytest.mark.parametrize("mistake", list(TEXT_MISTAKES))
def test_mismatched_text_operands_are_refused(mistake):
    wrong, message = TEXT_MISTAKES[mistake]
    q, k, v, text_k, text_v = _inputs(15, 2, 16, torch.float32, text=4)
    mask = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        block_sparse.block_sparse_attention(q, k, v, Neighborhood.create((3, 5), (3, 3)), *wrong(text_k, text_v, mask))


def test_mismatched_keys_are_refused():
    hood = Neighborhood.create((3, 5), (3, 3))
    q, k, v, _, _ = _inputs(hood.tokens, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="key is torch.float16"):
        block_sparse.block_sparse_attention(q, k.half(), v, hood)
    with pytest.raises(ValueError, match="value is on meta"):
        block_sparse.block_sparse_attention(q, k, v.to("meta"), hood)
    with pytest.raises(ValueError, match="head dims up to 256"):
        block_sparse.block_sparse_attention(*(torch.zeros(1, hood.tokens, 1, 320, device=DEVICE),) * 3, hood)


# Opt-in shared memory per block (CUDA's cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute capability: A100,
# RTX 30xx / A10 / A40, RTX 40xx / L4 / L40, H100, B200, RTX 50xx.
SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("kernel", ["gna", "select"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_launch_fits_the_shared_memory_of_every_gpu(kernel, dtype):
    for tile in [(128,), (16, 8), (2, 8, 8)]:
        for head_dim in (24, 64, 100, 128, 160, 256):
            fast = dtype != torch.float32 and head_dim <= 128
            for arch, limit in SHARED_MEMORY.items():
                config = block_sparse.launch_config(kernel, dtype, head_dim, tile, limit, arch)
                block_d = max(16, 1 << (head_dim - 1).bit_length())
                positions = math.prod(config.tile)
                assert block_sparse.shared_memory_estimate(kernel, dtype, block_d, positions, arch) <= limit
                assert positions >= 16 and config.key_block == min(64, positions)
                if fast:  # flash-attention's tile and stages, unchanged
                    assert (config.tile, config.num_stages) == (tile, 2)
    # No limit (Triton's interpreter): the tile as given.
    assert block_sparse.launch_config(kernel, dtype, 256, (16, 8), None).tile == (16, 8)


# Shared memory of the kernels as Triton 3.9 compiles them for NVIDIA GPUs (cross-compiled, which needs no GPU), at
# launches chosen close to a limit: the estimate must cover each, and closely enough to keep the fast tile.
COMPILED = [
    # kernel, dtype, BLOCK_D, tile positions, compute capability, bytes
    ("gna", torch.float16, 128, 128, 86, 98308),  # 101376 available: fp16 keeps the 128-position tile
    ("select", torch.bfloat16, 128, 128, 89, 98560),
    ("gna", torch.float32, 64, 128, 80, 164352),  # 166912 available
    ("select", torch.float32, 128, 128, 80, 164608),
    ("gna", torch.bfloat16, 256, 128, 90, 196612),  # 232448 available
    ("gna", torch.float32, 128, 64, 90, 114944),
    ("gna", torch.float16, 256, 64, 86, 98308),
    ("select", torch.float32, 256, 32, 80, 102656),
    ("select", torch.float16, 256, 32, 89, 65664),
    ("gna", torch.float32, 256, 16, 86, 50240),
    ("gna", torch.float16, 128, 128, 100, 131108),  # sm100 stages one more key tile
    ("gna", torch.float16, 128, 128, 120, 98308),
]


@pytest.mark.parametrize("kernel, dtype, block_d, positions, arch, compiled", COMPILED)
def test_shared_memory_estimate_covers_the_compiled_kernels(kernel, dtype, block_d, positions, arch, compiled):
    estimate = block_sparse.shared_memory_estimate(kernel, dtype, block_d, positions, arch)
    assert compiled <= estimate <= compiled + 1024


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


def test_vmoba_kernel_refuses_a_bad_tile_and_mismatched_text():
    from accel.kernels.vmoba import block_partition

    partition = block_partition((4, 8), (2, 4))
    q, k, v, text_k, text_v = _inputs(partition.tokens, 2, 16, torch.float32, text=3)
    selected = torch.ones(2, 2, partition.tokens, partition.num_blocks, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse.block_select_attention(q, k, v, partition, selected, tile=(3, 4))
    with pytest.raises(ValueError, match="extra_value must have extra_key's shape"):
        block_sparse.block_select_attention(q, k, v, partition, selected, text_k, text_v[:, :1])
    with pytest.raises(ValueError, match="selected is on meta"):
        block_sparse.block_select_attention(q, k, v, partition, selected.to("meta"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_tensors_device_not_the_current_one():
    from accel.kernels.vmoba import block_attention_reference, block_partition, select_blocks

    hood = Neighborhood.create((6, 7), (3, 5))
    q, k, v, text_k, text_v = (t.to("cuda:1") for t in _inputs(hood.tokens, 2, 64, torch.float16, text=5))
    partition = block_partition((6, 7), (3, 4))
    selected = select_blocks(q, k, partition, 0.5)
    with torch.cuda.device(0):
        out, _ = block_sparse.block_sparse_attention(q, k, v, hood, text_k, text_v)
        select_out, _ = block_sparse.block_select_attention(q, k, v, partition, selected)
    tolerance = TOLERANCE[torch.float16]
    expected = neighborhood_attention_reference(q, k, v, hood, text_k, text_v)
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    expected = block_attention_reference(q.float(), k.float(), v.float(), partition, selected)
    torch.testing.assert_close(select_out.float(), expected, atol=tolerance, rtol=tolerance)


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
