"""The three networks of Stable Diffusion in lean PyTorch, with diffusers / transformers parameter names."""

from .clip import CLIPTextConfig, CLIPTextModel
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

__all__ = ["CLIPTextConfig", "CLIPTextModel", "UNet", "UNetConfig", "AutoencoderKL", "VAEConfig"]
