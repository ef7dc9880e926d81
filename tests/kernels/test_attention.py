"""The flash-attention kernel against its plain-torch reference (fp32), in Triton's interpreter on CPU
(TRITON_INTERPRET=1, set in tests/conftest.py when there is no GPU).

Bounds (relative L2): fp32 1e-5; fp16 2e-3 (P rounded to fp16 before P @ V, measured ~3e-4); fp16 with ``upcast``
1e-4 (P stays fp32, only the output is rounded); bf16 2e-2. bf16 runs on a GPU only: Triton 3.9's interpreter
multiplies bf16 operands of tl.dot as their raw uint16 bits (interpreter.py, create_dot).
"""

import pytest
import torch

from conftest import rel_err

pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
from sdfast.kernels import attention as fa  # noqa: E402
from sdfast.models.layers import attention as seam_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _qkv(b, n, m, heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, heads * d, generator=g).to(DEVICE, dtype) for t in (n, m, m))
    return q, k, v


# (B, N query tokens, M keys, heads, head dim): SD 1.x (8 x 40), 2.x (64), 1.x/2.x deeper levels (80, 160);
# self-attention with token counts that are not multiples of the block, cross-attention on 77 / 154 text tokens.
CASES = [
    (2, 64, 64, 2, 40),
    (1, 37, 77, 2, 80),
    (1, 50, 154, 1, 160),
    (2, 33, 33, 3, 64),
    (1, 100, 77, 2, 40),
    (1, 17, 1, 2, 16),
]


def _id(case):
    return "b{}-n{}-m{}-h{}-d{}".format(*case)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_matches_reference(case):
    q, k, v = _qkv(*case, torch.float32)
    out = fa.attention(q, k, v, case[3])
    assert out.shape == q.shape and out.dtype == torch.float32
    assert rel_err(out, fa.attention_reference(q, k, v, case[3])) < 1e-5


@pytest.mark.parametrize("case", CASES[:3], ids=_id)
@pytest.mark.parametrize("upcast", [False, True], ids=["fp16", "upcast"])
def test_fp16_matches_reference(case, upcast):
    q, k, v = _qkv(*case, torch.float16, seed=1)
    out = fa.attention(q, k, v, case[3], upcast)
    assert out.dtype == torch.float16
    assert rel_err(out, fa.attention_reference(q, k, v, case[3])) < (1e-4 if upcast else 2e-3)


@pytest.mark.gpu(reason="bf16 tl.dot is wrong in Triton's CPU interpreter (raw uint16)")
@pytest.mark.parametrize("case", CASES[:3], ids=_id)
def test_bf16_matches_reference(case):
    q, k, v = _qkv(*case, torch.bfloat16, seed=2)
    assert rel_err(fa.attention(q, k, v, case[3]), fa.attention_reference(q, k, v, case[3])) < 2e-2


def test_reads_fused_qkv_slices_in_place():
    """q, k, v as column slices of one (B, N, 3*H*D) projection (row stride 3*H*D), as the triton backend's fused
    QKV makes them: the same result as contiguous copies."""
    qkv = torch.randn(2, 45, 3 * 2 * 40, device=DEVICE)
    q, k, v = qkv.split(80, dim=-1)
    assert q.stride(1) == 240
    expected = fa.attention(q.contiguous(), k.contiguous(), v.contiguous(), 2)
    torch.testing.assert_close(fa.attention(q, k, v, 2), expected, rtol=0, atol=0)
    assert rel_err(expected, fa.attention_reference(q, k, v, 2)) < 1e-5


def test_large_logits_stay_finite():
    """Logits around 1e4 (what overflows SD 2.1's fp16 attention): the online softmax subtracts the running max,
    so nothing overflows in fp32."""
    q, k, v = _qkv(1, 20, 30, 1, 64, torch.float32, seed=3)
    q, k = q * 30, k * 30
    out = fa.attention(q, k, v, 1)
    assert torch.isfinite(out).all() and rel_err(out, fa.attention_reference(q, k, v, 1)) < 1e-5


def test_reference_equals_the_model_seam():
    """The kernel's reference is the torch seam (sdfast.models.layers.attention, SDPA) in fp32."""
    q, k, v = _qkv(2, 24, 77, 2, 40, torch.float32)
    torch.testing.assert_close(fa.attention_reference(q, k, v, 2), seam_attention(q, k, v, 2))


@pytest.mark.gpu(reason="SD-sized self-attention (4,096 tokens) is too slow for the CPU interpreter")
@pytest.mark.parametrize("n,heads,d", [(4096, 8, 40), (1024, 10, 64), (1024, 8, 80), (256, 8, 160), (16384, 8, 40),
                                       (4096, 10, 64), (1024, 20, 64)])  # the last two: SDXL at 1024 px
def test_sd_shapes_on_gpu(n, heads, d):
    q, k, v = _qkv(2, n, n, heads, d, torch.float16)
    assert rel_err(fa.attention(q, k, v, heads), fa.attention_reference(q, k, v, heads)) < 2e-3


@pytest.mark.parametrize("shapes,heads,message", [
    (((2, 8, 64), (2, 9, 64), (2, 10, 64)), 2, "must both be"),
    (((2, 8, 64), (2, 9, 64), (2, 9, 64)), 3, "does not split into 3 heads"),
    (((2, 8, 1024), (2, 9, 1024), (2, 9, 1024)), 2, "head dim 512"),
    (((8, 64), (9, 64), (9, 64)), 2, r"q \(B, N, H\*D\)"),
])
def test_bad_input_is_named(shapes, heads, message):
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=message):
        fa.attention(q, k, v, heads)
