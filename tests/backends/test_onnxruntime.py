"""The onnxruntime backend (sdfast.backends): ``Pipeline.generate`` on the exported graphs equals the torch backend
with the same seed and scheduler, for text to image, CLIP skip, long prompts, batches and img2img."""

import numpy as np
import pytest
import torch
from PIL import Image

import sdfast
from conftest import rel_err
from sdfast import backends

pytest.importorskip("onnxruntime", reason='the onnx extra is not installed: pip install -e ".[onnx]"')

from sdfast.backends.onnxruntime import Session, providers_for  # noqa: E402

LATENT_TOL = 1e-4


@pytest.fixture(scope="module")
def ort(sd1_onnx):
    return sdfast.load(sd1_onnx.folder, backend="onnxruntime")


@pytest.mark.parametrize("kwargs", [
    dict(scheduler="euler"),
    dict(scheduler="euler_a", clip_skip=2),  # step noise from the generator, and the penultimate CLIP layer
    dict(scheduler="dpmpp_2m", long_prompts=True, guidance_scale=5.0),
    dict(scheduler="ddim", batch_size=2, guidance_scale=1.0, width=64, height=96),
])
def test_txt2img_equals_torch(sd1_onnx, ort, kwargs):
    prompt = "a red circle at the top left" + (" and a blue square" * 12 if kwargs.get("long_prompts") else "")
    expected = sd1_onnx.torch.generate(prompt, negative_prompt="blurry", steps=4, seed=7, **kwargs)
    result = ort.generate(prompt, negative_prompt="blurry", steps=4, seed=7, **kwargs)
    assert result.latents.shape == expected.latents.shape
    assert rel_err(result.latents, expected.latents) < LATENT_TOL
    assert np.abs(np.stack(result.images).astype(int) - np.stack(expected.images).astype(int)).max() <= 1


@pytest.mark.parametrize("scheduler,strength", [("euler", 0.6), ("ddim", 1.0)])
def test_img2img_equals_torch(sd1_onnx, ort, scheduler, strength):
    """The VAE-encoder graph gives the posterior; the backend samples it with the generator exactly like
    AutoencoderKL.encode, so the img2img latents agree."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    expected = sd1_onnx.torch.generate("a cat", image=image, strength=strength, steps=5, scheduler=scheduler, seed=4)
    result = ort.generate("a cat", image=image, strength=strength, steps=5, scheduler=scheduler, seed=4)
    assert rel_err(result.latents, expected.latents) < LATENT_TOL


def test_networks_keep_the_torch_signatures(sd1_onnx, ort):
    pipe = sd1_onnx.torch
    assert ort.unet.config == pipe.unet.config and ort.vae.config == pipe.vae.config
    assert ort.text_encoder.config == pipe.text_encoder.config and ort.scheduler_config == pipe.scheduler_config
    ids = pipe.tokenizer.encode(["a cat", "a dog"])[:, 0]
    for clip_skip in (1, 3):
        got, want = ort.text_encoder(ids, clip_skip=clip_skip), pipe.text_encoder(ids, clip_skip=clip_skip)
        assert all(rel_err(g, w) < LATENT_TOL for g, w in zip(got, want))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    assert rel_err(ort.unet(x, torch.tensor(500), ctx), pipe.unet(x, torch.tensor(500), ctx)) < LATENT_TOL
    assert rel_err(ort.vae.decode(x), pipe.vae.decode(x)) < LATENT_TOL
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    got = ort.vae.encode(image, torch.Generator().manual_seed(1))
    assert rel_err(got, pipe.vae.encode(image, torch.Generator().manual_seed(1))) < LATENT_TOL
    with pytest.raises(ValueError, match=r"clip_skip=5 is out of range"):
        ort.text_encoder(ids, clip_skip=5)


def test_a_checkpoint_loads_from_the_export_cache(sd1, sd1_onnx):
    """sdfast.load(checkpoint, backend=...) hashes the weights and finds the export made before: no new export."""
    before = sorted(p.name for p in sd1_onnx.cache.iterdir())
    pipe = sdfast.load(sd1.path, backend="onnxruntime", cache=sd1_onnx.cache)
    assert sorted(p.name for p in sd1_onnx.cache.iterdir()) == before
    assert isinstance(pipe.unet, backends.exported.UNet)
    a = pipe.generate("a cat", steps=2, seed=1)
    assert rel_err(a.latents, sd1_onnx.torch.generate("a cat", steps=2, seed=1).latents) < LATENT_TOL


def test_bad_backend_requests(sd1, sd1_onnx):
    with pytest.raises(ValueError, match="unknown backend 'trt'; choose one of torch, triton, compile, onnxruntime, tensorrt"):
        sdfast.load(sd1.path, backend="trt")
    with pytest.raises(ValueError, match="is an ONNX export .no torch weights."):
        sdfast.load(sd1_onnx.folder)
    with pytest.raises(ValueError, match=r"exported in fp32, so it runs in torch.float32, not torch.float16"):
        sdfast.load(sd1_onnx.folder, backend="onnxruntime", dtype="fp16")
    with pytest.raises(ValueError, match="the torch backend takes no options"):
        sdfast.load(sd1.path, cache="/tmp")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(ValueError, match=r"no CUDA provider; available providers: .*; installed: onnxruntime "
                                             r".*Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                                             r"onnxruntime-gpu"):
            providers_for(torch.device("cuda"))


def test_a_graph_ort_cannot_capture_is_named(sd1_onnx, monkeypatch):
    import sdfast.backends.onnxruntime as ort_backend

    def refuse(path, providers):
        raise RuntimeError("This session cannot use the graph capture feature as requested by the user")

    monkeypatch.setattr(ort_backend, "ort_session", refuse)
    with pytest.raises(ValueError, match=r"cannot capture unet.onnx in a CUDA graph .*load without cuda_graph=True"):
        Session(sd1_onnx.folder / "unet.onnx", torch.device("cpu"), ["CPUExecutionProvider"], cuda_graph=True)


def test_cuda_graph_bookkeeping(sd1_onnx):
    """What cuda_graph=True adds around a run, on the CPU provider (which ignores gpu_graph_id; only the CUDA
    provider captures): one set of static tensors and one graph id per input shape, results equal to the plain
    binding's, and returned outputs that the next replay does not overwrite."""
    path, cpu = sd1_onnx.folder / "unet.onnx", torch.device("cpu")
    graphed = Session(path, cpu, ["CPUExecutionProvider"], cuda_graph=True)
    plain = Session(path, cpu)
    g = torch.Generator().manual_seed(0)

    def call(session, batch, side, seed_shift=0.0):
        inputs = {"sample": torch.randn(batch, 4, side, side, generator=g) + seed_shift,
                  "timestep": torch.full((batch,), 500.0), "context": torch.randn(batch, 77, 32, generator=g)}
        return inputs, session(inputs, {"noise": (batch, 4, side, side)})["noise"]

    _, first = call(graphed, 2, 8)
    kept = first.clone()
    for batch, side in [(2, 8), (1, 16), (2, 8), (1, 16)]:
        inputs, got = call(graphed, batch, side, seed_shift=1.0)
        assert torch.equal(got, plain(inputs, {"noise": got.shape})["noise"])
    assert torch.equal(first, kept)  # a copy, not the static output tensor that later replays wrote into
    assert len(graphed.captured) == 2
    ids = [c.run_options.get_run_config_entry("gpu_graph_id") for c in graphed.captured.values()]
    assert ids == ["0", "1"]
    with pytest.raises(ValueError, match="cuda_graph=True needs the CUDA provider"):
        sdfast.load(sd1_onnx.folder, backend="onnxruntime", cuda_graph=True)


def _needs_cuda_provider():
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")


@pytest.mark.gpu(reason="the CUDA provider with IO binding needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_provider_with_io_binding_equals_torch(sd1_onnx, cuda_graph):
    """The CUDA provider with IO binding, and with CUDA graphs (two sizes: two graphs; 4 steps: warm-up runs, the
    capture and replays), against the torch backend on the CPU."""
    _needs_cuda_provider()
    pipe = sdfast.load(sd1_onnx.folder, backend="onnxruntime", device="cuda", cuda_graph=cuda_graph)
    for width in (64, 96):
        result = pipe.generate("a red circle", steps=4, seed=3, width=width, height=64)
        assert result.latents.device.type == "cuda"
        expected = sd1_onnx.torch.generate("a red circle", steps=4, seed=3, width=width, height=64)
        assert rel_err(result.latents.cpu(), expected.latents) < 1e-3  # cuDNN / cuBLAS kernels, not the CPU's
    if cuda_graph:
        assert len(pipe.unet.run.captured) == 2
