"""sdfast: a fast, honest Stable Diffusion inference runtime.

    pipe = sdfast.load("path/to/model")           # a diffusers folder or an original-layout single file
    result = pipe.generate("a red circle", steps=20, seed=0)
"""

from .checkpoint import CheckpointError
from .loading import load
from .pipeline import Pipeline

__all__ = ["CheckpointError", "Pipeline", "load"]
