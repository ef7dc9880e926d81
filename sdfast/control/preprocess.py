"""Control maps made from photos. Canny edges (Canny 1986) through OpenCV, the library ControlNet's own annotators
and diffusers' examples use (``cv2.Canny(image, 100, 200)``): the ``sdfast[control]`` extra. Other maps (pose,
depth, scribbles) are the user's own images."""

from __future__ import annotations

import importlib.util

import numpy as np
from PIL import Image

HAS_OPENCV = importlib.util.find_spec("cv2") is not None  # the control extra is optional; canny() says how to get it

PREPROCESSORS = ("canny",)


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """White edges on black, RGB, the size of ``image``: hysteresis thresholds ``low`` / ``high`` on the gradient
    of its grey levels (the canny ControlNets were trained on 100 / 200)."""
    if not HAS_OPENCV:
        raise ImportError('canny edge maps need OpenCV: pip install "sdfast[control]" (opencv-python-headless)')
    if not 0 <= low < high:
        raise ValueError(f"canny thresholds low={low}, high={high}: need 0 <= low < high (e.g. 100, 200)")
    import cv2  # here, not at import: the CLI lists PREPROCESSORS on every start

    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, low, high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(edges).convert("RGB")


def preprocess(name: str, image: Image.Image) -> Image.Image:
    """The control map ``name`` (one of ``PREPROCESSORS``) of ``image``."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}")
    return canny(image)
