"""Trains the demo ControlNet "where": a map of where the shape goes (a white disc on black) puts the shipped default
model's shape there, anywhere in the picture, and writes it as a diffusers ControlNetModel folder.

    python -m sdfast.shapes.train_controlnet --out sdfast/data/controlnets/where   # the shipped one (the defaults)
    python -m sdfast.shapes.train_controlnet --out /tmp/where --quick             # seconds: every stage once, for CI

The default model (``train.py``) knows five positions, named in the prompt ("at the top left"). This ControlNet
(Zhang et al. 2023) takes the place from a picture instead, at any centre and size:

1. data: one shape per image as ``dataset.render`` draws it (shape outline, colour and texture jitter, 4x
   supersampling), but at a centre and radius drawn uniformly over the picture (``draw_scene``), each with its
   map: a white disc of the shape's radius at its centre, on black. A disc says where and how large, not what: the
   shape and colour come from the caption, the dataset's wordings without the position ("a small red star on a
   white background", "a red star"), so a prompt cannot fight the map;
2. the ControlNet starts as the base U-Net's encoder (conv_in, time embedding, down and middle blocks copied, as
   diffusers' ``ControlNetModel.from_unet``), its image embedding at default init with the last conv at zero, and
   the zero convolutions at zero: at step 0 it changes nothing;
3. the text encoder, U-Net and VAE are frozen; only the ControlNet trains, on the noise-prediction loss of the base
   U-Net given its residuals, with ``train.py``'s schedule, min-SNR-5 weights and 10% empty captions (so that
   classifier-free guidance's unconditional branch, which sees the same map, also knows where the shape goes).

Written in fp16 with a ``config.json`` as ``ControlNetModel.from_unet`` writes it, plus ``training.json`` (the
arguments and final loss) and ``example_map.png`` (a map to try it with). Seeded: the same arguments give the same
weights on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save

from ..files import write_atomically
from ..loading import load
from ..models.controlnet import ControlNet, ControlNetConfig
from .dataset import (_SUPERSAMPLE, BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, SIZES, TEXTURES, Scene,
                      _outline)
from .train import DIFFUSERS_VERSION, UNET_CONFIG, _write_json, encode_dataset, noise_prediction

RADII = (0.14, 0.27)  # shape radius as a fraction of the side: a little beyond dataset.SIZES' 0.15 and 0.26
# the farthest a shape's outline reaches from its centre, in radii (the triangle's apex: _outline's 1.25 r), so a
# centre drawn at least this far from each edge keeps the whole shape in the picture
REACH = 1.25
# 64 px map -> 8x8 latent. A disc needs little width, and at 64 px the embedding's convs cost as much as the
# U-Net's: widths (16, 32, 64, 128) made a training step 1.4x as slow on this CPU
EMBEDDING_CHANNELS = (8, 16, 32, 64)
TRAINING_FILE = "training.json"  # the arguments and final loss, beside config.json
EXAMPLE_FILE = "example_map.png"  # a map to try it with, beside config.json
EXAMPLE_PLACE = (0.76, 0.5, 0.16)  # its centre (x, y) and radius: the middle of the right side, far from the five
# places a prompt can name


def controlnet_config() -> dict:
    """The folder's config.json: what diffusers' ``ControlNetModel.from_unet`` writes for the default model's U-Net
    (``train.UNET_CONFIG``), with this ControlNet's narrower image embedding."""
    shared = ("act_fn", "attention_head_dim", "block_out_channels", "cross_attention_dim", "down_block_types",
              "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
              "mid_block_scale_factor", "norm_eps", "norm_num_groups", "use_linear_projection")
    return {
        "_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_VERSION,
        **{k: UNET_CONFIG[k] for k in shared},
        "addition_embed_type": None, "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None,
        "class_embed_type": None, "conditioning_channels": 3,
        "conditioning_embedding_out_channels": list(EMBEDDING_CHANNELS),
        "controlnet_conditioning_channel_order": "rgb", "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "global_pool_conditions": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None,
        "num_class_embeds": None, "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
        "resnet_time_scale_shift": "default", "transformer_layers_per_block": 1, "upcast_attention": False,
    }


# --- data -------------------------------------------------------------------------------------------------------

def _mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """(size, size) float coverage in [0, 1] of ``shape`` (one of ``dataset.SHAPES``, with its outline) of radius
    ``r`` at (cx, cy), all in pixels: drawn 4x supersampled and box-filtered, as ``dataset.render`` does."""
    s, k = size * _SUPERSAMPLE, _SUPERSAMPLE
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(shape, cx * k, cy * k, r * k)
    if outline is None:
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
    else:
        draw.polygon([(float(x), float(y)) for x, y in outline], fill=255)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64) / 255.0


def place(rng: np.random.Generator) -> tuple[float, float, float]:
    """A centre (x, y) and radius, fractions of the side: radius uniform in RADII, centre uniform over the places
    that keep the whole shape inside the picture."""
    r = rng.uniform(*RADII)
    cx, cy = rng.uniform(REACH * r, 1 - REACH * r, 2)
    return float(cx), float(cy), float(r)


def where_map(cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> Image.Image:
    """The control map: a white disc of radius ``r`` at (cx, cy) (fractions of the side) on black, RGB."""
    disc = np.round(255 * _mask("circle", cx * size, cy * size, r * size, size)).astype(np.uint8)
    return Image.fromarray(np.repeat(disc[..., None], 3, axis=-1))


def draw_scene(scene: Scene, cx: float, cy: float, r: float, rng: np.random.Generator,
               size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8: ``scene``'s shape, colour, background and texture as ``dataset.render`` draws them
    (the same colour and texture jitter), but at centre (cx, cy) and radius ``r`` (fractions of the side) instead of
    its position and size."""
    background = np.full((size, size), float(BACKGROUNDS[scene.background]))
    if scene.texture == "textured":  # dataset.render's blotches: +-16 grey levels
        coarse = rng.normal(0.0, 1.0, (6, 6))
        blotches = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BICUBIC))
        background += 16.0 * blotches / max(np.abs(blotches).max(), 1e-6)
    alpha = _mask(scene.shape, cx * size, cy * size, r * size, size)[..., None]  # (H, W, 1)
    colour = np.clip(np.array(COLOURS[scene.colour]) + rng.uniform(-12, 12, 3), 0, 255)
    image = alpha * colour + (1 - alpha) * background[..., None]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def size_word(r: float) -> str:
    """The dataset's size word nearest radius ``r``."""
    return min(SIZES, key=lambda word: abs(SIZES[word] - r))


# every (shape, colour, size, background, texture) the captions can say; the position is never said
SCENES = tuple(Scene(shape, colour, size, "center", background, texture) for shape in SHAPES for colour in COLOURS
               for size in SIZES for background in BACKGROUNDS for texture in TEXTURES)
_SCENE_INDEX = {scene: i for i, scene in enumerate(SCENES)}
WORDINGS = 4  # variant v says the size if v & 1, the background if v & 2


def make_data(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images (N, size, size, 3) uint8, their maps (N, size, size) uint8 and scene ids (N,) into ``SCENES``:
    scenes uniform over ``SCENES``, each placed by ``place``. The same arguments give the same data."""
    rng = np.random.default_rng(seed)
    images, maps, ids = np.zeros((n, size, size, 3), np.uint8), np.zeros((n, size, size), np.uint8), []
    for i in range(n):
        cx, cy, r = place(rng)
        scene = replace(SCENES[rng.integers(len(SCENES))], size=size_word(r))  # the caption's size word fits r
        ids.append(_SCENE_INDEX[scene])
        images[i] = draw_scene(scene, cx, cy, r, rng, size)
        maps[i] = np.asarray(where_map(cx, cy, r, size))[..., 0]
    return images, maps, np.array(ids, dtype=np.int64)


@torch.no_grad()
def caption_contexts(pipe) -> torch.Tensor:
    """The frozen text encoder's output (len(SCENES) + 1, WORDINGS, 77, width) for every scene's wordings, the empty
    caption's at [-1]: computed once, looked up per step."""
    captions = [s.caption(size=bool(v & 1), position=False, background=bool(v & 2))
                for s in SCENES for v in range(WORDINGS)] + [""] * WORDINGS
    context, _ = pipe.text_encoder(pipe.tokenizer.encode(captions)[:, 0])  # (N, 77, width)
    return context.view(len(SCENES) + 1, WORDINGS, *context.shape[1:])


# --- network ----------------------------------------------------------------------------------------------------

def controlnet_from_unet(unet: torch.nn.Module) -> ControlNet:
    """A ControlNet whose shared encoder is a copy of ``unet``'s (as ``ControlNetModel.from_unet``), with the image
    embedding's last conv and every zero convolution at zero."""
    net = ControlNet(ControlNetConfig.from_diffusers(controlnet_config()))
    missing, _ = net.load_state_dict(unet.state_dict(), strict=False)  # the U-Net's decoder half is unexpected
    own = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
    lacking = [k for k in missing if not k.startswith(own)]
    if lacking:
        raise ValueError(f"this U-Net does not fit the ControlNet's encoder: missing={lacking[:5]}")
    for zero in [net.controlnet_cond_embedding.conv_out, net.controlnet_mid_block, *net.controlnet_down_blocks]:
        torch.nn.init.zeros_(zero.weight)
        torch.nn.init.zeros_(zero.bias)
    return net


def train(net: ControlNet, unet: torch.nn.Module, means: torch.Tensor, stds: torch.Tensor, maps: torch.Tensor,
          scene_ids: torch.Tensor, contexts: torch.Tensor, scaling_factor: float, steps: int, batch: int, lr: float,
          generator: torch.Generator, log_every: int) -> float:
    """The ControlNet on epsilon prediction through the frozen ``unet`` (``train.noise_prediction``, the loop the
    default model was trained with), each sample's map (``maps`` (N, H, W) uint8) as its control image. Returns the
    final loss (mean of the last 10%)."""
    def predict(xt, t, context, idx):
        image = (maps[idx].float() / 255.0)[:, None].expand(-1, 3, -1, -1)  # (B, 3, H, W) in [0, 1]
        down, mid = net(xt, t, context, image)
        return unet(xt, t, context, down_residuals=down, mid_residual=mid)

    params = [p for p in net.parameters() if p.requires_grad]
    return noise_prediction(predict, params, means, stds, scene_ids, contexts, scaling_factor, steps, batch, lr,
                            generator, log_every, "controlnet")


def write_folder(out: Path, net: ControlNet, training: dict) -> None:
    """config.json (diffusers' ControlNetModel), fp16 diffusion_pytorch_model.safetensors, training.json and the
    example map."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", controlnet_config())
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    write_atomically(out / "diffusion_pytorch_model.safetensors", save(state))
    _write_json(out / TRAINING_FILE, training)
    write_atomically(out / EXAMPLE_FILE, lambda f: where_map(*EXAMPLE_PLACE).save(f, format="PNG"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the defaults are the shipped ControlNet's arguments (its training.json records them)."""
    parser = argparse.ArgumentParser(prog="python -m sdfast.shapes.train_controlnet",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the ControlNet to")
    parser.add_argument("--model", type=Path, default=None, help="the base model (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=20000, help="rendered training images, each with its map")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--quick", action="store_true", help="a few steps on a little data")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.batch = 16, 3, 4
    return args


def recorded_arguments(args: argparse.Namespace) -> dict:
    """What training.json records: every argument but the output folder."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items()) if k != "out"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    pipe = load(args.model, dtype=torch.float32)
    for frozen in (pipe.text_encoder, pipe.unet, pipe.vae):
        frozen.eval().requires_grad_(False)
    images, maps, scene_ids = make_data(args.images, args.seed)
    means, stds = encode_dataset(pipe.vae, images)
    contexts = caption_contexts(pipe)
    print(f"data: {len(images)} images and maps, latents in {time.time() - start:.0f} s", flush=True)

    net = controlnet_from_unet(pipe.unet).train()
    print(f"controlnet: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters", flush=True)
    loss = train(net, pipe.unet, means, stds, torch.from_numpy(maps),
                 torch.from_numpy(scene_ids), contexts, pipe.vae.config.scaling_factor, args.steps, args.batch,
                 args.lr, generator, log_every=max(1, min(100, args.steps // 10)))
    minutes = (time.time() - start) / 60
    write_folder(args.out, net.eval(), {"script": "python -m sdfast.shapes.train_controlnet",
                                        "arguments": recorded_arguments(args), "final_eps_mse": round(loss, 5)})
    size = (args.out / "diffusion_pytorch_model.safetensors").stat().st_size
    print(f"final: eps mse {loss:.4f}; wrote {args.out} ({size / 1e6:.1f} MB) in {minutes:.1f} min")


if __name__ == "__main__":
    main()
