"""Does an image show what its prompt asks for? The colour and shape of the one shape on a neutral background.

No learned parts, so the verdict can be trusted on a model's images as much as on the data's. The backgrounds are
grey (``dataset.BACKGROUNDS``), so the shape is the largest connected region of saturated pixels (chroma, max - min
of RGB, above half the shape's own). Its colour is the palette colour nearest in hue to the region's median RGB.
Its shape follows from two ratios of the region's area: to its bounding box (extent: square 1, circle pi/4,
triangle and star about 1/2) and to its convex hull (solidity: about 1 for the convex shapes, under 0.8 for the star).
Its position is the caption position (``dataset.POSITIONS``) nearest to the region's centroid.

``shapes`` is what a verdict chooses from: the default model's four (``dataset.SHAPES``) unless told, so its
verdicts do not change; the LoRA demo passes ``dataset.DEMO_SHAPES``, which adds the diamond. A diamond has the
triangle's extent and solidity, but it is its own mirror image top to bottom, which an upright triangle is not.
"""

from __future__ import annotations

import colorsys
import re
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .dataset import COLOURS, POSITIONS, SHAPES

_HUES = {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0] * 360.0 for name, rgb in COLOURS.items()}
MIN_CHROMA = 40  # below this no shape was drawn: the background's texture has chroma < 10
MIN_AREA = 12  # pixels; smaller regions are specks, not a shape (a small shape at 64 px covers ~150)
# Shape boundaries, half-way between the ranges measured on 2,000 rendered images (seed 1): solidity splits the
# star (0.61-0.70) from the convex shapes (0.83-1.0); extent splits square (0.89-1.0) / circle (0.72-0.85) /
# triangle (0.49-0.58). Pixelisation spreads the ideal values (star 0.62, square 1, circle 0.79, triangle 0.5).
STAR_SOLIDITY = 0.76
SQUARE_EXTENT = 0.865
CIRCLE_EXTENT = 0.645
# Overlap (intersection over union, in the bounding box) of the region and its top-bottom mirror image, measured on
# 200 rendered images each (seed 0): diamonds 0.79-1.0, triangles 0.33-0.41; through the VAE (encode, decode)
# diamonds 0.71-1.0, triangles 0.35-0.52.
DIAMOND_MIRROR = 0.65


@dataclass(frozen=True)
class Verdict:
    colour: str | None  # None: no shape found
    shape: str | None
    position: str | None  # one of dataset.POSITIONS
    extent: float  # area / bounding-box area
    solidity: float  # area / convex-hull area


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask, as a mask (breadth-first flood fill)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))

    def half(seq):
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def _mirror_overlap(region: np.ndarray) -> float:
    ys, xs = np.nonzero(region)
    box = region[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return float((box & box[::-1]).sum() / (box | box[::-1]).sum())


def _nearest_hue(rgb: np.ndarray) -> str:
    hue = colorsys.rgb_to_hsv(*(rgb / 255.0))[0] * 360.0
    return min(_HUES, key=lambda name: min(abs(hue - _HUES[name]), 360 - abs(hue - _HUES[name])))


def classify(image: Image.Image | np.ndarray, shapes: Sequence[str] = SHAPES) -> Verdict:
    """The colour and shape (one of ``shapes``) in ``image`` (PIL or (H, W, 3) uint8), or None for both when there
    is no shape."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)  # (H, W)
    region = _largest_region(chroma > MIN_CHROMA)
    if region.sum() < MIN_AREA:
        return Verdict(None, None, None, 0.0, 0.0)
    # Re-threshold at half the shape's own chroma: anti-aliased edge pixels then count as half in, as they are.
    region = _largest_region(chroma > 0.5 * np.median(chroma[region]))
    colour = _nearest_hue(np.median(rgb[region], axis=0))
    ys, xs = np.nonzero(region)
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / np.array(region.shape[::-1])  # fractions of the side
    position = min(POSITIONS, key=lambda name: float(np.sum((centre - POSITIONS[name]) ** 2)))
    area = float(len(ys))
    extent = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    solidity = area / _hull_area(corners)
    if solidity < STAR_SOLIDITY:
        shape = "star"
    elif extent > SQUARE_EXTENT:
        shape = "square"
    elif extent > CIRCLE_EXTENT:
        shape = "circle"
    elif "diamond" in shapes and _mirror_overlap(region) > DIAMOND_MIRROR:
        shape = "diamond"
    else:
        shape = "triangle"
    return Verdict(colour, shape, position, extent, solidity)


def prompt_attributes(prompt: str, shapes: Sequence[str] = SHAPES) -> tuple[str | None, str | None]:
    """The colour and shape (of ``shapes``) words a prompt asks for (None where it names none)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in shapes), None)
    return colour, shape


def prompt_position(prompt: str) -> str | None:
    """The ``dataset.POSITIONS`` entry a prompt asks for, in any of the words ``phrasing`` uses ("upper-left",
    "in the middle"), or None where it names none."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    vertical = "top" if words & {"top", "upper"} else "bottom" if words & {"bottom", "lower"} else None
    horizontal = next((w for w in ("left", "right") if w in words), None)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    return "center" if words & {"center", "centre", "middle"} else None


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    colour_ok: bool
    shape_ok: bool
    position_ok: bool | None  # None: the prompt names no position


def check(image: Image.Image | np.ndarray, prompt: str, shapes: Sequence[str] = SHAPES) -> Check:
    """The checker's verdict on ``image`` and whether it agrees with the colour, shape and position ``prompt``
    names."""
    verdict = classify(image, shapes)
    colour, shape = prompt_attributes(prompt, shapes)
    position = prompt_position(prompt)
    return Check(verdict, verdict.colour == colour, verdict.shape == shape,
                 None if position is None else verdict.position == position)
