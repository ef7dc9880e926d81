"""The three networks over exported graphs, with the torch modules' call signatures and ``.config``.

A backend supplies one ``run(inputs, outputs) -> {name: tensor}`` callable per graph (``inputs``: {name: tensor};
``outputs``: {name: shape}, so a runner can allocate them on the device up front); the classes here turn those
into what ``Pipeline.generate`` calls: ``text_encoder(ids, clip_skip)``, ``unet(x, t, context)`` (SDXL:
``text_embeds`` and ``time_ids`` too),
``vae.encode(image, generator)`` and ``vae.decode(latents)``. Graph signatures: ``sdfast.export.onnx``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models import CLIPTextConfig, UNetConfig, VAEConfig
from ..models.vae import sample_posterior

Run = Callable[[dict[str, torch.Tensor], dict[str, tuple[int, ...]]], dict[str, torch.Tensor]]


class TextEncoder:
    """``text_encoder(ids (B, 77), clip_skip=1) -> (hidden (B, 77, C), pooled (B, P))``, as ``CLIPTextModel``.
    ``final_norm``: whether the graph's hidden states went through the final LayerNorm (SD 1.x / 2.x) or are raw
    (SDXL, called with ``final_norm=False``); a call asking for the other kind is refused."""

    def __init__(self, run: Run, config: CLIPTextConfig, final_norm: bool = True):
        self.run, self.config, self.final_norm = run, config, final_norm

    def __call__(self, input_ids: torch.Tensor, clip_skip: int = 1, final_norm: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.config.num_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip={clip_skip} is out of range: this text encoder has {layers} layers, "
                             f"so use 1..{layers}")
        if final_norm != self.final_norm:
            kind = "normalised (SD 1.x / 2.x)" if self.final_norm else "raw (SDXL)"
            raise ValueError(f"this text-encoder graph holds {kind} hidden states, so it cannot give "
                             f"final_norm={final_norm}: call it as the model's pipeline does")
        b, n = input_ids.shape
        pooled = self.config.projection_dim or self.config.hidden_size
        out = self.run({"input_ids": input_ids},
                       {"hidden_states": (b, layers, n, self.config.hidden_size), "pooled": (b, pooled)})
        return out["hidden_states"][:, layers - clip_skip], out["pooled"]  # (B, 77, C), (B, P)


class UNet:
    """``unet(x (B, 4, h, w), t () or (B,), context (B, 77*K, C)) -> noise (B, 4, h, w)``, as ``UNet``; SDXL also
    takes ``text_embeds`` (B, P) and ``time_ids`` (B, n)."""

    def __init__(self, run: Run, config: UNetConfig):
        self.run, self.config = run, config

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).float()  # (B,) fp32, as the graph
        b, _, h, w = x.shape
        inputs = {"sample": x, "timestep": t, "context": context}
        if self.config.added_time_dim is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this is an SDXL U-Net: pass text_embeds (B, pooled width) and time_ids (B, n), "
                                 "as Pipeline.generate does")
            inputs.update(text_embeds=text_embeds, time_ids=time_ids.float())  # (B, P), (B, n) fp32, as the graph
        return self.run(inputs, {"noise": (b, self.config.out_channels, h, w)})["noise"]


class VAE:
    """``vae.encode(image, generator) -> scaled latent`` and ``vae.decode(latents) -> image``, as ``AutoencoderKL``:
    the encoder graph gives the posterior and ``sample_posterior`` draws from it exactly as the torch model does."""

    def __init__(self, encode: Run, decode: Run, config: VAEConfig):
        self.run_encode, self.run_decode, self.config = encode, decode, config
        self.factor = 2 ** (len(config.block_channels) - 1)

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = image.shape
        shape = (b, self.config.latent_channels, h // self.factor, w // self.factor)
        out = self.run_encode({"image": image}, {"mean": shape, "logvar": shape})
        return sample_posterior(out["mean"], out["logvar"], generator, self.config.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, h, w = latents.shape
        shape = (b, self.config.out_channels, h * self.factor, w * self.factor)
        return self.run_decode({"latent": latents}, {"image": shape})["image"]


def config(cls, fields: dict):
    """A config dataclass from its manifest entry (JSON turned its tuples into lists)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
