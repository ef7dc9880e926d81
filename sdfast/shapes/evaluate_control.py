"""Measures the demo ControlNet "where" (``train_controlnet.py``): does the shape land where the map says?

    python -m sdfast.shapes.evaluate_control          # the shipped ControlNet; figures to stdout and docs/

Held-out maps (a white disc on black, centre and radius drawn by ``train_controlnet.place`` with a seed training
never used, so no map is a training map), each with a prompt that says colour and shape but no place ("a red star",
"a small red star", "a red star on a gray background", ...). Every prompt is generated twice, with the same seed,
at 20 Euler steps with guidance 7.5 as ``evaluate.py`` does: without the ControlNet and with it. The generated
shape is the checker's region (the largest saturated one); its position agrees when its centroid lies within
``TOLERANCE`` pixels of the map's centre (an eighth of the side, one latent pixel); the checker also reads its colour
and shape against the prompt's, so that the ControlNet is seen not to spoil them.

Writes ``controlnet_evaluation.json`` and ``controlnet_where.png`` (rows: maps, without, with).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..control import Control
from ..loading import load
from ..pipeline import Pipeline
from .checker import MIN_AREA, MIN_CHROMA, _largest_region, check, prompt_attributes
from .dataset import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES
from .evaluate import GUIDANCE, STEPS, _labelled
from .train_controlnet import EXAMPLE_FILE, place, size_word, where_map

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "controlnets" / "where"
EXAMPLE_MAP = SHIPPED / EXAMPLE_FILE  # the README's map
HELD_OUT_SEED = 20250  # training draws its places from --seed (0 for the shipped run)
MAPS = 192  # 8 per colour-shape pair, two in each wording
TOLERANCE = 8.0  # pixels between the shape's centroid and the map's centre


def held_out(n: int = MAPS, seed: int = HELD_OUT_SEED) -> list[tuple[str, tuple[float, float, float]]]:
    """``n`` (prompt, (cx, cy, r)) pairs: map places from ``train_controlnet.place``, prompts cycling over the
    colour-shape pairs and four wordings (plain; with the size word that fits r; with a background; with both)."""
    rng = np.random.default_rng(seed)
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    out = []
    for i in range(n):
        cx, cy, r = place(rng)
        colour, shape = pairs[i % len(pairs)]
        wording = i // len(pairs) % 4
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        words = ["a"] + ([size_word(r)] if wording & 1 else []) + [colour, shape]
        words += [f"on a {background} background"] if wording & 2 else []
        out.append((" ".join(words), (cx, cy, r)))
    return out


def centre(image: Image.Image | np.ndarray) -> tuple[float, float] | None:
    """The centroid (x, y) in pixels of the shape the checker reads (``checker.classify``'s region: the largest
    saturated region, re-thresholded at half its chroma), or None when there is none."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)  # (H, W)
    region = _largest_region(chroma > MIN_CHROMA)
    if region.sum() < MIN_AREA:
        return None
    region = _largest_region(chroma > 0.5 * np.median(chroma[region]))
    ys, xs = np.nonzero(region)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)  # pixel i covers [i, i + 1)


def generate(pipe: Pipeline, cases, controlnet: str | None, steps: int, guidance: float,
             size: int = IMAGE_SIZE) -> list[Image.Image]:
    """One image per (prompt, place), seed = its index; with the loaded ControlNet ``controlnet`` reading the place's
    map, or without any."""
    images = []
    for seed, (prompt, (cx, cy, r)) in enumerate(cases):
        controls = [Control(controlnet, where_map(cx, cy, r, size))] if controlnet else None
        images += pipe.generate(prompt, steps=steps, guidance_scale=guidance, scheduler="euler", seed=seed,
                                width=size, height=size, controls=controls).images
    return images


def agreement(images: list[Image.Image], cases, size: int = IMAGE_SIZE) -> dict:
    """Position agreement (centroid within TOLERANCE px of the map's centre), the checker's colour and shape
    agreement, and the distances."""
    rows = []
    for image, (prompt, (cx, cy, r)) in zip(images, cases):
        found = centre(image)
        distance = float(np.hypot(found[0] - cx * size, found[1] - cy * size)) if found else float("inf")
        c = check(image, prompt)
        rows.append((prompt_attributes(prompt)[1], distance, c.colour_ok, c.shape_ok))
    distances = np.array([d for _, d, _, _ in rows])
    by_shape, shape_by_shape = defaultdict(list), defaultdict(list)
    for shape, d, _, shape_ok in rows:
        by_shape[shape].append(d <= TOLERANCE)
        shape_by_shape[shape].append(shape_ok)
    return {
        "position_agreement": float(np.mean(distances <= TOLERANCE)),
        "within_4_px": float(np.mean(distances <= 4.0)),
        "median_distance_px": round(float(np.median(distances)), 2),
        "no_shape_found": int(np.isinf(distances).sum()),
        "colour_agreement": float(np.mean([c for _, _, c, _ in rows])),
        "shape_agreement": float(np.mean([s for _, _, _, s in rows])),
        "all_three_agreement": float(np.mean([d <= TOLERANCE and c and s for _, d, c, s in rows])),
        "position_agreement_by_shape": {k: float(np.mean(v)) for k, v in by_shape.items()},
        "shape_agreement_by_shape": {k: float(np.mean(v)) for k, v in shape_by_shape.items()},
    }


def measure(pipe: Pipeline, controlnet: Path, cases, steps: int = STEPS, guidance: float = GUIDANCE
            ) -> tuple[dict, list[Image.Image], list[Image.Image]]:
    """The figures without and with ``controlnet`` on ``cases``, and the two sets of images; the pipeline is left
    without it."""
    without = generate(pipe, cases, None, steps, guidance)
    name = pipe.controlnets.load(controlnet, name="where")
    try:
        with_control = generate(pipe, cases, name, steps, guidance)
    finally:
        pipe.controlnets.unload(name)
    figures = {"maps": len(cases), "steps": steps, "guidance_scale": guidance, "scheduler": "euler",
               "tolerance_px": TOLERANCE, "held_out_seed": HELD_OUT_SEED,
               "without": agreement(without, cases), "with": agreement(with_control, cases)}
    return figures, without, with_control


def picture(cases, without: list[Image.Image], with_control: list[Image.Image], columns: int = 8) -> Image.Image:
    """``columns`` of the first 24 cases (the plain "a <colour> <shape>" prompts), every third: a row of maps
    labelled with their prompts, a row without the ControlNet, a row with it."""
    shown = list(range(0, min(24, len(cases)), 3))[:columns]
    maps = [where_map(*cases[i][1]) for i in shown]
    return _labelled(maps + [without[i] for i in shown] + [with_control[i] for i in shown],
                     [cases[i][0][2:] for i in shown] + ["without"] * len(shown) + ["with ControlNet"] * len(shown),
                     len(shown))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdfast.shapes.evaluate_control",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    parser.add_argument("--controlnet", type=Path, default=SHIPPED, help="default: the shipped one")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="figures and picture")
    parser.add_argument("--maps", type=int, default=MAPS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args.model)
    start = time.time()
    cases = held_out(args.maps)
    figures, without, with_control = measure(pipe, args.controlnet, cases, args.steps, args.guidance)
    figures["seconds"] = round(time.time() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "controlnet_evaluation.json").write_text(json.dumps(figures, indent=2) + "\n")
    picture(cases, without, with_control).save(args.out / "controlnet_where.png")
    for which in ("without", "with"):
        f = figures[which]
        print(f"{which:7s} ControlNet, {len(cases)} held-out maps: position {f['position_agreement']:.1%} "
              f"(within {TOLERANCE:g} px; median {f['median_distance_px']} px), colour {f['colour_agreement']:.1%}, "
              f"shape {f['shape_agreement']:.1%}")
    print(f"{figures['seconds']} s; controlnet_evaluation.json and controlnet_where.png in {args.out}")


if __name__ == "__main__":
    main()
