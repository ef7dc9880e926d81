"""Tiny random-weight reference pipelines (diffusers + transformers), saved as real diffusers folders.

SD1-like: conv projections, one head count for every level, quick_gelu CLIP, epsilon, "<|endoftext|>" padding.
SD2-like: linear projections, per-level head counts, gelu CLIP, v-prediction, "!" padding.
Both use the real CLIP vocabulary and a 4-level VAE (8x, as in SD), at widths that keep CI fast.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sdfast.tokenizer import write_clip_tokenizer


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns the groups into work units
def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` (optionally ``reason=...``): the test needs a CUDA device and is skipped without one,
    saying why; ``-m gpu`` selects exactly these on a GPU machine.

    Under ``pytest -n N --dist loadgroup`` (pytest-xdist) each test file runs whole on one worker, so its module
    fixtures are built once; tests/serve/ stays on one worker too, so that its local Ray clusters (and the timing of
    its load tests) never share the machine with another cluster."""
    serve = Path(__file__).parent / "serve"
    for item in items:
        group = "serve" if item.path.is_relative_to(serve) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU: {marker.kwargs.get('reason', 'GPU only')}"))


# tests/kernels/ run sdfast's Triton kernels in Triton's CPU interpreter where there is no GPU. Triton reads the flag
# when a kernel is defined, i.e. when sdfast.kernels.* is first imported, so it is set here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SD1 = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
              norm_num_groups=8, sample_size=8),
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
              hidden_act="quick_gelu", eos_token_id=2),
    scheduler=dict(prediction_type="epsilon"),
    pad="<|endoftext|>",
)
SD2 = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
              up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=48, attention_head_dim=(2, 4),
              use_linear_projection=True, upcast_attention=True, norm_num_groups=8, sample_size=8),
    text=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, hidden_act="gelu",
              projection_dim=24),
    scheduler=dict(prediction_type="v_prediction"),
    pad="!",
)
VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
# The scheduler_config.json of the SD 1.5 / 2.1 releases (PNDM, as they ship it).
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                 timestep_spacing="leading")


@dataclass
class Reference:
    """A diffusers pipeline in memory and the folder it was saved to."""

    pipe: object  # diffusers.StableDiffusionPipeline
    path: Path
    scheduler_config: dict  # as saved: tests swap pipe.scheduler, this stays


def build_reference(spec: dict, folder: Path, seed: int) -> Reference:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = write_clip_tokenizer(folder / "_tokenizer_src", pad_token=spec["pad"])
    text = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**spec["unet"]).eval(),
            vae=AutoencoderKL(**VAE).eval(),
            text_encoder=CLIPTextModel(text).eval(),
            tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
            scheduler=PNDMScheduler.from_config({**SCHEDULER, **spec["scheduler"]}),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(folder / "model", safe_serialization=True)
    return Reference(pipe, folder / "model", dict(pipe.scheduler.config))


@pytest.fixture(scope="session")
def sd1(tmp_path_factory) -> Reference:
    return build_reference(SD1, tmp_path_factory.mktemp("sd1"), seed=1)


@pytest.fixture(scope="session")
def sd2(tmp_path_factory) -> Reference:
    return build_reference(SD2, tmp_path_factory.mktemp("sd2"), seed=2)


@pytest.fixture(params=["sd1", "sd2"])
def ref(request) -> Reference:
    return request.getfixturevalue(request.param)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- ONNX exports of the tiny models, made once per session for tests/export/ (ONNX, TensorRT, backends, CLI) --


@dataclass
class Exported:
    folder: Path  # written by sdfast export (manifest.json, the graphs, tokenizer/, scheduler/)
    torch: object  # the torch Pipeline the graphs were exported from
    cache: Path | None = None  # the on-the-fly export cache the folder sits in, if any


def _needs_onnx() -> None:
    from sdfast.export.onnx import HAS_ONNX, HAS_ONNXRUNTIME

    if not (HAS_ONNX and HAS_ONNXRUNTIME):
        pytest.skip('ONNX export needs the onnx extra (onnx, onnxslim, onnxscript, onnxruntime): '
                    'pip install -e ".[onnx]"')


def _made_once(tmp_path_factory, name: str, make) -> Path:
    """A new folder of this session's, named after ``name``, holding what ``make(folder)`` writes into an empty one.
    Under pytest-xdist that is made once per run, not once per worker: the first worker to ask makes it in a folder
    the run's workers share (under a file lock, so that the others wait for it), and each worker copies it."""
    own = tmp_path_factory.mktemp(name)
    if "PYTEST_XDIST_WORKER" not in os.environ:
        make(own)
        return own
    from sdfast.export.files import file_lock

    shared = tmp_path_factory.getbasetemp().parent / name  # pytest-N/, beside each worker's popen-gwK/
    done = shared.with_name(name + ".done")
    with file_lock(shared.with_name(name + ".lock"), what=f"making {name} for the tests"):
        if not done.exists():
            shutil.rmtree(shared, ignore_errors=True)  # what a worker that failed left
            shared.mkdir()
            make(shared)
            done.touch()
    shutil.copytree(shared, own, dirs_exist_ok=True)
    return own


def _exported_on_the_fly(ref: Reference, tmp_path_factory, name: str) -> Exported:
    """``ref``'s model in fp32, exported as ``sdfast.load(..., backend="onnxruntime")`` does, into a fresh cache."""
    import sdfast
    from sdfast.export.cache import cached_export

    _needs_onnx()
    pipe = sdfast.load(ref.path)
    cache = _made_once(tmp_path_factory, name, lambda folder: cached_export(pipe, folder))
    return Exported(cached_export(pipe, cache), pipe, cache)  # verifies the entry, and finds it


@pytest.fixture(scope="session")
def sd1_onnx(sd1, tmp_path_factory) -> Exported:
    return _exported_on_the_fly(sd1, tmp_path_factory, "sdfast-cache")


@pytest.fixture(scope="session")
def sd2_fp16_onnx(sd2, tmp_path_factory) -> Exported:
    """sd2 (linear projections, fp32-upcast attention, projected pooled output) in fp16, through `sdfast export`."""
    import sdfast
    from sdfast.cli import main

    def export(folder: Path) -> None:
        assert main(["export", str(sd2.path), "-o", str(folder / "onnx"), "--dtype", "fp16"]) == 0

    _needs_onnx()
    return Exported(_made_once(tmp_path_factory, "sd2-fp16", export) / "onnx", sdfast.load(sd2.path, dtype="fp16"))


# -- SDXL: tiny random base and refiner pipelines (diffusers' StableDiffusionXL*), saved as diffusers folders --

# Base: a level without attention, then transformer depths 1 and 2 (SDXL: none, 2, 10), linear projections;
# CLIP-L-like (quick_gelu, 32 wide) + bigG-like (gelu, 48 wide, projected pooled output 24) = an 80-wide context;
# 6 micro-conditioning numbers x 8 + 24 pooled = 72 added inputs (SDXL: 6 x 256 + 1280 = 2816).
SDXL_UNET = dict(block_out_channels=(32, 32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, norm_num_groups=8, sample_size=8)
SDXL_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                 hidden_act="quick_gelu")
SDXL_TEXT_2 = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                   hidden_act="gelu", projection_dim=24)
SDXL_VAE = dict(VAE, scaling_factor=0.13025, force_upcast=True)


def build_sdxl_reference(folder: Path, seed: int, refiner: bool = False) -> Reference:
    """A tiny SDXL base (StableDiffusionXLPipeline) or refiner (StableDiffusionXLImg2ImgPipeline: the second
    encoder only, aesthetic-score conditioning), with the Euler scheduler the SDXL releases ship."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok", pad_token="<|endoftext|>"))
    tok_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok2", pad_token="!"))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                        **SDXL_TEXT_2)).eval()
    numbers = 5 if refiner else 6
    context = SDXL_TEXT_2["hidden_size"] + (0 if refiner else SDXL_TEXT["hidden_size"])
    unet = UNet2DConditionModel(**SDXL_UNET, cross_attention_dim=context,
                                projection_class_embeddings_input_dim=SDXL_TEXT_2["projection_dim"] + numbers * 8)
    parts = dict(vae=AutoencoderKL(**SDXL_VAE).eval(), text_encoder_2=text_2, tokenizer_2=tok_2, unet=unet.eval(),
                 scheduler=EulerDiscreteScheduler.from_config(SCHEDULER), add_watermarker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if refiner:
            pipe = StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                                                    force_zeros_for_empty_prompt=False, **parts)
        else:
            text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **SDXL_TEXT)).eval()
            pipe = StableDiffusionXLPipeline(text_encoder=text, tokenizer=tok, **parts)
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(folder / "model", safe_serialization=True)
    return Reference(pipe, folder / "model", dict(pipe.scheduler.config))


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory) -> Reference:
    return build_sdxl_reference(tmp_path_factory.mktemp("sdxl"), seed=3)


@pytest.fixture(scope="session")
def sdxl_refiner(tmp_path_factory) -> Reference:
    return build_sdxl_reference(tmp_path_factory.mktemp("sdxl-refiner"), seed=4, refiner=True)


@pytest.fixture(scope="session")
def sdxl_onnx(sdxl, tmp_path_factory) -> Exported:
    """Five graphs: two text encoders, the U-Net with text_embeds / time_ids, the VAE's two halves."""
    return _exported_on_the_fly(sdxl, tmp_path_factory, "sdfast-cache-xl")
