"""The three networks of Stable Diffusion in lean PyTorch, with diffusers / transformers parameter names."""

from .clip import CLIPTextConfig, CLIPTextModel
from .unet import UNet
from .unet_config import UNetConfig
from .vae import AutoencoderKL, VAEConfig

__all__ = ["CLIPTextConfig", "CLIPTextModel", "UNet", "UNetConfig", "AutoencoderKL", "VAEConfig", "image_side"]


def image_side(sample_size: int, vae_levels: int) -> int:
    """The image side a model was trained at: its U-Net's latent side times the VAE's factor (one halving per VAE
    level but the last: 8 for SD's four). The one place this fact lives."""
    return sample_size * 2 ** (vae_levels - 1)
