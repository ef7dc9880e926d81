"""LoRA: low-rank weight updates loaded from kohya / webui, LoCon and diffusers / peft files, merged in place.

    pipe = sdfast.load("model.safetensors")
    pipe.loras.load("style.safetensors", scale=0.8)
    pipe.generate("...")                              # with the loaded LoRAs at their scales
    pipe.generate("...", loras={"style": 0.5})        # this call's own choice; {} for none
    pipe.loras.unload()                               # the base weights again, bit for bit

``formats`` reads the files, ``merge`` applies them.
"""

from .formats import LoRA, LoRAError, Patch
from .merge import LoRAs

__all__ = ["LoRA", "LoRAError", "LoRAs", "Patch"]
