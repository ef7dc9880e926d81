"""The ``triton`` and ``compile`` backends through ``sdfast.load(..., backend=...)`` on the tiny SD1-like model:
``Pipeline.generate`` equals the torch backend with the same seed. On CPU the triton backend's kernels run in
Triton's interpreter (no CUDA graphs); the GPU cases (fp16, CUDA graphs, max-autotune) skip without a GPU."""

import numpy as np
import pytest
import torch

import sdfast
from conftest import rel_err
from sdfast.backends.triton import CudaGraphUNet, FusedSelfAttention, prepare_modules
from sdfast.models.layers import GroupNorm
from sdfast.models.layers import attention as torch_attention
from sdfast.models.layers import group_norm as torch_group_norm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # fp32 parity runs on the GPU where there is one, else in the interpreter
ARGS = dict(prompt="a red circle", negative_prompt="blurry", steps=2, seed=3, width=32, height=32)


def _same_images(a, b) -> bool:
    return np.abs(np.stack(a.images).astype(int) - np.stack(b.images).astype(int)).max() <= 1


@pytest.fixture(scope="module")
def expected(sd1):
    return sdfast.load(sd1.path, device=DEVICE).generate(**ARGS)


def test_triton_backend_equals_torch(sd1, expected):
    pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
    pipe = sdfast.load(sd1.path, device=DEVICE, dtype="fp32", backend="triton", cuda_graph=False)
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block.attn1, FusedSelfAttention)
    assert all(m.kernel is not torch_group_norm for m in pipe.unet.modules() if isinstance(m, GroupNorm))
    assert block.attn2.kernel is not torch_attention
    result = pipe.generate(**ARGS)
    assert rel_err(result.latents, expected.latents) < 1e-5
    assert _same_images(result, expected)


def test_triton_backend_without_kernels_keeps_torch_ops_at_the_seams(sd1, expected):
    """kernels=False: the backend's other steps (fused QKV, channels-last, CUDA graphs on a GPU) over torch's own
    GroupNorm and attention, so a benchmark can tell the kernels' share from the rest."""
    pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
    pipe = sdfast.load(sd1.path, device=DEVICE, dtype="fp32", backend="triton", kernels=False, cuda_graph=False)
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block.attn1, FusedSelfAttention)
    assert all(m.kernel is torch_group_norm for m in pipe.unet.modules() if isinstance(m, GroupNorm))
    assert block.attn2.kernel is torch_attention
    result = pipe.generate(**ARGS)
    assert rel_err(result.latents, expected.latents) < 1e-5


def test_prepare_keeps_the_checkpoint_names_and_values(sd1):
    """Fusing QKV at apply time leaves state_dict() as loaded: same keys, same tensors (to_q/k/v are views)."""
    pipe = sdfast.load(sd1.path)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    unet = prepare_modules(pipe.unet, channels_last=True, fuse_qkv=True)
    after = unet.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.to_k.weight.data.mul_(2)  # an in-place update (as a LoRA merge does) reaches the fused GEMM
    assert torch.equal(attn.qkv_weight[attn.to_q.out_features:2 * attn.to_q.out_features], attn.to_k.weight)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_backend_equals_torch(sd1, expected):
    """Dynamo traces the prepared U-Net as one graph (fullgraph=True: a graph break fails). Inductor's CPU code
    generation takes minutes on a small CI machine, so CI checks the trace with the 'eager' compiler; the GPU test
    below runs Inductor."""
    pipe = sdfast.load(sd1.path, device=DEVICE, dtype="fp32", backend="compile", compiler="eager")
    result = pipe.generate(**ARGS)
    assert rel_err(result.latents, expected.latents) < 1e-5
    assert _same_images(result, expected)


@pytest.mark.parametrize("backend,options,message", [
    ("triton", dict(graphs=True), r"no option\(s\) \['graphs'\]"),
    ("compile", dict(fullgraph=False), r"no option\(s\) \['fullgraph'\]"),
    ("triton", dict(cache="x"), r"no option\(s\) \['cache'\]"),
    ("triton", dict(autotune="fast"), r"autotune='fast': choose 'quick' .* or 'full'"),
])
def test_bad_options_are_named(sd1, backend, options, message):
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
    with pytest.raises(ValueError, match=message):
        sdfast.load(sd1.path, backend=backend, **options)


def test_triton_on_cpu_without_the_interpreter_is_refused(sd1, monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        sdfast.load(sd1.path, device="cpu", backend="triton")


@pytest.mark.gpu(reason="CUDA graphs and fp16 Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "compile"])
def test_gpu_fp16_equals_torch(sd1, backend):
    """fp16 on the GPU (the backends' default dtype there), CUDA graphs on, two sizes (two captured graphs)."""
    reference = sdfast.load(sd1.path, device="cuda", dtype="fp16")
    # Inductor with CUDA graphs, without max-autotune's GEMM template search (minutes, even on this tiny model)
    options = dict(mode="reduce-overhead") if backend == "compile" else {}
    pipe = sdfast.load(sd1.path, device="cuda", backend=backend, **options)
    assert pipe.dtype == torch.float16
    if backend == "triton":
        assert isinstance(pipe.unet, CudaGraphUNet)
    for size in (32, 48):
        args = dict(ARGS, width=size, height=size)
        got, want = pipe.generate(**args), reference.generate(**args)
        assert rel_err(got.latents, want.latents) < 1e-2
    if backend == "triton":
        assert len(pipe.unet.graphs) == 2


# -- SDXL: the same backends on the tiny SDXL base (text_embeds / time_ids beside the context) --


@pytest.fixture(scope="module")
def expected_xl(sdxl):
    return sdfast.load(sdxl.path, device=DEVICE).generate(**ARGS)


def test_triton_backend_equals_torch_on_sdxl(sdxl, expected_xl):
    """A level without attention, depth-2 transformer stacks, a 2-encoder context and the added conditioning:
    the converted U-Net gives the torch backend's latents."""
    pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
    pipe = sdfast.load(sdxl.path, device=DEVICE, dtype="fp32", backend="triton", cuda_graph=False)
    assert pipe.is_xl
    block = pipe.unet.down_blocks[2].attentions[0].transformer_blocks[1]
    assert isinstance(block.attn1, FusedSelfAttention) and block.attn2.kernel is not torch_attention
    result = pipe.generate(**ARGS)
    assert rel_err(result.latents, expected_xl.latents) < 1e-5
    assert _same_images(result, expected_xl)


def test_compile_backend_equals_torch_on_sdxl(sdxl, expected_xl):
    """fullgraph=True traces the SDXL U-Net with its keyword inputs in one graph."""
    pipe = sdfast.load(sdxl.path, device=DEVICE, dtype="fp32", backend="compile", compiler="eager")
    result = pipe.generate(**ARGS)
    assert rel_err(result.latents, expected_xl.latents) < 1e-5
    assert _same_images(result, expected_xl)


@pytest.mark.gpu(reason="CUDA graphs and fp16 Triton kernels need a CUDA GPU")
def test_gpu_cuda_graphs_key_on_sdxl_inputs(sdxl):
    """One graph per (latent, context, text_embeds, time_ids) shape set: another size or a batch of two captures
    anew, and each replay equals the torch backend."""
    reference = sdfast.load(sdxl.path, device="cuda", dtype="fp16")
    pipe = sdfast.load(sdxl.path, device="cuda", backend="triton")
    assert isinstance(pipe.unet, CudaGraphUNet)
    for size, batch in ((32, 1), (48, 1), (32, 2)):
        args = dict(ARGS, width=size, height=size, batch_size=batch)
        got, want = pipe.generate(**args), reference.generate(**args)
        assert rel_err(got.latents, want.latents) < 1e-2
    assert len(pipe.unet.graphs) == 3
    assert all({"text_embeds", "time_ids"} <= {name for name, *_ in inputs} for _, inputs in pipe.unet.graphs)
