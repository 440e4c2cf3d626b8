"""The fp32 reference that every accel kernel is tested against agrees with PyTorch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

from accel.kernels.reference import attention_reference


def sdpa(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    ("batch", "s_q", "s_k", "heads", "dim"), [(1, 97, 97, 2, 59), (2, 33, 77, 3, 16), (1, 1, 5, 1, 8)]
)
def test_matches_sdpa_in_fp32(batch, s_q, s_k, heads, dim):
    q, k, v = (torch.randn(batch, s, heads, dim) for s in (s_q, s_k, s_k))
    assert (attention_reference(q, k, v) - sdpa(q, k, v)).abs().max() <= 1e-5


def test_boolean_mask_and_fully_masked_rows():
    q, k, v = (torch.randn(2, 9, 2, 8) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True
    assert (attention_reference(q, k, v, mask) - sdpa(q, k, v, mask)).abs().max() <= 1e-5
    mask[:, :, 4] = False  # row 4 sees no key: zeros, not NaN
    out = attention_reference(q, k, v, mask)
    assert torch.isfinite(out).all() and out[:, 4].abs().max() == 0


def test_additive_mask_and_scale():
    q, k, v = (torch.randn(1, 12, 2, 16) for _ in range(3))
    bias = torch.randn(1, 2, 12, 12)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=0.3
    ).transpose(1, 2)
    assert (attention_reference(q, k, v, bias, scale=0.3) - expected).abs().max() <= 1e-5


def test_bf16_error_is_within_twice_pytorchs_own():
    q, k, v = (torch.randn(1, 65, 2, 32) for _ in range(3))
    truth = attention_reference(q, k, v)
    low = [x.bfloat16() for x in (q, k, v)]
    ours = attention_reference(*low, upcast=True).float()
    pytorch = attention_reference(*low, upcast=False).float()
    assert (ours - truth).abs().max() <= 2 * (pytorch - truth).abs().max()
    # The upcast path is fp32 arithmetic on the bf16 inputs, rounded once at the end (not bf16 arithmetic).
    assert torch.equal(ours.bfloat16(), attention_reference(*(x.float() for x in low)).bfloat16())
    assert not torch.equal(ours.bfloat16(), pytorch.bfloat16())
