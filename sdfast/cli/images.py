"""``sdfast generate`` (text to image), ``img2img`` and ``interpolate`` (a strip of frames morphing one prompt's
image into another's). The command line becomes one checked ``Request`` before the model loads; its errors speak
in flags (``FLAGS``); files are written whole or not at all (``sdfast.files.write_atomically``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..control.preprocess import PREPROCESSORS
from ..files import write_atomically
from ..tokenizer import PromptTruncated


def add_parsers(sub) -> None:
    base = _base_options("out.png", "output PNG (with --batch N: out-0.png, ...)", None,
                         "default: random (printed, to reproduce)")
    common = argparse.ArgumentParser(add_help=False, parents=[base])
    common.add_argument("--batch", type=int, default=1, help="images per prompt")
    common.add_argument("--clip-skip", type=int, default=1, help="1 = last CLIP layer, 2 = penultimate, ...")
    common.add_argument("--long-prompts", action="store_true", help="encode prompts over 75 tokens in chunks")
    common.add_argument("--previews", type=Path, default=None, help="folder for step-by-step previews")
    common.add_argument("--preview-every", type=int, default=1, help="with --previews: every N steps")
    common.add_argument("--preview-decode", default="auto", help="with --previews: linear (cheap; SD and SDXL VAEs), "
                        "vae (a full decode) or auto (linear where the model's VAE has a map, else vae)")
    common.add_argument("--timings", type=Path, default=None, help="write the per-step timings as JSON here")
    common.add_argument("--control", action="append", default=[], type=control_arg,
                        metavar="MODEL:IMAGE[:SCALE[:START:END]]",
                        help="steer the picture with a ControlNet (a diffusers folder or an original file) reading "
                             "IMAGE, at SCALE (default 1) over the START..END fraction of the steps (default 0..1); "
                             "repeatable")
    common.add_argument("--preprocess", default=None, choices=PREPROCESSORS,
                        help="make each --control IMAGE into this map first (canny: edges; needs sdfast[control])")
    common.add_argument("--backend", default="torch", help="torch, triton, compile, onnxruntime or tensorrt "
                        "(for the last two --model may be a folder written by `sdfast export`)")

    gen = sub.add_parser("generate", parents=[common], help="text to image")
    gen.set_defaults(handler=run)
    gen.add_argument("prompt")
    i2i = sub.add_parser("img2img", parents=[common], help="image to image")
    i2i.set_defaults(handler=run)
    i2i.add_argument("image", type=Path)
    i2i.add_argument("prompt")
    i2i.add_argument("--strength", type=float, default=0.8, help="0: keep the image, 1: ignore it")
    # a fixed default seed: the same command redraws the same strip
    inter = sub.add_parser("interpolate", parents=[_base_options("strip.png", "output PNG", 0, "noise of the first "
                           "frame (default: 0)")], help="a strip of frames from one prompt to another")
    inter.set_defaults(handler=run)
    inter.add_argument("prompt_a")
    inter.add_argument("prompt_b")
    inter.add_argument("--frames", type=int, default=8, help="frames in the strip, both ends included")
    inter.add_argument("--seed-b", type=int, default=None, help="noise of the last frame (default: --seed's)")


def _base_options(output: str, output_help: str, seed: int | None, seed_help: str) -> argparse.ArgumentParser:
    """The options every image command takes, as a parent parser. One fresh parser per command: argparse shares a
    parent's option objects between its children, so a default set for one command would change the others'."""
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("-o", "--output", default=output, help=output_help)
    base.add_argument("--model", default=os.environ.get("SDFAST_MODEL"),
                      help="diffusers folder or original-layout .safetensors/.ckpt (default: $SDFAST_MODEL, "
                           "else the shapes model that ships with sdfast)")
    base.add_argument("--negative", default=None, help="negative prompt")
    base.add_argument("--steps", type=int, default=30)
    base.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    base.add_argument("--scheduler", default="euler")
    base.add_argument("--seed", type=int, default=seed, help=seed_help)
    base.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's size)")
    base.add_argument("--height", type=int, default=None)
    base.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    base.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    base.add_argument("--lora", action="append", default=[], type=lora_arg, metavar="PATH[:SCALE]",
                      help="apply a LoRA (kohya / webui, LoCon or diffusers file) at SCALE (default 1); repeatable")
    return base


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# A request's field -> the flag or argument that sets it, so an error speaks the command line's words.
FLAGS = {"prompt": "PROMPT", "negative_prompt": "--negative", "width": "--width", "height": "--height",
         "size": "--width/--height", "steps": "--steps", "guidance_scale": "--guidance", "scheduler": "--scheduler",
         "seed": "--seed", "batch_size": "--batch", "clip_skip": "--clip-skip", "strength": "--strength",
         "image": "IMAGE", "preview_every": "--preview-every", "long_prompts": "--long-prompts",
         "preview_decode": "--preview-decode", "loras": "--lora", "device": "--device", "controls": "--control",
         "timesteps": "--timesteps"}


def _request(args, callback=None):
    """The command line as a checked ``Request``: every rule applied before the (slow) model load."""
    from ..request import Request

    if args.command == "interpolate":
        return Request.check([args.prompt_a, args.prompt_b], args.negative, width=args.width, height=args.height,
                             steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                             seed=args.seed)
    return Request.check(args.prompt, args.negative, width=args.width, height=args.height, steps=args.steps,
                         guidance_scale=args.guidance, scheduler=args.scheduler, seed=args.seed,
                         batch_size=args.batch, clip_skip=args.clip_skip, long_prompts=args.long_prompts,
                         image=args.image if args.command == "img2img" else None,
                         strength=getattr(args, "strength", 0.8),
                         preview_every=args.preview_every if args.previews else 0,
                         preview_decode=args.preview_decode, callback=callback, controls=_controls(args))


def _controls(args) -> list:
    """``--control`` as the request's controls, each ControlNet named by its path (loaded after the request is
    checked); ``--preprocess`` turns each image into its map."""
    from ..control import Control
    from ..control.preprocess import preprocess
    from ..request import RequestError, read_image

    controls = []
    for i, (model, image, scale, start, end) in enumerate(args.control):
        if args.preprocess:
            try:
                image = preprocess(args.preprocess, read_image(image))
            except RequestError as e:
                raise RequestError(f"controls[{i}].image", e.value, e.rule) from None
        controls.append(Control(str(model), image, scale, start, end))
    return controls


def control_arg(text: str) -> tuple[Path, Path, float, float, float]:
    """``MODEL:IMAGE[:SCALE[:START:END]]`` -> (model, image, scale, start, end); the numbers are checked with the
    request."""
    parts = text.split(":")
    if len(parts) not in (2, 3, 5) or not all(parts[:2]):
        raise argparse.ArgumentTypeError(f"{text!r}: need MODEL:IMAGE, MODEL:IMAGE:SCALE or "
                                         "MODEL:IMAGE:SCALE:START:END, e.g. canny:edges.png:0.8:0:0.6")
    try:
        numbers = [float(x) for x in parts[2:]]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: SCALE, START and END must be numbers, e.g. "
                                         "canny:edges.png:0.8:0:0.6") from None
    scale, start, end = [*numbers, *[1.0, 0.0, 1.0][len(numbers):]]
    return Path(parts[0]), Path(parts[1]), scale, start, end


def lora_arg(text: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` -> (path, scale): the part after the last colon is the scale when it reads as a number."""
    from ..request import lora_scale

    path, _, scale = text.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        return Path(text), 1.0
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r}: name the LoRA file before the scale, e.g. style.safetensors:0.8")
    try:
        return Path(path), lora_scale("--lora", Path(path).stem, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e.rule}") from None


def _check_output(path: Path) -> None:
    """-o names a new or existing image file (its suffix picks the format), never a folder."""
    if path.suffix.lower() not in IMAGE_SUFFIXES or path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"-o {path}: the file name must end in one of {', '.join(IMAGE_SUFFIXES)} (it picks the "
                         "image format)")
    if path.is_dir():
        raise ValueError(f"-o {path}: is a folder; name a file in it, e.g. {path / 'out.png'}")


def _check_args(args) -> None:
    """What the request does not cover: the output names, interpolate's own options, the model's path."""
    from ..schedulers import STOCHASTIC_SCHEDULERS

    _check_output(Path(args.output))
    if getattr(args, "previews", None) and args.preview_every < 1:
        raise ValueError(f"--preview-every {args.preview_every} with --previews: need a step interval >= 1")
    if args.command == "interpolate":
        if args.frames < 2:
            raise ValueError(f"--frames {args.frames}: need at least 2 (the two ends)")
        if args.scheduler in STOCHASTIC_SCHEDULERS:
            raise ValueError(f"--scheduler {args.scheduler} adds fresh noise at every step; interpolate with a "
                             "deterministic one (euler, ddim, dpmpp_2m, ...)")
    if args.model and not Path(args.model).exists():
        raise ValueError(f"model {args.model} does not exist")
    for path, _ in args.lora:
        if not path.is_file():
            raise ValueError(f"--lora {path}: no such file")
    for model, *_ in getattr(args, "control", []):
        if not model.exists():
            raise ValueError(f"--control {model}: no such ControlNet folder or file")


def load_loras(pipe, loras: list[tuple[Path, float]]) -> None:
    """Each ``--lora`` at its scale, named by its file (a second file of the same name gets a suffix)."""
    for i, (path, scale) in enumerate(loras):
        pipe.loras.load(path, scale, name=path.stem if path.stem not in pipe.loras else f"{path.stem}-{i}")


def _outputs(path: str, n: int) -> list[Path]:
    p = Path(path)
    return [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]


def _save_image(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda f: image.save(f, format=Image.registered_extensions()[path.suffix.lower()]))


def run(args) -> None:
    import torch

    import sdfast
    from sdfast.backends import control_options
    from sdfast.pipeline import OutsideVocabulary

    _check_args(args)
    bar = None  # made once the model is loaded, so that no error line is glued to an empty progress bar
    request = _request(args, callback=lambda step, t, latents: bar.update(1))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    exported = args.model and (Path(args.model) / "manifest.json").is_file()  # runs in its export's dtype
    dtype = args.dtype or (None if exported else "fp16" if device.startswith("cuda") else "fp32")
    backend = getattr(args, "backend", "torch")
    pipe = sdfast.load(args.model or None, device=device, dtype=dtype, backend=backend,
                       **control_options(backend, bool(getattr(args, "control", []))))
    load_loras(pipe, args.lora)
    for model in dict.fromkeys(str(model) for model, *_ in getattr(args, "control", [])):
        pipe.controlnets.load(model, name=model)
    if args.command == "interpolate":
        run_interpolate(pipe, args)
        return
    request = request.fit(pipe.facts)  # the model's rules (size multiple, CLIP layers) before the bar shows
    # no total: img2img and two-evaluation schedulers (heun) run a different number of model calls than --steps
    bar = tqdm(desc="denoising", unit="step", file=sys.stderr, leave=False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncated)
            warnings.simplefilter("always", OutsideVocabulary)
            result = pipe.run(request)
    finally:
        bar.close()
    for w in caught:  # after the bar is gone, one line each, in the command line's words
        if isinstance(w.message, PromptTruncated):
            print(f"sdfast {args.command}: warning: {w.message.worded('pass --long-prompts')}", file=sys.stderr)
        elif isinstance(w.message, OutsideVocabulary):
            print(f"sdfast {args.command}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    outputs = _outputs(args.output, len(result.images))
    for im, path in zip(result.images, outputs):
        _save_image(im, path)
    if args.previews:
        for step, images in result.previews:
            for i, im in enumerate(images):
                _save_image(im, args.previews / f"step{step:03d}{'' if len(images) == 1 else f'-{i}'}.png")
    if args.timings:
        write_atomically(args.timings, json.dumps({"seed": result.seed, **result.timings.to_dict()}, indent=1))
    print(f"{', '.join(map(str, outputs))} (seed {result.seed}): {result.timings.summary()}")


def run_interpolate(pipe, args) -> None:
    from ..interpolate import interpolate, strip

    start = time.perf_counter()
    frames = interpolate(pipe, args.prompt_a, args.prompt_b, args.frames, seed=args.seed, seed_b=args.seed_b,
                         steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                         negative_prompt=args.negative, width=args.width, height=args.height)
    output = Path(args.output)
    _save_image(strip(frames), output)
    print(f"{output}: {len(frames)} frames, {args.prompt_a!r} -> {args.prompt_b!r} (seed {args.seed}"
          f"{'' if args.seed_b is None else f', {args.seed_b}'}), {time.perf_counter() - start:.1f} s")
