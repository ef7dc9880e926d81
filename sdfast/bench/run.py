"""``sdfast bench``: every configuration (backend x size x batch) timed the same way, beside diffusers' pipeline.

Each backend is loaded once; its load time (with any ONNX export or engine build) is its first-run cost. Then for
each size and batch: ``warmup`` untimed generations (the first one's wall time is reported too: it pays
compilation, autotuning and allocator growth for the shape), then ``repeat`` timed ones. Stage latencies come from
the Recorder (CUDA events on the GPU, no synchronisation inside the loop); end to end is the wall clock around the
whole call, prompt in, PIL images out, synchronised on both sides. A backend that cannot run here is reported as
skipped with the reason, a configuration that fails as failed with the reason: the run never stops halfway.
"""

from __future__ import annotations

import gc
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import read_json
from ..weight_files import WeightFile
from ..infer_config import infer_configs
from ..models import image_side
from ..schedulers import SCHEDULERS
from ..timing import Timings, latency_stats
from ..control import Control
from . import control
from .baseline import DiffusersBaseline
from .env import Peak, device_peak, environment, measure_matmul
from .flops import unet_flops
from .swap import measure_swap

BASELINE = "diffusers"
COMPILED_BASELINE = "diffusers-compile"  # diffusers' U-Net through torch.compile: the strongest PyTorch-native peer
SCHEMA_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Settings:
    """What one ``sdfast bench`` run measures. Every backend x size x batch is one configuration of
    ``warmup + repeat`` full generations, so the run's length is their product."""

    backends: tuple[str, ...] = ("torch",)
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) in pixels; empty: the model's own size
    batches: tuple[int, ...] = (1,)  # images per call
    steps: int = 30
    scheduler: str = "euler"
    dtype: str = "fp16"
    device: str = "cuda"
    warmup: int = 1  # untimed generations per configuration
    repeat: int = 3  # timed generations; step statistics pool steps x repeat samples
    baseline: bool = True  # diffusers' StableDiffusionPipeline on the same weights, in the same run
    compiled_baseline: bool = False  # also diffusers with its U-Net compiled (compile_mode, compiler): minutes more
    compile_mode: str | None = None  # torch.compile mode for the compile backend and the compiled baseline;
    # None: the compile backend's own default (max-autotune: 4-8 minutes for SD 1.5 on a first call)
    compiler: str = "inductor"  # torch.compile's backend; "eager" only traces (CPU smoke runs)
    peak: str = "datasheet"  # the fraction of peak against: "datasheet" (sdfast.bench.env.PEAKS), "measure" (a
    # large matmul in the run's dtype, timed at the start of the run), or a number in TFLOP/s measured earlier
    lora_rank: int = 0  # > 0: also time a random LoRA of this rank being applied, rescaled and removed (per backend)
    controlnet: bool = False  # every row (the baseline's too) with one ControlNet (sdfast.bench.control)
    prompt: str = "a photograph of an astronaut riding a horse"
    guidance_scale: float = 7.5
    seed: int = 0

    def check(self) -> None:
        """One clear error per mistake, before anything loads."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of fp32, fp16, bf16")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(sorted(SCHEDULERS))}")
        if self.steps < 1 or self.repeat < 1 or self.warmup < 0:
            raise ValueError(f"steps={self.steps}, repeat={self.repeat}, warmup={self.warmup}: need steps >= 1, "
                             "repeat >= 1 and warmup >= 0")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes {list(self.batches)}: need at least one, each >= 1")
        for w, h in self.sizes:
            if w <= 0 or h <= 0 or w % 8 or h % 8:
                raise ValueError(f"size {w}x{h} is not a positive multiple of 8")
        if not self.backends and not self.baseline and not self.compiled_baseline:
            raise ValueError("nothing to run: name at least one backend, or keep the baseline")
        if len(set(self.backends)) != len(self.backends) or {BASELINE, COMPILED_BASELINE} & set(self.backends):
            raise ValueError(f"backends {list(self.backends)}: name each once (the {BASELINE} baseline is added "
                             "by itself, --no-baseline leaves it out, --compiled-baseline adds "
                             f"{COMPILED_BASELINE})")
        for spec in self.backends:
            parse_backend(spec)
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank}: need 0 (no LoRA swap timing) or a rank >= 1")
        if self.peak not in ("datasheet", "measure") and not _positive_number(self.peak):
            raise ValueError(f"peak {self.peak!r}: use datasheet, measure, or a positive number of TFLOP/s")


def _positive_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value > 0


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _option(text: str):
    """A backend option's value as written on the command line: on / off / true / false, an integer, or text."""
    lowered = text.lower()
    if lowered in ("on", "true", "yes"):
        return True
    if lowered in ("off", "false", "no"):
        return False
    try:
        return int(text)
    except ValueError:
        return text


def parse_backend(spec: str) -> tuple[str, dict]:
    """``"triton:kernels=off:autotune=full"`` -> ``("triton", {"kernels": False, "autotune": "full"})``."""
    name, *options = spec.split(":")
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"backend {spec!r}: options are written NAME:OPTION=VALUE (e.g. triton:kernels=off), "
                             f"not {option!r}")
        parsed[key] = _option(value)
    return name, parsed


def native_size(model: Path) -> tuple[int, int]:
    """The image size a model was trained at, from its configs (no weights read): a diffusers folder's, an export
    folder's manifest, or what the single-file loader infers from the tensor shapes."""
    if (model / "manifest.json").is_file():
        configs = read_json(model / "manifest.json")["configs"]
        unet, levels = configs["unet"]["sample_size"], len(configs["vae"]["block_channels"])
    elif model.is_dir():
        unet = read_json(model / "unet" / "config.json").get("sample_size") or 64
        levels = len(read_json(model / "vae" / "config.json").get("block_out_channels", (0,) * 4))
    else:
        configs = infer_configs(WeightFile([model]).shapes())
        unet, levels = configs["unet"]["sample_size"], len(configs["vae"]["block_out_channels"])
    side = image_side(unet, levels)
    return side, side


class _Sdfast:
    """An sdfast pipeline on one backend, with the baseline's ``generate -> Timings`` signature."""

    def __init__(self, spec: str, model: Path, settings: Settings, sizes, controlnet: Path | None = None):
        import sdfast
        from sdfast.backends import control_options

        backend, options = parse_backend(spec)
        device = torch.device(settings.device)
        if backend == "tensorrt" and device.type != "cuda":  # before exporting anything
            raise ValueError(f"the tensorrt backend runs on a CUDA GPU; this run is on {device}")
        if backend == "tensorrt":  # engines for every configuration of the run
            options = {"sizes": [f"{w}x{h}" for w, h in sizes], "batch": [min(settings.batches),
                                                                          max(settings.batches)], **options}
        if backend == "compile":
            options = {"compiler": settings.compiler, **options}
            if settings.compile_mode is not None:
                options.setdefault("mode", settings.compile_mode)
        options = {**control_options(backend, controlnet is not None), **options}
        self.pipe = sdfast.load(model, device, settings.dtype, backend=backend, **options)
        self.unet_config = self.pipe.unet.config
        self.vae_scale_factor = self.pipe.vae_scale_factor
        self.scheduler = settings.scheduler
        if controlnet is not None:
            self.pipe.controlnets.load(controlnet, control.NAME)
        self.controlled = controlnet is not None

    def generate(self, prompt: str, **kwargs) -> Timings:
        if self.controlled:
            kwargs["controls"] = [Control(control.NAME, control.control_map(kwargs["width"], kwargs["height"]))]
        return self.pipe.generate(prompt, scheduler=self.scheduler, **kwargs).timings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _summary(values: list[float]) -> dict:
    return {**{k: round(v, 4) for k, v in latency_stats(values).items()}, "n": len(values)}


def _memory(device: torch.device) -> dict:
    """Peak memory of this configuration: torch's allocator peak and the whole device's use on a GPU (ONNX Runtime
    and TensorRT allocate outside torch); on a CPU, the process's resident high-water mark so far."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if device.type != "cuda":
        return {"torch_peak": None, "device_used": None, "process_peak_rss": round(rss_mb, 1)}
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_peak": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "device_used": round((total - free) / 2**20, 1), "process_peak_rss": round(rss_mb, 1)}


def _measure(runner, settings: Settings, width: int, height: int, batch: int, bar: tqdm) -> dict:
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    call = dict(width=width, height=height, steps=settings.steps, guidance_scale=settings.guidance_scale,
                seed=settings.seed, batch_size=batch)
    timings: list[Timings] = []
    wall: list[float] = []
    for i in range(settings.warmup + settings.repeat):
        _sync(device)
        start = time.perf_counter()
        t = runner.generate(settings.prompt, **call)
        _sync(device)
        ms = (time.perf_counter() - start) * 1e3
        if i == 0:
            first_call_ms = ms
        if i >= settings.warmup:
            timings.append(t)
            wall.append(ms)
        bar.update(1)
    guided = 2 if settings.guidance_scale > 1.0 else 1
    f = runner.vae_scale_factor  # pixels per latent cell
    flops = unet_flops(runner.unet_config, guided * batch, height // f, width // f)
    unet = _summary([ms for t in timings for ms in t.unet_ms])
    end_to_end = _summary(wall)
    return {
        "status": "ok",
        "reason": None,
        "first_call_ms": round(first_call_ms, 3),
        "latency_ms": {
            "text_encoder": _summary([t.text_encoder_ms for t in timings]),
            "unet": unet,
            "scheduler": _summary([ms for t in timings for ms in t.scheduler_ms]),
            "step": _summary([ms for t in timings for ms in t.step_ms]),
            "vae_decode": _summary([t.vae_decode_ms for t in timings]),
            "end_to_end": end_to_end,
        },
        "images_per_s": batch / (end_to_end["p50"] / 1e3),
        "memory_mb": _memory(device),
        "unet_flops": flops,
        "unet_tflops": flops / (unet["p50"] / 1e3) / 1e12,
    }


def _bench_backend(backend: str, model: Path, settings: Settings, sizes, bar: tqdm,
                   controlnet: Path | None = None) -> list[dict]:
    configs = [(w, h, b) for w, h in sizes for b in settings.batches]
    bar.set_postfix_str(f"{backend}: loading")
    start = time.perf_counter()
    try:
        if backend in (BASELINE, COMPILED_BASELINE):
            compiled = backend == COMPILED_BASELINE
            runner = DiffusersBaseline(model, torch.device(settings.device), DTYPES[settings.dtype],
                                       settings.scheduler, compile_mode=settings.compile_mode if compiled else None,
                                       compiler=settings.compiler if compiled else None, controlnet=controlnet)
        else:
            runner = _Sdfast(backend, model, settings, sizes, controlnet)
    except Exception as e:  # unknown, not installed, no GPU, cannot export or build: this backend is skipped
        bar.update(len(configs) * (settings.warmup + settings.repeat))
        return [{"backend": backend, "width": w, "height": h, "batch": b, "status": "skipped", "reason": _reason(e)}
                for w, h, b in configs]
    load_s = time.perf_counter() - start
    swap = None
    if settings.lora_rank and isinstance(runner, _Sdfast):
        try:
            swap = measure_swap(runner.pipe, settings.lora_rank)
        except Exception as e:  # e.g. a backend that runs exported graphs without LoRA support
            swap = {"rank": settings.lora_rank, "status": "failed", "reason": _reason(e)}
    rows = []
    for w, h, b in configs:
        bar.set_postfix_str(f"{backend} {w}x{h} batch {b}")
        row = {"backend": backend, "width": w, "height": h, "batch": b, "load_s": round(load_s, 3)}
        if swap is not None:
            row["lora_swap"] = swap
        try:
            row.update(_measure(runner, settings, w, h, b, bar))
        except Exception as e:  # e.g. out of memory, a shape outside an engine's profiles, NaN in fp16
            row.update(status="failed", reason=_reason(e))
        rows.append(row)
    del runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def add_speedups(rows: list[dict], peak: Peak | None) -> None:
    """Each row's speed-up over the baselines of the same size and batch (baseline time / row time, > 1 is faster):
    ``speedup`` over diffusers eager, ``speedup_compiled`` over diffusers compiled (when the run has it); and its
    U-Net throughput as a fraction of the device's peak."""

    def ok(name):
        return {(r["width"], r["height"], r["batch"]): r for r in rows if r["backend"] == name and r["status"] == "ok"}

    def ratios(base, r):
        return None if base is None else {
            key: base["latency_ms"][key]["p50"] / r["latency_ms"][key]["p50"] for key in ("step", "end_to_end")}

    eager, compiled = ok(BASELINE), ok(COMPILED_BASELINE)
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["width"], r["height"], r["batch"])
        r["fraction_of_peak"] = r["unet_tflops"] / peak.tflops if peak else None
        r["speedup"] = ratios(eager.get(key), r)
        r["speedup_compiled"] = ratios(compiled.get(key), r)


def _peak(settings: Settings, env: dict) -> Peak | None:
    dtype = DTYPES[settings.dtype]
    if settings.peak == "datasheet":
        return device_peak(env["gpu"], dtype)
    if settings.peak == "measure":
        if settings.device.startswith("cuda"):
            measured = measure_matmul(torch.device(settings.device), dtype)
            return Peak(env["gpu"], measured["tflops"], f"measured in this run: {measured['what']}")
        return None  # a CPU's matmul rate is no tensor-core peak
    return Peak(env["gpu"] or env["cpu"], float(settings.peak), f"measured earlier in this run ({settings.peak} "
                "TFLOP/s, given as --peak)")


def run(model: str | Path, settings: Settings, *, label: str | None = None, command: str | None = None,
        progress: bool = True, on_rows=None) -> dict:
    """Benchmark ``model`` (a diffusers folder, single file or export folder) as ``settings`` say; returns the
    report as a JSON-ready dict (the schema: ``sdfast.bench.report.SCHEMA``). ``on_rows(report)`` is called after
    each backend with the report so far (``"complete": false``), e.g. to save it."""
    settings.check()
    model = Path(model)
    if not model.exists():
        raise ValueError(f"model {model} does not exist: pass a diffusers folder or a .safetensors / .ckpt file")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device: use --device cpu")
    sizes = settings.sizes or (native_size(model),)
    env = environment(device)
    peak = _peak(settings, env)
    backends = (([BASELINE] if settings.baseline else []) + ([COMPILED_BASELINE] if settings.compiled_baseline
                                                               else []) + list(settings.backends))
    calls = len(backends) * len(sizes) * len(settings.batches) * (settings.warmup + settings.repeat)
    rows = []
    controlnet = control.random_controlnet(model, settings.seed) if settings.controlnet else None

    def report(complete: bool) -> dict:
        add_speedups(rows, peak)
        return {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": complete,
            "command": command,
            "model": {"path": str(model), "label": label or model.name},
            "settings": {**asdict(settings), "sizes": [f"{w}x{h}" for w, h in sizes]},
            "environment": env,
            "peak": None if peak is None else {"tflops": peak.tflops, "source": peak.source},
            "rows": rows,
        }

    with tqdm(total=calls, desc="bench", unit="generation", file=sys.stderr, disable=not progress) as bar:
        for backend in backends:
            rows += _bench_backend(backend, model, settings, sizes, bar, controlnet)
            if on_rows is not None and backend != backends[-1]:
                on_rows(report(complete=False))
    return report(complete=True)
