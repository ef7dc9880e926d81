"""Trains the demo LoRA: teaches the shipped default model a fifth shape, the diamond, and writes a kohya / webui file.

    python -m sdfast.shapes.train_lora --out sdfast/data/loras/diamond.safetensors   # the shipped file (defaults)
    python -m sdfast.shapes.train_lora --out /tmp/diamond.safetensors --quick        # seconds: every stage once, CI

The default model (``train.py``) knows four shapes; "diamond" is a CLIP token its text encoder never trained on, so
without this LoRA "a red diamond" comes out as whatever shape that token's untrained embedding pulls towards (a
circle, mostly). With the base model frozen, the LoRA learns it:

1. data: diamonds (``dataset.DIAMOND_TRAINING_SCENES``; ``DIAMOND_HELD_OUT``'s layouts never rendered) and, as
   regularisation, as many scenes of the four known shapes (``dataset.TRAINING_SCENES``), so that what the model
   knew stays as it was; captions in ``train.py``'s eight wordings;
2. latents: the VAE's, as in ``train.py``. The VAE is not part of a LoRA, so what a LoRA teaches must be something
   the frozen VAE draws: its encoder and decoder never saw a diamond either, yet 95% of diamonds come back through
   them as diamonds to the checker (a new colour or a hollow outline come back right less than half the time, and
   the latents decoder inversion finds for them proved too irregular for the U-Net to learn);
3. low-rank adapters (Hu et al. 2021, eq. 3: ``W x + alpha / rank * up @ down x``; ``up`` starts at zero, so
   training starts from the base model exactly) on the text encoder's attention and MLP projections and the U-Net's
   attention projections and feed-forward layers, trained with ``train.py``'s own ``train_denoiser`` (epsilon
   prediction, SD's schedule, min-SNR-5 weights, 10% empty captions): only the adapters have gradients;
4. written in fp16 with kohya's key names (``lora_unet_<path with _>.lora_down.weight`` (rank, in),
   ``.lora_up.weight`` (out, rank), ``.alpha``; ``lora_te_text_model_<path>`` for the text encoder) and kohya's
   ``ss_*`` metadata, so any SD 1.x LoRA loader reads it (``sdfast.lora``, the webui, diffusers).

Seeded: the same arguments give the same weights and metadata on the same machine and thread count (not quite the
same bytes: safetensors writes the metadata's keys in a random order).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..loading import load
from ..tokenizer import Tokenizer
from .dataset import DIAMOND_TRAINING_SCENES, Scene, make_dataset
from .train import encode_dataset, train_denoiser

# The modules adapted, by the end of their path: kohya's default LoRA targets (sd-scripts networks/lora.py: every
# Linear of CLIPAttention / CLIPMLP and of the U-Net's transformer blocks), less the 1x1-convolution proj_in /
# proj_out.
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")
UNET_TARGETS = tuple(f"{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ff.net.0.proj", "ff.net.2")
# kohya's prefixes; its text-encoder paths are transformers', which start with text_model. (sdfast's do not)
KOHYA_PREFIXES = {"text_encoder": "lora_te_text_model_", "unet": "lora_unet_"}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + alpha / rank * up(down(x))``.
    ``down`` has nn.Linear's Kaiming-uniform initialisation, ``up`` starts at zero (as kohya and peft)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.down = nn.Linear(base.in_features, rank, bias=False)  # weight (rank, in)
        self.up = nn.Linear(rank, base.out_features, bias=False)  # weight (out, rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.alpha / self.rank * self.up(self.down(x))


def add_adapters(net: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Freezes ``net`` and puts a ``LoRALinear`` in place of each Linear whose path ends with one of ``targets``;
    returns them by the path of the Linear they wrap (the path a LoRA file names)."""
    net.requires_grad_(False)
    paths = [name for name, m in net.named_modules()
             if isinstance(m, nn.Linear) and name.endswith(targets)]
    if not paths:
        raise ValueError(f"no Linear in {type(net).__name__} ends with any of {targets}")
    adapters = {}
    for path in paths:
        parent, _, child = path.rpartition(".")
        holder = net.get_submodule(parent)
        adapters[path] = LoRALinear(getattr(holder, child), rank, alpha)
        setattr(holder, child, adapters[path])
    return adapters


def kohya_state(adapters: dict[str, dict[str, LoRALinear]]) -> dict[str, torch.Tensor]:
    """``{network: {path: adapter}}`` as kohya's fp16 tensors: ``<prefix><path with _>.lora_down.weight``,
    ``.lora_up.weight`` and a 0-d ``.alpha``."""
    state = {}
    for network, modules in adapters.items():
        for path, m in modules.items():
            key = KOHYA_PREFIXES[network] + path.replace(".", "_")
            state[f"{key}.lora_down.weight"] = m.down.weight.detach().to(torch.float16).contiguous()
            state[f"{key}.lora_up.weight"] = m.up.weight.detach().to(torch.float16).contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float16)
    return state


def caption_ids(tokenizer: Tokenizer, scenes: list[Scene]) -> torch.Tensor:
    """Token ids (len(scenes) + 1, 8, 77) in ``train.caption_table``'s layout for these scenes (variant v keeps
    size if v & 1, position if v & 2, background if v & 4), the empty caption last, as ``train_denoiser`` reads
    them."""
    captions = [s.caption(size=bool(v & 1), position=bool(v & 2), background=bool(v & 4))
                for s in scenes for v in range(8)] + [""] * 8
    return tokenizer.encode(captions).view(len(scenes) + 1, 8, -1)


def metadata(args: argparse.Namespace, images: int, scenes: list[Scene]) -> dict[str, str]:
    """kohya sd-scripts' ``ss_*`` training metadata (strings, as safetensors requires) plus the arguments whole;
    ``ss_tag_frequency`` counts the words of the training ``scenes``' captions (the vocabulary notice reads them).
    No timestamps or hashes of the run, so the same arguments write the same metadata."""
    words = Counter(word for scene in scenes for v in range(8)
                    for word in scene.caption(bool(v & 1), bool(v & 2), bool(v & 4)).split())
    return {
        "ss_tag_frequency": json.dumps({"shapes": dict(sorted(words.items()))}),
        "ss_network_module": "networks.lora", "ss_network_dim": str(args.rank), "ss_network_alpha": str(args.alpha),
        "ss_base_model_version": "sd_v1", "ss_sd_model_name": "sdfast default_model (sdfast/shapes/train.py)",
        "ss_v2": "False", "ss_resolution": "(64, 64)", "ss_seed": str(args.seed), "ss_max_train_steps": str(args.steps),
        "ss_learning_rate": str(args.lr), "ss_unet_lr": str(args.lr), "ss_text_encoder_lr": str(args.lr),
        "ss_train_batch_size": str(args.batch), "ss_num_train_images": str(images), "ss_min_snr_gamma": "5.0",
        "ss_lr_scheduler": "cosine_with_warmup", "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)",
        "ss_training_comment": "teaches the sdfast default model a fifth shape: diamond (sdfast/shapes/train_lora.py)",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "diamond",
        "sdfast_training_arguments": json.dumps({k: str(v) if isinstance(v, Path) else v
                                                 for k, v in sorted(vars(args).items()) if k != "out"}),
    }


def arguments() -> argparse.ArgumentParser:
    """The command line; its defaults are the shipped file's arguments (its ``sdfast_training_arguments``)."""
    parser = argparse.ArgumentParser(prog="python -m sdfast.shapes.train_lora", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--model", type=Path, default=None, help="the base model (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diamond-images", type=int, default=512, help="rendered diamond training images")
    parser.add_argument("--other-images", type=int, default=1024,
                        help="rendered images of the four known shapes (regularisation)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0, help="the update is scaled by alpha / rank")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage on a little data")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    if args.quick:
        args.diamond_images, args.other_images, args.steps, args.batch = 4, 4, 3, 4

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    pipe = load(args.model, dtype=torch.float32)

    diamonds, diamond_scenes = make_dataset(args.diamond_images, args.seed, scenes=DIAMOND_TRAINING_SCENES)
    others, other_scenes = make_dataset(args.other_images, args.seed + 1)
    means, stds = encode_dataset(pipe.vae.requires_grad_(False), np.concatenate([diamonds, others]))
    print(f"data: {len(diamonds)} diamond + {len(others)} other images, latents in {time.time() - start:.0f} s",
          flush=True)

    scenes = list(dict.fromkeys(diamond_scenes + other_scenes))  # each distinct scene once, in a seeded order
    index = {scene: i for i, scene in enumerate(scenes)}
    scene_ids = torch.tensor([index[s] for s in diamond_scenes + other_scenes])
    adapters = {"text_encoder": add_adapters(pipe.text_encoder, TEXT_TARGETS, args.rank, args.alpha),
                "unet": add_adapters(pipe.unet, UNET_TARGETS, args.rank, args.alpha)}
    trained = sum(p.numel() for modules in adapters.values() for m in modules.values() for p in m.parameters()
                  if p.requires_grad)
    print(f"adapters: {sum(map(len, adapters.values()))} modules, rank {args.rank}, {trained / 1e3:.1f} k parameters")
    loss = train_denoiser(pipe.text_encoder.train(), pipe.unet.train(), means, stds, scene_ids,
                          caption_ids(pipe.tokenizer, scenes), pipe.vae.config.scaling_factor, args.steps,
                          args.batch, args.lr, generator, log_every=max(1, min(50, args.steps // 10)))
    seconds = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state(adapters), str(args.out), metadata(args, len(diamonds) + len(others), scenes))
    print(f"final: eps mse {loss:.4f}; wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB) in "
          f"{seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
