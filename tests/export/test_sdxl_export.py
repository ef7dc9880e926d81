"""SDXL through ONNX: the five graphs (two text encoders with raw hidden states, the U-Net with ``text_embeds`` and
``time_ids``) equal the torch model; the onnxruntime backend generates what the torch backend does, for the base and
the refiner (no first text encoder); an fp16 export keeps SDXL's VAE in fp32; TensorRT-RTX builds the U-Net engine
with its extra inputs. Running engines needs a CUDA GPU: that test is marked ``gpu``."""

import json

import numpy as np
import pytest
import torch

import sdfast
from conftest import rel_err

pytest.importorskip("onnx", reason='the onnx extra is not installed: pip install -e ".[onnx]"')
pytest.importorskip("onnxruntime", reason='the onnx extra is not installed: pip install -e ".[onnx]"')

from sdfast.backends import exported  # noqa: E402
from sdfast.export import graphs  # noqa: E402
from sdfast.export import onnx as export  # noqa: E402
from sdfast.export import tensorrt as trt  # noqa: E402
from sdfast.export.check import TOLERANCE  # noqa: E402
from sdfast.export.errors import EngineError  # noqa: E402
from sdfast.export.flavour import HAS_TENSORRT  # noqa: E402
from sdfast.export.manifest import read_manifest  # noqa: E402
from sdfast.export.profiles import Shapes, check_shapes  # noqa: E402

LATENT_TOL = 1e-4
PROMPT = "a red circle at the top left"
NEEDS_TRT = pytest.mark.skipif(not HAS_TENSORRT, reason="no TensorRT module: pip install "
                               "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")


@pytest.fixture(scope="module")
def ort(sdxl_onnx):
    return sdfast.load(sdxl_onnx.folder, backend="onnxruntime")


def _same(result, expected) -> None:
    assert result.latents.shape == expected.latents.shape
    assert rel_err(result.latents, expected.latents) < LATENT_TOL
    assert np.abs(np.stack(result.images).astype(int) - np.stack(expected.images).astype(int)).max() <= 1


@pytest.mark.parametrize("kwargs", [
    dict(negative_prompt="blurry"),
    dict(),  # no negative prompt: force_zeros_for_empty_prompt gives zero negative embeddings, as in torch
    dict(width=64, height=48, batch_size=2, clip_skip=2, original_size=(96, 128), crops_coords_top_left=(8, 0)),
    dict(scheduler="dpmpp_2m", long_prompts=True, guidance_scale=5.0),  # a 154-token context
])
def test_txt2img_equals_torch(sdxl_onnx, ort, kwargs):
    prompt = PROMPT + (" and a blue square" * 12 if kwargs.get("long_prompts") else "")
    _same(ort.generate(prompt, steps=3, seed=7, **kwargs), sdxl_onnx.torch.generate(prompt, steps=3, seed=7, **kwargs))


def test_manifest_and_graphs(sdxl_onnx, ort):
    """Five graphs within 1e-4 of torch; the U-Net's extra inputs (fp32 micro-conditioning); raw hidden states
    that the wrappers refuse to pass off as normalised ones; the second tokenizer and the pipeline options."""
    folder, pipe = sdxl_onnx.folder, sdxl_onnx.torch
    manifest = read_manifest(folder)
    assert sorted(manifest["networks"]) == sorted(graphs.NETWORKS)
    for name, net in manifest["networks"].items():
        assert all(err < LATENT_TOL for err in net["check"]["rel_err"].values()), (name, net["check"])
    assert manifest["networks"]["unet"]["inputs"] == [
        {"name": "sample", "shape": ["batch", 4, "height", "width"], "dtype": "float32"},
        {"name": "timestep", "shape": ["batch"], "dtype": "float32"},
        {"name": "context", "shape": ["batch", "tokens", 80], "dtype": "float32"},
        {"name": "text_embeds", "shape": ["batch", 24], "dtype": "float32"},
        {"name": "time_ids", "shape": ["batch", 6], "dtype": "float32"}]
    assert manifest["text_final_norm"] is False and manifest["options"]["force_zeros_for_empty_prompt"] is True
    assert manifest["configs"]["text_encoder_2"]["projection_dim"] == 24
    assert (folder / manifest["tokenizer_2"] / "tokenizer.json").is_file()
    assert ort.is_xl and ort.xl_options == pipe.xl_options and ort.tokenizer_2.pad_id == pipe.tokenizer_2.pad_id
    ids = pipe.tokenizer_2.encode(["a cat", "a dog on a hill"])[:, 0]  # (2, 77)
    for clip_skip in (1, 2):  # SDXL's own layer and one deeper: raw states, projected pooled output
        got, want = ort.text_encoder_2(ids, clip_skip, final_norm=False), pipe.text_encoder_2(ids, clip_skip,
                                                                                                final_norm=False)
        assert all(rel_err(g, w) < LATENT_TOL for g, w in zip(got, want))
    with pytest.raises(ValueError, match=r"holds raw \(SDXL\) hidden states, so it cannot give final_norm=True"):
        ort.text_encoder_2(ids)
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 80), torch.randn(2, 24)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    assert rel_err(ort.unet(x, 500, ctx, text_embeds=pooled, time_ids=time_ids),
                   pipe.unet(x, 500, ctx, text_embeds=pooled, time_ids=time_ids)) < LATENT_TOL
    with pytest.raises(ValueError, match="this is an SDXL U-Net: pass text_embeds"):
        ort.unet(x, 500, ctx)


def test_a_checkpoint_loads_on_onnxruntime_through_the_cache(sdxl, sdxl_onnx):
    """sdfast.load(checkpoint, backend="onnxruntime") finds the export of the same weights in the cache."""
    pipe = sdfast.load(sdxl.path, backend="onnxruntime", cache=sdxl_onnx.cache)
    assert pipe.is_xl and isinstance(pipe.unet, exported.UNet)
    _same(pipe.generate(PROMPT, steps=2, seed=3), sdxl_onnx.torch.generate(PROMPT, steps=2, seed=3))


def test_refiner_equals_torch(sdxl_refiner, tmp_path):
    """The refiner exports four graphs (its only text encoder is the second) with 5 micro-conditioning numbers
    (the aesthetic scores), and finishes a hand-off from part-denoised latents as the torch backend does."""
    torch_pipe = sdfast.load(sdxl_refiner.path)
    pipe = sdfast.load(sdxl_refiner.path, backend="onnxruntime", cache=tmp_path)
    manifest = json.loads(next(tmp_path.glob("*/manifest.json")).read_text())
    assert sorted(manifest["networks"]) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert "tokenizer" not in manifest and manifest["networks"]["unet"]["inputs"][-1]["shape"] == ["batch", 5]
    assert pipe.text_encoder is None and pipe.xl_options["requires_aesthetics_score"] is True
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(latents=latents, denoising_start=0.5, steps=4, seed=2, aesthetic_score=7.0)
    _same(pipe.generate(PROMPT, **kwargs), torch_pipe.generate(PROMPT, **kwargs))


def test_fp16_export_keeps_the_sdxl_vae_in_fp32(sdxl, tmp_path):
    """SDXL's VAE says force_upcast: the fp16 pipeline decodes it in fp32, so its graphs are fp32 too (an fp16
    graph would overflow on the real weights and hand back NaN)."""
    pipe = sdfast.load(sdxl.path, dtype="fp16")
    manifest = export.export_pipeline(pipe, tmp_path, networks=("vae_decoder",))
    net = manifest["networks"]["vae_decoder"]
    assert manifest["dtype"] == "fp16" and {t["dtype"] for t in net["inputs"] + net["outputs"]} == {"float32"}
    assert max(net["check"]["rel_err"].values()) < TOLERANCE["fp16"]
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float16}  # the export copied, the pipeline is as it was


@NEEDS_TRT
def test_tensorrt_builds_the_sdxl_engines(sdxl_onnx):
    """TensorRT-RTX (no GPU needed to build) parses the SDXL U-Net and second text encoder and builds them with
    profiles for the extra inputs: one row per sample, so their batch doubles under guidance like the latents'."""
    built = trt.build_engines(sdxl_onnx.folder, Shapes.parse(["64x64-64x96"], [1, 2]),
                              networks=("unet", "text_encoder_2"), log=print)
    unet = built["unet"].meta
    assert {t["name"]: (t["mode"], t["dtype"]) for t in unet["io"]} == {
        "sample": ("input", "float32"), "timestep": ("input", "float32"), "context": ("input", "float32"),
        "text_embeds": ("input", "float32"), "time_ids": ("input", "float32"), "noise": ("output", "float32")}
    profile = unet["profiles"][0]
    assert profile["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 12, 8]]
    assert profile["text_embeds"] == [[1, 24], [2, 24], [4, 24]] and profile["time_ids"] == [[1, 6], [2, 6], [4, 6]]
    assert built["text_encoder_2"].meta["profiles"] == [{"input_ids": [[1, 77], [2, 77], [4, 77]]}]
    assert check_shapes(unet, {"sample": (2, 4, 8, 8), "timestep": (2,), "context": (2, 77, 80),
                               "text_embeds": (2, 24), "time_ids": (2, 6)}) == 0
    with pytest.raises(EngineError, match=r"is outside the engine's profiles; allowed: .*text_embeds \(1..4, 24\)"):
        check_shapes(unet, {"sample": (6, 4, 8, 8), "timestep": (6,), "context": (6, 77, 80),
                            "text_embeds": (6, 24), "time_ids": (6, 6)})


@pytest.mark.gpu(reason="TensorRT engines execute only on a CUDA GPU")
@NEEDS_TRT
def test_tensorrt_backend_matches_torch(sdxl_onnx):
    """fp32 engines (TensorRT may use TF32 for fp32 matmuls, hence 1e-2), built for the model's own size."""
    pipe = sdfast.load(sdxl_onnx.folder, backend="tensorrt", device="cuda", build=True)
    result = pipe.generate(PROMPT, steps=3, seed=7)
    assert rel_err(result.latents.cpu(), sdxl_onnx.torch.generate(PROMPT, steps=3, seed=7).latents) < 1e-2
