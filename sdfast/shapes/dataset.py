"""The synthetic data the shipped default model learns: one coloured shape on a plain or lightly textured background.

A ``Scene`` is one combination of shape (circle, square, triangle, star), colour (6), size (2), position (5),
background (white, gray, black) and texture (plain, textured): 1,440 combinations. ``render`` draws a scene with
seeded jitter (centre, radius, colour, texture), 4x supersampled and box-filtered so edges are anti-aliased.
``Scene.caption`` writes "a small red circle at the top left on a white background", or a shorter form that leaves
out size, position or background ("a red circle"), so short prompts are in the training distribution too; the
other ways people word a scene ("red circle top left") are ``phrasing.py``'s.

``HELD_OUT`` is a seeded 10% of the combinations that training never renders; their full captions are the prompts
``evaluate.py`` measures the model on. Every colour-shape pair still appears in training, in other combinations.

The diamond (a square turned 45 degrees) lies outside that world: the default model never sees one, the demo LoRA
(``train_lora.py``) learns it from ``DIAMOND_TRAINING_SCENES``. ``DIAMOND_HELD_OUT`` keeps back whole (position,
background) layouts, so its prompts (``diamond_held_out_prompts()``) are diamond scenes the LoRA never rendered in
any colour, size or texture.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # RGB; hues spread round the wheel so a checker can tell them apart by hue alone
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 210, 25),
    "green": (35, 160, 55),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
}
SIZES = {"small": 0.15, "large": 0.26}  # shape radius as a fraction of the image side
POSITIONS = {  # caption phrase -> centre (x, y) as fractions of the image side
    "top left": (0.32, 0.32), "top right": (0.68, 0.32), "center": (0.5, 0.5),
    "bottom left": (0.32, 0.68), "bottom right": (0.68, 0.68),
}
BACKGROUNDS = {"white": 240, "gray": 128, "black": 20}  # grey level: neutral, so any shape colour stands out
TEXTURES = ("plain", "textured")
IMAGE_SIZE = 64
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    texture: str

    def caption(self, size: bool = True, position: bool = True, background: bool = True) -> str:
        """"a small red circle at the top left on a textured white background"; each flag keeps one attribute."""
        words = ["a"] + ([self.size] if size else []) + [self.colour, self.shape]
        if position:
            words.append("in the center" if self.position == "center" else f"at the {self.position}")
        if background:
            texture = "textured " if self.texture == "textured" else ""
            words.append(f"on a {texture}{self.background} background")
        return " ".join(words)


ALL_SCENES = tuple(Scene(*combo) for combo in itertools.product(
    SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS, TEXTURES))
# Fixed seed: the held-out combinations must stay the same between training and evaluation, whatever their seeds.
HELD_OUT = tuple(sorted(random.Random(1234).sample(ALL_SCENES, len(ALL_SCENES) // 10),
                        key=ALL_SCENES.index))
TRAINING_SCENES = tuple(s for s in ALL_SCENES if s not in set(HELD_OUT))
# Not in SHAPES, so ALL_SCENES, HELD_OUT and make_dataset's defaults stay the default model's world.
DEMO_SHAPES = (*SHAPES, "diamond")  # what the default model with the demo LoRA draws
DIAMOND_SCENES = tuple(Scene("diamond", *rest) for rest in itertools.product(
    COLOURS, SIZES, POSITIONS, BACKGROUNDS, TEXTURES))
# Three seeded positions, one on each background: 3 of the 15 layouts, in every colour, size and texture, 72 scenes.
# Their positions and backgrounds still appear in training diamonds, only never together.
_DIAMOND_LAYOUTS = set(zip(random.Random(4321).sample(list(POSITIONS), 3), BACKGROUNDS))
DIAMOND_HELD_OUT = tuple(s for s in DIAMOND_SCENES if (s.position, s.background) in _DIAMOND_LAYOUTS)
DIAMOND_TRAINING_SCENES = tuple(s for s in DIAMOND_SCENES if s not in set(DIAMOND_HELD_OUT))


def held_out_prompts() -> list[str]:
    """The full captions of the held-out scenes: prompts the model never saw paired with an image."""
    return [scene.caption() for scene in HELD_OUT]


def diamond_held_out_prompts() -> list[str]:
    """The full captions of the held-out diamond scenes: what the demo LoRA is measured on."""
    return [scene.caption() for scene in DIAMOND_HELD_OUT]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of an upright shape of radius ``r`` at (cx, cy); None for the circle (an ellipse).
    Square half-side and triangle/star outer radius are scaled so the four shapes cover similar areas."""
    if shape == "square":
        h = 0.88 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":  # the square turned 45 degrees; half-diagonal 1.25 r: 3.1 r^2, the square's area
        R = 1.25 * r
        return [(cx, cy - R), (cx + R, cy), (cx, cy + R), (cx - R, cy)]
    if shape == "triangle":  # equilateral, pointing up, centred on its centroid
        R = 1.25 * r
        return [(cx + R * np.cos(a), cy + R * np.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "star":  # five points; inner radius half the outer one keeps the arms thick enough to see
        R = 1.2 * r
        angles = np.radians(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, R, 0.5 * R)
        return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
    return None


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 image of ``scene``; ``rng`` draws the jitter (centre +-2%, radius +-6%,
    colour +-12 per channel, the texture)."""
    level = BACKGROUNDS[scene.background]
    background = np.full((size, size), float(level))
    if scene.texture == "textured":  # soft grey blotches of +-16 levels: texture, but no colour of its own
        coarse = rng.normal(0.0, 1.0, (6, 6))
        blotches = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BICUBIC))
        background += 16.0 * blotches / max(np.abs(blotches).max(), 1e-6)
    s = size * _SUPERSAMPLE
    fx, fy = POSITIONS[scene.position]
    cx, cy = (np.array([fx, fy]) + rng.uniform(-0.02, 0.02, 2)) * s
    r = SIZES[scene.size] * s * rng.uniform(0.94, 1.06)
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(scene.shape, cx, cy, r)
    if outline is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(float(x), float(y)) for x, y in outline], fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255.0  # (H, W, 1)
    colour = np.clip(np.array(COLOURS[scene.colour]) + rng.uniform(-12, 12, 3), 0, 255)
    image = alpha * colour + (1 - alpha) * background[..., None]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_dataset(n: int, seed: int, size: int = IMAGE_SIZE, scenes: tuple[Scene, ...] = TRAINING_SCENES
                 ) -> tuple[np.ndarray, list[Scene]]:
    """``n`` training images (N, size, size, 3) uint8 and their scenes: combinations drawn uniformly from
    ``scenes`` (default: the default model's training, not held-out, scenes). The same arguments give the same
    data."""
    rng = np.random.default_rng(seed)
    drawn = [scenes[i] for i in rng.integers(0, len(scenes), n)]
    images = np.stack([render(scene, rng, size) for scene in drawn]) if n else np.zeros((0, size, size, 3), np.uint8)
    return images, drawn
