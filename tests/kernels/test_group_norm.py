"""The GroupNorm(+SiLU) kernel against its plain-torch reference (evaluated in fp64), in Triton's interpreter on CPU
(TRITON_INTERPRET=1, set in tests/conftest.py when there is no GPU).

Bounds (relative L2): fp32 1e-5; fp16 1e-3 (one output rounding, ~3e-4); bf16 1e-2, because Triton's interpreter
casts fp32 -> bf16 by truncation (one full bf16 ulp, ~4e-3, where the GPU rounds to nearest).
"""

import pytest
import torch

from conftest import rel_err

pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
from sdfast.kernels import group_norm as gn  # noqa: E402
from sdfast.models.layers import group_norm as seam_group_norm  # noqa: E402

# SiLU's sigmoid overflows exp() for very negative inputs in the interpreter's numpy (to the right limit, 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(b, c, h, w, dtype, channels_last, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=g) * std + mean).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = (1 + 0.5 * torch.randn(c, generator=g)).to(DEVICE, dtype)
    bias = (0.5 * torch.randn(c, generator=g)).to(DEVICE, dtype)
    return x, weight, bias


# (B, C, H, W, groups): the tiny test models' 8 / 16 groups; SD's 32 groups with 10, 20, 40 channels per group
# (320 / 640 / 1280 channels) and the VAE's 4; odd spatial sizes; one element per group. Every shape in fp32 in both
# layouts; fp16 and bf16 on a few (the interpreter takes ~1 s a call, so the grid is kept lean).
SHAPES = [(2, 32, 8, 8, 8), (1, 64, 5, 7, 16), (2, 320, 4, 4, 32), (1, 640, 3, 5, 32), (1, 1280, 2, 3, 32),
          (1, 128, 9, 11, 32), (3, 16, 1, 1, 16)]
CASES = ([(shape, torch.float32, cl) for shape in SHAPES for cl in (False, True)]
         + [(shape, dtype, cl) for shape in SHAPES[1:3] for dtype in (torch.float16, torch.bfloat16)
            for cl in (False, True)])


@pytest.mark.parametrize("shape,dtype,channels_last", CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}-{'nhwc' if cl else 'nchw'}" for s, d, cl in CASES])
def test_matches_reference(shape, dtype, channels_last):
    *size, groups = shape
    silu = sum(size) % 2 == 0  # both variants over the shapes, one kernel call per case
    x, weight, bias = _inputs(*size, dtype, channels_last, mean=1.0, std=2.0)
    y = gn.group_norm(x, weight, bias, groups, 1e-5, silu)
    expected = gn.group_norm_reference(x.double(), weight.double(), bias.double(), groups, 1e-5, silu)
    assert y.shape == x.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert rel_err(y, expected) < BOUND[dtype]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_many_chunks_and_a_large_mean(monkeypatch, channels_last):
    """Small chunks force a group's statistics to be combined from many programs (Chan's formula); a mean of 300
    with std 0.05 would lose the variance to cancellation in fp32 E[x^2] - E[x]^2 (~100% error). Checked against
    fp64: what remains is the fp32 mean's own rounding, 300 * 6e-8 / 0.05 ~ 4e-4."""
    monkeypatch.setattr(gn, "CHUNK_ELEMENTS", 64)
    x, weight, bias = _inputs(2, 40, 9, 13, torch.float32, channels_last, mean=300.0, std=0.05, seed=3)
    expected = gn.group_norm_reference(x.double(), weight.double(), bias.double(), 4, 1e-6, True)
    assert rel_err(gn.group_norm(x, weight, bias, 4, 1e-6, True), expected) < 1e-3


# The ResNet block's time-embedding add, GroupNorm(x + shift[:, :, None, None]): SD's 10 channels per group (a
# masked channel tile), both layouts, fp16; a shift of +-300 around activations of std 0.5 checks that the kernel
# centres x + shift, not x, when there are many chunks to combine.
SHIFT_CASES = [((2, 320, 4, 4, 32), torch.float32, False, 1.0), ((2, 320, 4, 4, 32), torch.float32, True, 1.0),
               ((1, 64, 5, 7, 16), torch.float16, True, 1.0), ((2, 40, 9, 13, 4), torch.float32, False, 300.0)]


@pytest.mark.parametrize("shape,dtype,channels_last,scale", SHIFT_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}-{'nhwc' if cl else 'nchw'}-shift{k:g}"
                              for s, d, cl, k in SHIFT_CASES])
def test_shift_matches_reference(monkeypatch, shape, dtype, channels_last, scale):
    monkeypatch.setattr(gn, "CHUNK_ELEMENTS", 64)  # several chunks per group even at these small sizes
    *size, groups = shape
    x, weight, bias = _inputs(*size, dtype, channels_last, std=0.5)
    shift = (scale * torch.randn(size[0], size[1], generator=torch.Generator().manual_seed(1))).to(DEVICE, dtype)
    y = gn.group_norm(x, weight, bias, groups, 1e-5, True, shift)
    expected = gn.group_norm_reference(x.double(), weight.double(), bias.double(), groups, 1e-5, True,
                                       shift.double())
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, expected) < BOUND[dtype]
    # the shift changes the answer (a kernel ignoring it fails here): per-channel shifts move each group's statistics
    assert rel_err(y, gn.group_norm_reference(x.double(), weight.double(), bias.double(), groups, 1e-5, True)) > 0.1


@pytest.mark.parametrize("with_shift", [False, True], ids=["plain", "shift"])
def test_reference_equals_the_model_seam(with_shift):
    """The kernel's reference is the torch seam's maths (sdfast.models.layers.group_norm) in fp32."""
    x, weight, bias = _inputs(2, 32, 6, 6, torch.float32, False)
    shift = torch.randn(2, 32, device=DEVICE) if with_shift else None
    torch.testing.assert_close(gn.group_norm_reference(x, weight, bias, 8, 1e-6, True, shift),
                               seam_group_norm(x, weight, bias, 8, 1e-6, True, shift))


def test_a_shift_of_the_wrong_shape_is_named():
    x, weight, bias = _inputs(2, 32, 4, 4, torch.float32, False)
    with pytest.raises(ValueError, match=r"shift \(1, 32\) must be \(2, 32\)"):
        gn.group_norm(x, weight, bias, 8, 1e-5, True, torch.zeros(1, 32, device=DEVICE))


def test_strided_input_is_made_contiguous():
    """A layout that is neither NCHW nor channels-last (a sliced view) is copied, not misread."""
    x, weight, bias = _inputs(1, 16, 6, 10, torch.float32, False)
    view = x[:, :, :, ::2]  # (1, 16, 6, 5), W stride 2
    assert rel_err(gn.group_norm(view, weight, bias, 4, 1e-5, False),
                   gn.group_norm_reference(view, weight, bias, 4, 1e-5, False)) < 1e-5


@pytest.mark.parametrize("args,message", [
    (((2, 30, 4, 4), 8, torch.float32), "do not split into 8 groups"),
    (((2, 32, 16), 8, torch.float32), r"\(B, C, H, W\)"),
    (((2, 32, 4, 4), 8, torch.float64), "fp16, bf16 and fp32"),
])
def test_bad_input_is_named(args, message):
    shape, groups, dtype = args
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    weight = torch.ones(shape[1], dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        gn.group_norm(x, weight, torch.zeros_like(weight), groups, 1e-5, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_groups_wider_than_every_tile_take_the_torch_path(dtype):
    """A group wider than the smallest tile (one group of 512 channels here) cannot fit the kernel's tiles; the
    launcher answers with the reference maths instead of failing to compile, in the input's dtype."""
    channels = 2 * gn.MIN_TILE
    x, weight, bias = _inputs(1, channels, 2, 2, dtype, False, mean=0.5, std=1.5)
    shift = torch.randn(1, channels, device=DEVICE).to(dtype)
    expected = gn.group_norm_reference(x.double(), weight.double(), bias.double(), 1, 1e-5, True, shift.double())
    y = gn.group_norm(x, weight, bias, 1, 1e-5, True, shift)
    assert y.dtype == dtype and rel_err(y, expected) < BOUND[dtype]
