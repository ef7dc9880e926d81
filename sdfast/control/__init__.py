"""ControlNet: a control image (edges, pose, depth, a layout map) steering where the U-Net puts things.

    pipe.controlnets.load("control_sd15_canny.safetensors", name="canny")
    pipe.generate("a house", controls=[Control("canny", edges, scale=0.8, start=0.0, end=1.0)])

``loading`` reads diffusers folders and original single files, ``controls`` holds the request's part and the
pipeline's ControlNets, ``preprocess`` makes control maps from photos (the ``sdfast[control]`` extra).
"""

from .controls import Control, ControlNets
from .loading import load_controlnet

__all__ = ["Control", "ControlNets", "load_controlnet"]
