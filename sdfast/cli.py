"""The ``sdfast`` command: ``generate`` (text to image) and ``img2img``.

Bad input (size, steps, scheduler, strength, unreadable image, missing or broken model) prints one line naming
the problem and exits with code 2; nothing reaches the user as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfast", description="Fast, measured Stable Diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", default="out.png", help="output PNG (with --batch N: out-0.png, ...)")
    common.add_argument("--model", default=os.environ.get("SDFAST_MODEL"),
                        help="diffusers folder or original-layout .safetensors/.ckpt (default: $SDFAST_MODEL)")
    common.add_argument("--negative", default=None, help="negative prompt")
    common.add_argument("--steps", type=int, default=30)
    common.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    common.add_argument("--scheduler", default="euler")
    common.add_argument("--seed", type=int, default=None, help="default: random (printed, to reproduce)")
    common.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's size)")
    common.add_argument("--height", type=int, default=None)
    common.add_argument("--batch", type=int, default=1, help="images per prompt")
    common.add_argument("--clip-skip", type=int, default=1, help="1 = last CLIP layer, 2 = penultimate, ...")
    common.add_argument("--long-prompts", action="store_true", help="encode prompts over 75 tokens in chunks")
    common.add_argument("--previews", type=Path, default=None, help="folder for step-by-step previews")
    common.add_argument("--preview-every", type=int, default=1, help="with --previews: every N steps")
    common.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    common.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    common.add_argument("--timings", type=Path, default=None, help="write the per-step timings as JSON here")

    gen = sub.add_parser("generate", parents=[common], help="text to image")
    gen.add_argument("prompt")
    i2i = sub.add_parser("img2img", parents=[common], help="image to image")
    i2i.add_argument("image", type=Path)
    i2i.add_argument("prompt")
    i2i.add_argument("--strength", type=float, default=0.8, help="0: keep the image, 1: ignore it")
    return parser


def _check_args(args) -> None:
    """Everything that can be checked before the (slow) model load."""
    from .schedulers import SCHEDULERS

    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{name} {value} is not a positive multiple of 8")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: need at least 1")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: need at least 1")
    if args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown --scheduler {args.scheduler!r}; choose one of {', '.join(sorted(SCHEDULERS))}")
    if args.command == "img2img":
        if not 0.0 <= args.strength <= 1.0:
            raise ValueError(f"--strength {args.strength} is outside [0, 1]")
        if not args.image.is_file():
            raise ValueError(f"input image {args.image} does not exist")
        try:
            with Image.open(args.image) as im:
                im.verify()
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot read image {args.image}: {e}") from e
    if not args.model:
        raise ValueError("no model: pass --model PATH (a diffusers folder or a .safetensors file) "
                         "or set SDFAST_MODEL")
    if not Path(args.model).exists():
        raise ValueError(f"model {args.model} does not exist")


def _outputs(path: str, n: int) -> list[Path]:
    p = Path(path)
    return [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]


def run(args) -> None:
    import torch

    import sdfast

    _check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    pipe = sdfast.load(args.model, device=device, dtype=dtype)
    image = args.image if args.command == "img2img" else None
    # no total: img2img and two-evaluation schedulers (heun) run a different number of model calls than --steps
    bar = tqdm(desc="denoising", unit="step", file=sys.stderr, leave=False)

    def progress(step, t, latents):
        bar.update(1)

    try:
        result = pipe.generate(
            args.prompt, args.negative, width=args.width, height=args.height, steps=args.steps,
            guidance_scale=args.guidance, scheduler=args.scheduler, seed=args.seed, batch_size=args.batch,
            clip_skip=args.clip_skip, image=image, strength=getattr(args, "strength", 0.8),
            long_prompts=args.long_prompts, preview_every=args.preview_every if args.previews else 0,
            callback=progress)
    finally:
        bar.close()
    outputs = _outputs(args.output, len(result.images))
    for im, path in zip(result.images, outputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    if args.previews:
        args.previews.mkdir(parents=True, exist_ok=True)
        for step, images in result.previews:
            for i, im in enumerate(images):
                im.save(args.previews / f"step{step:03d}" f"{'' if len(images) == 1 else f'-{i}'}.png")
    if args.timings:
        args.timings.write_text(json.dumps({"seed": result.seed, **result.timings.to_dict()}, indent=1))
    print(f"{', '.join(map(str, outputs))} (seed {result.seed}): {result.timings.summary()}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # CheckpointError is a ValueError
        print(f"sdfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
