"""What a call asks of its ControlNets (``Control``), the ControlNets a pipeline holds (``ControlNets``), and the
form the denoising loop runs them in (``Active``).

In each U-Net call every active ControlNet reads the same latents, timestep and conditioning as the U-Net plus its
own control image, and the U-Net adds the scaled sum of their residuals to its skips and middle block. A control
acts on the model calls whose place in the schedule lies inside its [start, end] fraction (diffusers'
``control_guidance_start`` / ``_end``: call i of n is kept unless i/n < start or (i+1)/n > end).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import torch
from PIL import Image

from ..models.controlnet import ControlNet
from ..request import Limits, RequestError, number, read_image
from .loading import load_controlnet

MAX_CONTROL_SCALE = 10.0  # conditioning scales run 0..2 in practice; far beyond that the residuals swamp the U-Net


@dataclasses.dataclass(frozen=True)
class Control:
    """One ControlNet in one call: ``model`` a name in ``pipe.controlnets`` (or a ``ControlNet``), ``image`` the
    control map (PIL, a path or a file; resized to the output size), ``scale`` its residuals' weight, ``start`` /
    ``end`` the fraction of the schedule it acts on."""

    model: str | ControlNet
    image: Image.Image | str | Path
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def check_controls(value, limits: Limits = Limits()) -> tuple[Control, ...]:
    """``generate``'s ``controls``: a list of ``Control`` (or of dicts with its fields, as JSON gives them), each
    checked, its image read as RGB."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise RequestError("controls", value, "need a list of Control(model, image, scale, start, end)")
    checked = []
    for i, control in enumerate(value):
        name = f"controls[{i}]"
        if isinstance(control, dict):
            unknown = sorted(set(control) - {f.name for f in dataclasses.fields(Control)})
            if unknown or "model" not in control or "image" not in control:
                raise RequestError(name, control, "need the fields model and image, and optionally scale, start "
                                   "and end" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
            control = Control(**control)
        if not isinstance(control, Control):
            raise RequestError(name, control, "need a Control(model, image, scale, start, end)")
        if not (isinstance(control.model, ControlNet) or (isinstance(control.model, str) and control.model)):
            raise RequestError(f"{name}.model", control.model, "need the name of a loaded ControlNet "
                               "(pipe.controlnets.load) or a ControlNet")
        numbers = {f: number(f"{name}.{f}", getattr(control, f)) for f in ("scale", "start", "end")}
        if abs(numbers["scale"]) > MAX_CONTROL_SCALE:
            raise RequestError(f"{name}.scale", control.scale, f"outside [-{MAX_CONTROL_SCALE:g}, "
                               f"{MAX_CONTROL_SCALE:g}] (1: as trained, 0: off)")
        if not 0.0 <= numbers["start"] < numbers["end"] <= 1.0:
            raise RequestError(f"{name}.start", (control.start, control.end), "need 0 <= start < end <= 1: the "
                               "fraction of the schedule the ControlNet acts on")
        try:
            image = read_image(control.image, limits)
        except RequestError as e:
            raise RequestError(f"{name}.image", e.value, e.rule) from None
        checked.append(dataclasses.replace(control, image=image, **numbers))
    return tuple(checked)


def check_fits(unet, control) -> None:
    """A one-line error when a ControlNet's config (``control``) was made for another model than ``unet``'s."""
    for field in ("context_dim", "block_channels", "layers_per_block", "added_time_dim", "added_cond_dim"):
        if getattr(unet, field) != getattr(control, field):
            raise ValueError(f"this ControlNet was made for another model: its {field} is "
                             f"{getattr(control, field)}, this U-Net's {getattr(unet, field)} (an SD 1.x "
                             "ControlNet needs an SD 1.x model, an SDXL one SDXL)")


@dataclasses.dataclass(frozen=True)
class Active:
    """A control as the loop runs it: the ControlNet, its image (rows, C, H, W) in [0, 1] on the U-Net's device
    (stacked like the conditioning: [negatives; prompts] when guiding), its scale and window."""

    net: torch.nn.Module  # or the export backends' graph of it (``sdfast.backends.exported.ControlNet``)
    image: torch.Tensor
    scale: float
    start: float
    end: float

    def acts_at(self, call: int, calls: int) -> bool:
        return not (call / calls < self.start or (call + 1) / calls > self.end)


class ControlNets:
    """``pipe.controlnets``: the ControlNets a pipeline holds by name, on its device and dtype, converted by its
    backend (the triton backend's kernels, ``torch.compile``) as they are added."""

    def __init__(self, pipe, lock: threading.RLock):
        self._pipe, self._lock = pipe, lock
        self._nets: dict[str, torch.nn.Module] = {}

    def load(self, path, name: str | None = None) -> str:
        """Load a ControlNet (a diffusers folder or an original single file) under ``name`` (default: the file's
        or folder's name); returns the name. On the export backends it runs as its exported graph
        (``Pipeline.control_loader``: found in the export folder by the file's name, or exported into the cache)."""
        name = name or Path(path).stem
        if self._pipe.control_loader is not None:
            net = self._pipe.control_loader(self._pipe, path)
            check_fits(self._pipe.unet.config, net.config)
            with self._lock:
                self._nets[name] = net
            return name
        self._backend_step()  # before the file is read: a backend that runs no ControlNets refuses whatever size
        return self.add(load_controlnet(path, self._pipe.device, self._pipe.dtype), name)

    def add(self, net: ControlNet, name: str) -> str:
        """Hold ``net`` (a ``ControlNet`` made for this model) under ``name``, replacing one of that name."""
        with self._lock:
            self._nets[name] = self.prepare(net)
        return name

    def prepare(self, net: ControlNet, convert: bool = True) -> torch.nn.Module:
        """``net`` checked to fit this pipeline's U-Net and its backend, on its device and dtype, and converted by
        the backend (``convert``: a ControlNet handed to one call runs as it is; add it here to convert it once)."""
        if not isinstance(net, ControlNet):
            raise TypeError(f"need a ControlNet (sdfast.control.load_controlnet), not a {type(net).__name__}")
        step = self._backend_step()
        check_fits(self._pipe.unet.config, net.config)
        net = net.to(self._pipe.device, self._pipe.dtype)
        return step(net) if convert else net

    def _backend_step(self):
        """The backend's conversion of a ControlNet; a one-line error where the backend runs none."""
        if self._pipe.control_step is None:
            raise ValueError("this pipeline's backend runs no ControlNets: load the model with backend torch, "
                             "triton, compile, onnxruntime or tensorrt to use them")
        return self._pipe.control_step

    def unload(self, name: str | None = None) -> None:
        """Drop the ControlNet called ``name``, or all of them."""
        with self._lock:
            if name is None:
                self._nets.clear()
            elif self._nets.pop(name, None) is None:
                raise KeyError(f"no ControlNet called {name!r} is loaded (loaded: {', '.join(self._nets) or 'none'})")

    def __getitem__(self, name: str) -> torch.nn.Module:
        return self._nets[name]

    def __contains__(self, name: str) -> bool:
        return name in self._nets

    @property
    def names(self) -> list[str]:
        return list(self._nets)
