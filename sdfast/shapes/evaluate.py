"""Measures the shipped default model and draws the README's pictures.

    python -m sdfast.shapes.evaluate                  # the shipped model; figures to stdout and docs/

Two held-out prompt sets, each generated once at 20 Euler steps with guidance: the templates (``dataset.
held_out_prompts``: the full captions of scene combinations training never rendered) and the phrasings
(``phrasing.held_out_phrasings``: the same scenes worded in structures no training caption has). The checker compares
each image's colour, shape and position with the prompt's. Then the templates again with every scheduler. The
figures go to ``evaluation.json``; the pictures are a colour x shape grid of short prompts (``grid.png``), the
step-by-step preview strip (the model's clean-image estimate, VAE-decoded, at steps 1, 2, 4, 5, 10, 20:
``previews.png``) and an interpolation (``interpolate.png``).

    python -m sdfast.shapes.evaluate --lora sdfast/data/loras/diamond.safetensors   # the demo LoRA's effect

measures the demo LoRA (``train_lora.py``) instead: the held-out diamond prompts (``dataset.diamond_held_out_prompts``,
checked with the diamond among the shapes, ``dataset.DEMO_SHAPES``) and the default model's held-out prompts
(checked as above), each without and with the LoRA, into ``lora_evaluation.json``; ``lora_diamond.png`` shows
"a <colour> diamond" without and with it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..interpolate import interpolate, strip
from ..loading import load
from ..pipeline import Pipeline
from .checker import check, prompt_attributes
from ..schedulers import SCHEDULERS
from .dataset import COLOURS, DEMO_SHAPES, SHAPES, diamond_held_out_prompts, held_out_prompts
from .phrasing import held_out_phrasings

STEPS = 20
GUIDANCE = 7.5
PREVIEW_STEPS = (1, 2, 4, 5, 10, 20)
CELL = 128  # pictures are upscaled from 64 px so they read at README width


def measure(pipe: Pipeline, prompts: list[str], steps: int, guidance: float, batch: int = 16,
            shapes: Sequence[str] = SHAPES, scheduler: str = "euler") -> dict:
    """Generate every prompt (seed = its index's batch start) and check it, a shape being one of ``shapes``; the
    agreement figures (position: over the prompts that name one)."""
    checks = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        images = pipe.generate(chunk, steps=steps, guidance_scale=guidance, scheduler=scheduler, seed=i).images
        checks += [check(image, prompt, shapes) for image, prompt in zip(images, chunk)]
    per_shape, per_colour = defaultdict(list), defaultdict(list)
    for c, prompt in zip(checks, prompts):
        colour, shape = prompt_attributes(prompt, shapes)
        per_shape[shape].append(c.shape_ok)
        per_colour[colour].append(c.colour_ok)
    return {
        "prompts": len(prompts), "steps": steps, "guidance_scale": guidance, "scheduler": scheduler,
        "colour_agreement": float(np.mean([c.colour_ok for c in checks])),
        "shape_agreement": float(np.mean([c.shape_ok for c in checks])),
        "both_agreement": float(np.mean([c.colour_ok and c.shape_ok for c in checks])),
        "position_agreement": _mean([c.position_ok for c in checks if c.position_ok is not None]),
        "shape_agreement_by_shape": {k: float(np.mean(v)) for k, v in per_shape.items()},
        "colour_agreement_by_colour": {k: float(np.mean(v)) for k, v in per_colour.items()},
        "shapes_read": dict(Counter(c.verdict.shape or "none" for c in checks)),
    }


def scheduler_settings(steps: int, guidance: float) -> list[tuple[str, int, float]]:
    """Every scheduler at ``steps`` and ``guidance``, then the settings that make the weak ones usable on the
    shipped model: PNDM and UniPC with more steps, LCM without guidance."""
    return [(name, steps, guidance) for name in SCHEDULERS] + [
        ("pndm", 50, guidance), ("pndm", 100, guidance), ("unipc", 50, guidance), ("lcm", 8, 1.0)]


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def _labelled(images: list[Image.Image], labels: list[str], columns: int) -> Image.Image:
    """Images upscaled to CELL px in a grid, each with its label underneath."""
    font = ImageFont.load_default()
    rows = -(-len(images) // columns)
    pad = 14
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = i % columns * CELL, i // columns * (CELL + pad)
        sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (x, y))
        draw.text((x + 3, y + CELL + 1), label, fill="black", font=font)
    return sheet


def pictures(pipe: Pipeline, out: Path, steps: int, guidance: float) -> None:
    """grid.png (one "a {colour} {shape}" per cell), previews.png (the PREVIEW_STEPS up to ``steps``),
    interpolate.png."""
    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    images = [image for row in range(0, len(prompts), len(SHAPES))  # a call per row: under limits.max_images
              for image in pipe.generate(prompts[row:row + len(SHAPES)], steps=steps, guidance_scale=guidance,
                                         seed=0).images]
    _labelled(images, [p[2:] for p in prompts], columns=len(SHAPES)).save(out / "grid.png")

    prompt = "a large green star in the center on a white background"
    result = pipe.generate(prompt, steps=steps, guidance_scale=guidance, seed=1, preview_every=1,
                           preview_decode="vae")
    previews = dict(result.previews)
    shown = [s for s in PREVIEW_STEPS if s <= steps]
    _labelled([previews[s][0] for s in shown], [f"step {s}" for s in shown], columns=len(shown)).save(
        out / "previews.png")

    frames = interpolate(pipe, "a red circle", "a blue square", 8, seed=0, steps=steps, guidance_scale=guidance)
    strip([f.resize((CELL, CELL), Image.NEAREST) for f in frames]).save(out / "interpolate.png")


def measure_lora(pipe: Pipeline, lora: Path, steps: int, guidance: float) -> dict:
    """``measure`` on the held-out diamond prompts (the diamond among the shapes) and on the default model's
    held-out prompts (its four shapes), without and with ``lora`` loaded; the pipeline is left without it."""
    def both() -> dict:
        return {"diamond": measure(pipe, diamond_held_out_prompts(), steps, guidance, shapes=DEMO_SHAPES),
                "default": measure(pipe, held_out_prompts(), steps, guidance)}

    without = both()
    name = pipe.loras.load(lora)
    try:
        return {"without": without, "with": both()}
    finally:
        pipe.loras.unload(name)


def lora_picture(pipe: Pipeline, lora: Path, steps: int, guidance: float) -> Image.Image:
    """"a <colour> diamond" for each colour: a row without ``lora``, a row with it (seed 0)."""
    prompts = [f"a {colour} diamond" for colour in COLOURS]
    without = pipe.generate(prompts, steps=steps, guidance_scale=guidance, seed=0).images
    name = pipe.loras.load(lora)
    try:
        with_lora = pipe.generate(prompts, steps=steps, guidance_scale=guidance, seed=0).images
    finally:
        pipe.loras.unload(name)
    labels = [f"{colour}, no LoRA" for colour in COLOURS] + [f"{colour}, LoRA" for colour in COLOURS]
    return _labelled(without + with_lora, labels, columns=len(COLOURS))


def _lora_main(pipe: Pipeline, args: argparse.Namespace) -> None:
    start = time.time()
    figures = {"lora": Path(args.lora).name, **measure_lora(pipe, args.lora, args.steps, args.guidance),
               "seconds": round(time.time() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_evaluation.json").write_text(json.dumps(figures, indent=2) + "\n")
    lora_picture(pipe, args.lora, args.steps, args.guidance).save(args.out / "lora_diamond.png")
    for loaded in ("without", "with"):
        for prompts, f in figures[loaded].items():
            print(f"{loaded:7s} LoRA, {f['prompts']:3d} held-out {prompts:7s} prompts: colour "
                  f"{f['colour_agreement']:.1%}, shape {f['shape_agreement']:.1%}, shapes read {f['shapes_read']}")
    print(f"{figures['seconds']} s; lora_evaluation.json and lora_diamond.png in {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdfast.shapes.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="figures and pictures")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--lora", type=Path, default=None, help="measure this LoRA (the diamond demo) instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args.model)
    if args.lora:
        return _lora_main(pipe, args)
    start = time.time()
    figures = {"templates": measure(pipe, held_out_prompts(), args.steps, args.guidance),
               "phrasings": measure(pipe, held_out_phrasings(), args.steps, args.guidance),
               "schedulers": [measure(pipe, held_out_prompts(), steps, guidance, scheduler=name)
                              for name, steps, guidance in scheduler_settings(args.steps, args.guidance)]}
    figures["seconds"] = round(time.time() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(figures, indent=2) + "\n")
    pictures(pipe, args.out, args.steps, args.guidance)
    print(f"{args.steps} steps, guidance {args.guidance}, {figures['seconds']} s; pictures in {args.out}")
    for name, f in [("templates", figures["templates"]), ("phrasings", figures["phrasings"]),
                    *(("templates", f) for f in figures["schedulers"])]:
        print(f"{name:9s} {f['scheduler']:15s} {f['steps']:3d} steps, guidance {f['guidance_scale']:3g}: colour "
              f"{f['colour_agreement']:6.1%}, shape {f['shape_agreement']:6.1%}, position {f['position_agreement']:6.1%}")


if __name__ == "__main__":
    main()
