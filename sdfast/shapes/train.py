"""Trains sdfast's shipped default model on the synthetic shapes and writes it as a diffusers folder.

    python -m sdfast.shapes.train --out sdfast/data/default_model   # the shipped model (defaults = its arguments)
    python -m sdfast.shapes.train --out /tmp/m --quick               # seconds: every stage once, for CI

Same architecture and file layout as Stable Diffusion 1.x, only narrower: a KL-VAE with 8x downsampling (64x64
images <-> 8x8x4 latents), a CLIP text encoder on the real CLIP vocabulary, a U-Net with cross-attention. The
networks are sdfast's own, built from the diffusers / transformers configs below, which are also written as the
folder's config.json files, so diffusers' StableDiffusionPipeline loads the folder too.

Four stages, CPU only, seeded (the same arguments give the same weights on the same machine and thread count):
1. the VAE: pixel reconstruction (MSE + L1) plus a small KL term; then its scaling factor = 1 / std of the
   training latents, as SD's 0.18215 was chosen (Rombach et al. 2022, sec. G);
2. text encoder + U-Net jointly on the noise-prediction objective of the forward process (Ho et al. 2020, eq. 14),
   with SD's scaled_linear schedule, one random timestep per sample, min-SNR-5 loss weights (Hang et al. 2023,
   eq. 10) and 10% empty captions, so classifier-free guidance has an unconditional model to push away from;
3. the text encoder alone, with captions worded as people word them (``phrasing.py``: synonyms, articles or none,
   word order, case, punctuation) beside the templates, distilled through the frozen U-Net: for "red star top left"
   it learns to give the U-Net the noise estimate that the stage-2 text encoder gives for "a red star at the top
   left", for the templates the estimate they already had;
4. the U-Net alone, on the noise-prediction objective again, with the template captions encoded by the stage-3 text
   encoder (frozen), at a fifth of stage 2's learning rate, squares drawn twice as often (the shape it drew worst):
   it re-learns to read the embeddings that text encoder now gives, which stage 3 moved. Measured on the held-out
   sets (README): shape agreement 88.9% -> 90.3% on the templates and 84.7% -> 91.0% on the phrasings (triangles
   and stars gained; squares stayed at 71% on the templates). The demo LoRA and ControlNet train on this U-Net.
Stages 3 and 4 each read the folder the stage before wrote (its fp16 weights, as shipped).

    python -m sdfast.shapes.train --out OUT --from FOLDER --stages 3 4

runs later stages alone on a trained model (``--from``: its folder), rendering the same data. The shipped model
was made in three such runs: stages 1 and 2, then 3, then 4 (``--threads 1``), each from the folder before.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import re
import time
from dataclasses import replace
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..files import write_atomically
from ..models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet, UNetConfig, VAEConfig
from ..schedulers import SD_SCHEDULE, make_scheduler
from ..tokenizer import Tokenizer, write_clip_tokenizer
from .dataset import ALL_SCENES, TRAINING_SCENES, make_dataset
from .phrasing import phrasing_words, training_phrasings

VOCABULARY = "vocabulary.json"  # the words the model was trained on, beside model_index.json
DIFFUSERS_VERSION = "0.42.1"  # the version whose config format these files follow

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 64, "act_fn": "silu",
    "block_out_channels": [16, 32, 64, 64],  # 4 levels: three halvings, 8x like SD
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1, "norm_num_groups": 8,
    "scaling_factor": None,  # measured after training (1 / std of the latents)
}
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
    "in_channels": 4, "out_channels": 4, "sample_size": 8, "act_fn": "silu",
    "block_out_channels": [48, 96, 96],  # 8x8 -> 4x4 -> 2x2 latents
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": 4,  # diffusers' legacy name: 4 heads
    "cross_attention_dim": 32, "norm_num_groups": 16, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "center_input_sample": False, "use_linear_projection": False,
}
TEXT_CONFIG = {  # transformers' CLIPTextConfig; width 32 keeps the 49408-token embedding at 3 MB in fp16
    # torch_dtype is the dtype transformers loads in when not told: fp32, as diffusers loads the U-Net and VAE, so a
    # plain StableDiffusionPipeline.from_pretrained(folder) does not mix fp16 text embeddings with an fp32 U-Net
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float32",
    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 32, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 32, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,  # SD 1.x's legacy ids: pool at the highest id
}
SCHEDULER_CONFIG = {  # SD's noise schedule; Euler is sdfast's default sampler, so diffusers gets it too
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION, **SD_SCHEDULE,
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False, "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

CAPTION_DROPOUT = 0.1  # share of empty captions: the unconditional model classifier-free guidance needs
MIN_SNR_GAMMA = 5.0
KL_WEIGHT = 1e-4  # enough to keep latents bounded and the posterior smooth, small enough not to blur
TEXT_STEPS, TEXT_BATCH, TEXT_LR = 1500, 128, 1e-3  # stage 3
ALIGN_STEPS, ALIGN_LR, ALIGN_SEED = 600, 2e-4, 5  # stage 4 (its batch is stage 2's)
ALIGN_EXTRA = {"square": 1}  # stage 4's extra draws of a shape's scenes: squares twice as often
WORDINGS = 24  # phrased captions per scene in stage 3, beside its 8 template wordings


def build_networks(scaling_factor: float = 1.0) -> tuple[AutoencoderKL, CLIPTextModel, UNet]:
    vae = AutoencoderKL(VAEConfig.from_diffusers({**VAE_CONFIG, "scaling_factor": scaling_factor}))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_transformers(TEXT_CONFIG))
    unet = UNet(UNetConfig.from_diffusers(UNET_CONFIG))
    return vae, text_encoder, unet


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: the last steps anneal, so the final weights are the ones to ship."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _posterior(vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of q(z | x), unscaled, clamped as diffusers' DiagonalGaussianDistribution does."""
    mean, logvar = vae.posterior(x)
    return mean, logvar.clamp(-30.0, 20.0)


def train_vae(vae: AutoencoderKL, images: np.ndarray, steps: int, batch: int, lr: float,
              generator: torch.Generator, log_every: int) -> float:
    """Reconstruction (MSE + L1 on [-1, 1] pixels) + KL_WEIGHT * KL to N(0, I), both means per element.
    Returns the final reconstruction MSE (mean of the last 10% of steps)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    recent, start = [], time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        x = _pixels(images[torch.randint(len(images), (batch,), generator=generator).numpy()])
        mean, logvar = _posterior(vae, x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
        recon = vae.decoder(vae.post_quant_conv(z))
        mse = F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = mse + F.l1_loss(recon, x) + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        recent.append(mse.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"vae  step {step + 1:5d}/{steps}  mse {np.mean(recent[-log_every:]):.5f}  kl {kl.item():.3f}  "
                  f"{time.time() - start:6.0f} s", flush=True)
    return float(np.mean(recent[-max(1, steps // 10):]))


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, 4, h, w) of every training image, unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        mean, logvar = _posterior(vae, _pixels(images[i:i + batch]))
        means.append(mean)
        stds.append((0.5 * logvar).exp())
    return torch.cat(means), torch.cat(stds)


def caption_table(tokenizer: Tokenizer) -> torch.Tensor:
    """Token ids (scenes, 8, 77) of every scene's eight captions (each of size, position, background kept or left
    out; variant 7 keeps all three), and of the empty caption at [-1, 0]: captions are looked up, not tokenized
    per step."""
    captions = [scene.caption(size=bool(v & 1), position=bool(v & 2), background=bool(v & 4))
                for scene in ALL_SCENES for v in range(8)] + [""] * 8
    return tokenizer.encode(captions).view(len(ALL_SCENES) + 1, 8, -1)


def phrasing_table(tokenizer: Tokenizer, wordings: int, seed: int) -> torch.Tensor:
    """Token ids (scenes + 1, 8 + wordings, 2, 77): every scene's eight template wordings (``caption_table``'s),
    then ``wordings`` in training phrasing styles (seeded), each beside the template caption that says the same
    attributes (a template beside itself); the empty caption last."""
    rng = random.Random(seed)
    pairs = [pair for scene in ALL_SCENES for pair in training_phrasings(scene, wordings, rng)]
    pairs += [("", "")] * wordings
    phrased = torch.stack([tokenizer.encode([p for p, _ in pairs]), tokenizer.encode([t for _, t in pairs])], dim=1)
    templates = caption_table(tokenizer)
    return torch.cat([templates.unsqueeze(2).expand(-1, -1, 2, -1),
                      phrased.view(len(ALL_SCENES) + 1, wordings, 2, -1)], dim=1)


def train_phrasings(text_encoder: CLIPTextModel, unet: UNet, means: torch.Tensor, stds: torch.Tensor,
                    scene_ids: torch.Tensor, captions: torch.Tensor, scaling_factor: float, steps: int, batch: int,
                    lr: float, generator: torch.Generator, log_every: int) -> float:
    """The text encoder alone, distilled through the frozen U-Net: for each wording in ``phrasing_table``'s
    ``captions`` it learns to give the U-Net the noise estimate that a frozen copy of itself gives for the template
    caption saying the same, so phrasings come to mean their templates and templates keep their meaning. Returns
    the final loss (mean of the last 10% of steps)."""
    teacher = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(True)

    @torch.no_grad()
    def target(xt, t, ids, idx, noise):
        return unet(xt, t, teacher(ids[:, 1])[0])

    return noise_prediction(lambda xt, t, ids, idx: unet(xt, t, text_encoder(ids[:, 0])[0]),
                            list(text_encoder.parameters()), means, stds, scene_ids, captions, scaling_factor, steps,
                            batch, lr, generator, log_every, "text", target)


def train_denoiser(text_encoder: CLIPTextModel, unet: UNet, means: torch.Tensor, stds: torch.Tensor,
                   scene_ids: torch.Tensor, captions: torch.Tensor, scaling_factor: float, steps: int, batch: int,
                   lr: float, generator: torch.Generator, log_every: int) -> float:
    """Text encoder + U-Net on epsilon prediction (``noise_prediction``), the captions' token ids (scenes + 1, 8, 77)
    encoded at every step. Returns the final loss (mean of the last 10% of steps)."""
    params = list(text_encoder.parameters()) + list(unet.parameters())
    return noise_prediction(lambda xt, t, ids, idx: unet(xt, t, text_encoder(ids)[0]), params, means, stds,
                            scene_ids, captions, scaling_factor, steps, batch, lr, generator, log_every, "unet")


def noise_prediction(predict: Callable, params: list, means: torch.Tensor, stds: torch.Tensor,
                     scene_ids: torch.Tensor, conditions: torch.Tensor, scaling_factor: float, steps: int,
                     batch: int, lr: float, generator: torch.Generator, log_every: int, label: str,
                     target: Callable | None = None) -> float:
    """The training loop of every network here (the default model, the demo LoRA and ControlNet): ``params`` on
    epsilon prediction. Each sample: a fresh posterior draw of its latent, a random wording of its scene's
    ``conditions`` (scenes + 1, wordings, ...; the empty caption's last, 10% of the time), a timestep uniform in
    [0, 1000), noise added as the scheduler's add_noise does (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps);
    ``predict(x_t, t, condition, sample indices)`` is the network's noise estimate, learning ``eps`` or, when
    given, ``target(x_t, t, condition, sample indices, eps)`` (a teacher's estimate); min-SNR-5 weights. Returns
    the final loss (mean of the last 10% of steps)."""
    alphas_cumprod = make_scheduler("ddim", SCHEDULER_CONFIG).alphas_cumprod  # (1000,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = snr.clamp(max=MIN_SNR_GAMMA) / snr  # min-SNR-gamma for epsilon prediction
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    empty, wordings = len(conditions) - 1, conditions.shape[1]
    recent, start = [], time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=min(200, steps // 10 + 1))
        idx = torch.randint(len(means), (batch,), generator=generator)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)) * scaling_factor
        variant = torch.randint(wordings, (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        condition = conditions[torch.where(dropped, empty, scene_ids[idx]), variant]  # (B, ...)
        t = torch.randint(len(alphas_cumprod), (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        goal = noise if target is None else target(xt, t, condition, idx, noise)
        per_sample = (predict(xt, t, condition, idx) - goal).pow(2).mean(dim=(1, 2, 3))
        loss = (weights[t] * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append(per_sample.mean().item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"{label} step {step + 1:5d}/{steps}  mse {np.mean(recent[-log_every:]):.4g}  "
                  f"{time.time() - start:6.0f} s", flush=True)
    return float(np.mean(recent[-max(1, steps // 10):]))


def _save_weights(module: torch.nn.Module, path: Path, prefix: str = "") -> None:
    state = {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2) + "\n")


def write_folder(out: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet) -> None:
    """The diffusers folder: model_index.json, the three networks (config.json + fp16 safetensors), tokenizer/
    with the CLIP vocabulary and SD 1.x's special tokens, scheduler/scheduler_config.json."""
    _write_json(out / "model_index.json", MODEL_INDEX)
    _write_json(out / "vae" / "config.json", {**VAE_CONFIG, "scaling_factor": vae.config.scaling_factor})
    _save_weights(vae, out / "vae" / "diffusion_pytorch_model.safetensors")
    _write_json(out / "unet" / "config.json", UNET_CONFIG)
    _save_weights(unet, out / "unet" / "diffusion_pytorch_model.safetensors")
    _write_json(out / "text_encoder" / "config.json", TEXT_CONFIG)
    # nested under text_model., as the SD 1.x releases (and transformers < 5) store it
    _save_weights(text_encoder, out / "text_encoder" / "model.safetensors", prefix="text_model.")
    write_clip_tokenizer(out / "tokenizer")
    _write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(out / VOCABULARY, {"words": vocabulary()})


def vocabulary() -> list[str]:
    """Every word of every caption wording of the shapes world, templates and phrasings: what the model was trained
    on (sdfast.load reads it back from the folder to warn about prompts outside it)."""
    wordings = list(itertools.product((False, True), repeat=3))  # size, position, background said or not
    return sorted(phrasing_words() | {word for scene in ALL_SCENES for said in wordings
                                      for word in re.findall(r"[a-z]+", scene.caption(*said).lower())})


def _scene_ids(scenes: list) -> torch.Tensor:
    """Each scene's index in ALL_SCENES: its row of the caption tables."""
    index = {scene: i for i, scene in enumerate(ALL_SCENES)}
    return torch.tensor([index[s] for s in scenes])


def phrasing_stage(folder: Path, out: Path, images: np.ndarray, scenes: list, args: argparse.Namespace) -> float:
    """The third stage on the model in ``folder`` (its fp16 weights, as shipped), written to ``out``: the VAE's
    latents of ``images``, then ``train_phrasings``. Returns the final loss."""
    from ..loading import load

    pipe = load(folder, dtype=torch.float32)
    means, stds = encode_dataset(pipe.vae.requires_grad_(False), images)
    scene_ids = _scene_ids(scenes)
    generator = torch.Generator().manual_seed(args.seed)
    loss = train_phrasings(pipe.text_encoder.train(), pipe.unet.eval(), means, stds, scene_ids,
                           phrasing_table(pipe.tokenizer, args.wordings, args.seed), pipe.vae.config.scaling_factor,
                           args.text_steps, args.text_batch, args.text_lr, generator,
                           max(1, min(100, args.text_steps // 10)))
    write_folder(out, pipe.vae, pipe.text_encoder.eval(), pipe.unet)
    return loss


def align_stage(folder: Path, out: Path, args: argparse.Namespace) -> float:
    """The fourth stage on the model in ``folder``, written to ``out``: the U-Net alone on ``noise_prediction``, the
    template captions (``caption_table``) encoded by the folder's text encoder, frozen; the data re-rendered with the
    scenes of ``ALIGN_EXTRA``'s shapes drawn more often. Returns the final loss."""
    from ..loading import load

    pipe = load(folder, dtype=torch.float32)
    extra = tuple(scene for scene in TRAINING_SCENES for _ in range(ALIGN_EXTRA.get(scene.shape, 0)))
    images, scenes = make_dataset(args.images, args.seed, scenes=TRAINING_SCENES + extra)
    means, stds = encode_dataset(pipe.vae.requires_grad_(False), images)
    scene_ids = _scene_ids(scenes)
    text_encoder = pipe.text_encoder.eval().requires_grad_(False)
    unet = pipe.unet.train().requires_grad_(True)

    def predict(xt, t, ids, idx):
        with torch.no_grad():
            context = text_encoder(ids)[0]
        return unet(xt, t, context)

    generator = torch.Generator().manual_seed(ALIGN_SEED)
    loss = noise_prediction(predict, list(unet.parameters()), means, stds, scene_ids, caption_table(pipe.tokenizer),
                            pipe.vae.config.scaling_factor, args.align_steps, args.unet_batch, args.align_lr,
                            generator, max(1, min(50, args.align_steps // 10)), "align")
    write_folder(out, pipe.vae, text_encoder, unet.eval())
    return loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdfast.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the diffusers model to")
    parser.add_argument("--from", dest="base", type=Path, default=None,
                        help="a trained model's folder to run later stages on (with --stages)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4],
                        help="the stages to run, in order (default: all; 1 and 2 go together; 3 and 4 need a "
                             "trained model: the folder the run writes, or --from)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=30000, help="rendered training images")
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-batch", type=int, default=128)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--text-steps", type=int, default=TEXT_STEPS)
    parser.add_argument("--text-batch", type=int, default=TEXT_BATCH)
    parser.add_argument("--text-lr", type=float, default=TEXT_LR)
    parser.add_argument("--wordings", type=int, default=WORDINGS, help="phrased captions per scene in stage 3")
    parser.add_argument("--align-steps", type=int, default=ALIGN_STEPS)
    parser.add_argument("--align-lr", type=float, default=ALIGN_LR)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage on a little data")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.vae_steps, args.vae_batch, args.unet_steps, args.unet_batch = 64, 3, 4, 3, 8
        args.text_steps, args.text_batch, args.wordings, args.align_steps = 3, 8, 2, 3
    stages = sorted(set(args.stages))
    if stages != list(range(stages[0], stages[-1] + 1)) or (1 in stages) != (2 in stages):
        parser.error(f"--stages {' '.join(map(str, args.stages))}: give consecutive stages, 1 and 2 together "
                     "(e.g. 1 2 3 4, 3 4, or 4)")
    if stages[0] == 1 and args.base is not None:
        parser.error(f"--from {args.base}: stages 1 and 2 train a new model; to train that one further, give the "
                     "later stages (--stages 3 4, 3 or 4)")
    if stages[0] > 2 and args.base is None:
        parser.error(f"--stages {' '.join(map(str, stages))}: these stages train a trained model: pass its folder "
                     "with --from")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    folder = args.base
    if 1 in stages or 3 in stages:
        images, scenes = make_dataset(args.images, args.seed)
        print(f"data: {len(images)} images of {len(ALL_SCENES)} scene kinds, {time.time() - start:.0f} s", flush=True)
    if 1 in stages:
        templates(images, scenes, args)
        folder = args.out
    if 3 in stages:
        text_loss = phrasing_stage(folder, args.out, images, scenes, args)
        print(f"phrasings: text encoder distillation mse {text_loss:.5f}", flush=True)
        folder = args.out
    if 4 in stages:
        align_loss = align_stage(folder, args.out, args)
        print(f"alignment: U-Net eps mse {align_loss:.4f}", flush=True)
    print(f"wrote {args.out} (stages {' '.join(map(str, stages))}) in {(time.time() - start) / 60:.1f} min")


def templates(images: np.ndarray, scenes: list, args: argparse.Namespace) -> None:
    """Stages 1 and 2 on the template captions, the folder written to ``args.out``."""
    generator = torch.Generator().manual_seed(args.seed)
    log_every = max(1, min(100, args.unet_steps // 10))
    vae, text_encoder, unet = build_networks()
    for name, net in (("vae", vae), ("text encoder", text_encoder), ("unet", unet)):
        print(f"{name}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")
    vae_mse = train_vae(vae.train(), images, args.vae_steps, args.vae_batch, args.vae_lr, generator, log_every)
    vae.eval().requires_grad_(False)
    means, stds = encode_dataset(vae, images)
    latents = means + stds * torch.randn(means.shape, generator=generator)
    scaling_factor = float(1.0 / latents.std())
    vae.config = replace(vae.config, scaling_factor=scaling_factor)
    print(f"latents: std {latents.std():.4f}, mean {latents.mean():.4f} -> scaling_factor {scaling_factor:.5f}")

    scene_ids = _scene_ids(scenes)
    unet_loss = train_denoiser(text_encoder.train(), unet.train(), means, stds, scene_ids,
                               caption_table(Tokenizer.clip()), scaling_factor, args.unet_steps, args.unet_batch,
                               args.unet_lr, generator, log_every)
    write_folder(args.out, vae, text_encoder.eval(), unet.eval())
    print(f"templates: vae reconstruction mse {vae_mse:.5f}, unet eps mse {unet_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
