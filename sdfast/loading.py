"""From a path to a ``Pipeline``: ``load`` picks the checkpoint layout (diffusers folder, original single file,
``sdfast export`` folder) and the backend, checks the device and dtype, and builds the networks there."""

from __future__ import annotations

from pathlib import Path

import torch

from . import backends
from .checkpoint import CheckpointError, load_diffusers, load_single_file, read_json
from .pipeline import Pipeline
from .request import RequestError

# The small model trained on synthetic shapes that ships inside sdfast (sdfast/shapes/train.py): what load() and
# the CLI use when no model is named.
DEFAULT_MODEL = Path(__file__).parent / "data" / "default_model"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def load(path=None, device="cpu", dtype=None, *, overrides: dict | None = None, backend: str = "torch",
         **backend_options) -> Pipeline:
    """Load a Stable Diffusion 1.x / 2.x / XL checkpoint: a diffusers folder, or an original-layout single file
    (``.safetensors``; ``.ckpt`` only through ``weights_only=True``). Weights land directly in ``dtype`` on
    ``device``. Raises ``CheckpointError`` naming the problem for anything that cannot load. ``path`` None loads
    the small shapes model that ships with sdfast (``DEFAULT_MODEL``), offline.

    ``overrides`` (single files only) sets config fields the weights cannot reveal, in diffusers' config names,
    e.g. ``{"scheduler": {"prediction_type": "epsilon"}, "unet": {"upcast_attention": True}}`` for an SD 2.x
    file that the defaults (v-prediction at 768 px for 2.x) do not describe.

    ``backend`` "onnxruntime" or "tensorrt" runs exported graphs instead of the torch modules (``sdfast.backends``;
    ``backend_options`` go there). ``path`` may then also be a folder written by ``sdfast export``, which loads
    with no torch weights and in the dtype it was exported in; a checkpoint is exported on the fly, once.
    ``backend`` "triton" (sdfast's Triton kernels, CUDA graphs) or "compile" (``torch.compile``) converts the torch
    modules on ``device``. ``dtype`` None means fp32 for a checkpoint, fp16 for triton / compile on a GPU."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    device = _device(device)
    path = Path(path).expanduser() if path is not None else DEFAULT_MODEL
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a diffusers folder or a .safetensors / .ckpt file")
    chosen = backends.get(backend)
    if (path / "manifest.json").is_file():  # a folder written by `sdfast export`: graphs, no torch weights
        if chosen.IN_PLACE:
            raise ValueError(f"{path} is an ONNX export (no torch weights): load it with backend='onnxruntime' or "
                             f"'tensorrt', or load the original checkpoint for the {backend} backend")
        return Pipeline(**chosen.from_folder(path, device, dtype, **backend_options))
    dtype = dtype or chosen.default_dtype(device)
    build_on = device if chosen.IN_PLACE else torch.device("cpu")  # export backends export from a CPU copy
    if path.is_dir():
        if overrides:
            raise ValueError("overrides apply to single files; a diffusers folder's config.json files say it all")
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder "
                                  "(pass the folder that holds model_index.json, unet/, vae/, text_encoder/)")
        parts = load_diffusers(path, build_on, dtype)
        vocabulary = _vocabulary(path)
    else:
        parts = load_single_file(path, build_on, dtype, overrides)
        vocabulary = None
    pipe = Pipeline(parts.tokenizer, parts.text_encoder, parts.unet, parts.vae, parts.scheduler_config,
                    build_on, dtype, parts.text_encoder_2, parts.tokenizer_2, parts.xl_options, vocabulary)
    return chosen.prepare(pipe, device, **backend_options)


def _vocabulary(folder: Path) -> frozenset[str] | None:
    path = folder / "vocabulary.json"
    if not path.is_file():
        return None
    words = read_json(path).get("words")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise CheckpointError(f"{path}: 'words' must be a list of strings")
    return frozenset(words)


def _device(device) -> torch.device:
    """``device`` as a torch.device that exists here, or a ValueError saying what is available."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name: use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if not count:
            raise RequestError("device", str(device), f"this machine has no CUDA GPU (torch {torch.__version__}): "
                               "use 'cpu'")
        if (device.index or 0) >= count:
            raise RequestError("device", str(device), f"does not exist: this machine has {count} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda'")
    return device
