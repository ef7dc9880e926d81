"""The noise schedule every solver shares: the config (betas, prediction type, timestep spacing), the training
schedule's cumulative alphas, the timesteps of an n-step run and the window of model calls a run makes (img2img,
a hand-off), and the ``Scheduler`` interface the sampler calls."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# Config switches that change the maths and that sdfast does not implement; rejected rather than ignored.
UNSUPPORTED_SWITCHES = ("thresholding", "rescale_betas_zero_snr")


@dataclass(frozen=True)
class ScheduleConfig:
    """The scheduler_config.json keys sdfast reads. Defaults are SD 1.5's config (a PNDMScheduler one)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None  # overrides the three keys above when given
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # ddim/pndm/lcm: alpha_cumprod after the last step is 1, else alpha_cumprod[0]
    clip_sample: bool = False  # ddim/heun/lcm clamp the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0
    original_inference_steps: int = 50  # lcm: the schedule the model was distilled on
    timestep_scaling: float = 10.0  # lcm: scales t in the consistency boundary condition

    @classmethod
    def from_dict(cls, config: dict) -> ScheduleConfig:
        for key in UNSUPPORTED_SWITCHES:
            if config.get(key):
                raise ValueError(f"scheduler config {key}={config[key]!r} is not supported by sdfast")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(values["trained_betas"])
        return cls(**values)

    def __post_init__(self):
        for key, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not supported; expected one of {allowed}")


# The noise schedule of every SD 1.x / 2.x / XL release, as scheduler_config.json keys (ScheduleConfig's defaults):
# LDM's linear_start / linear_end over its training steps ("linear" there is linear in sqrt(beta), diffusers'
# scaled_linear), with the releases' timestep spacing and offset.
SD_SCHEDULE = {name: getattr(ScheduleConfig, name) for name in
               ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "timestep_spacing", "steps_offset")}
# The scheduler_config.json the SD 1.5 / 2.1 releases ship (2.1 adds prediction_type "v_prediction"): that schedule
# under diffusers' PNDMScheduler, with the switches diffusers' PNDM and DDIM read. SDXL ships the same schedule with
# EulerDiscreteScheduler.
SD_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", **SD_SCHEDULE, "set_alpha_to_one": False,
                       "skip_prk_steps": True, "clip_sample": False}


def _cosine_betas(n: int) -> Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), each capped at 0.999."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _betas(c: ScheduleConfig) -> Tensor:
    if c.trained_betas is not None:
        return torch.tensor(c.trained_betas, dtype=torch.float32)
    if c.beta_schedule == "linear":
        return torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
    if c.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta), as the original LDM/SD training code.
        return torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float32) ** 2
    return _cosine_betas(c.num_train_timesteps)


def noise_like(like: Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """Noise shaped like `like`, drawn on the generator's device then moved, as diffusers' randn_tensor does,
    so one seeded generator yields the same numbers here and there."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, dtype=dtype, device=device)
    if noise.device == like.device:
        return noise
    if like.device.type == "cuda":  # pinned host memory: the copy does not block the host on the GPU's queue
        return noise.pin_memory().to(like.device, non_blocking=True)
    return noise.to(like.device)


class Scheduler:
    """Shared base: the training noise schedule (betas -> alphas_cumprod), timestep spacing, the API.

    `alphas_cumprod` is float32 as in diffusers; per-step coefficients are 0-dim float32 tensors, which
    multiply a sample without changing its dtype.
    """

    order = 1  # model evaluations per step (diffusers' .order)

    def __init__(self, config: dict):
        self.config = ScheduleConfig.from_dict(config)
        self.alphas_cumprod = torch.cumprod(1.0 - _betas(self.config), dim=0)
        # ddim/pndm/lcm: the alpha_cumprod one step past t=0 (diffusers' final_alpha_cumprod)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = 0
        self.timesteps = torch.empty(0)
        self._cpu_timesteps = self.timesteps  # same values kept on the CPU: indexing them never syncs a GPU

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device = "cpu") -> None:
        n_train = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be between 1 and {n_train}")
        self._cpu_timesteps = self._make_timesteps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = self._cpu_timesteps.to(device)
        self._reset()

    def start_at(self, index: int) -> None:
        """Start a run at `.timesteps[index]` (img2img, a hand-off): clears the history of any previous run."""
        if not 0 <= index < len(self.timesteps):
            raise ValueError(f"begin index {index} is outside the {len(self.timesteps)} timesteps set")
        self._reset()

    def window(self, steps: int, device: str | torch.device = "cpu", *, strength: float | None = None,
               denoising_start: float | None = None, denoising_end: float | None = None) -> tuple[int, int | None]:
        """Set `steps` timesteps and return the (start, end) indices of the model calls a run makes, end None for
        all: img2img's last `strength` of the schedule (diffusers' get_timesteps), or a hand-off between two models
        (diffusers' SDXL denoising_start / denoising_end, as fractions of the training schedule: the first model
        stops after the timesteps at or above the cutoff, the second starts below it, a second-order scheduler one
        call earlier so that it starts on a pair)."""
        self.set_timesteps(steps, device)
        n_train = self.config.num_train_timesteps
        start = 0
        if strength is not None:
            start = (steps - min(int(steps * strength), steps)) * self.order
            if start >= len(self._cpu_timesteps):
                raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step; raise strength "
                                 "or steps")
        elif denoising_start is not None:
            count = int((self._cpu_timesteps < round(n_train * (1.0 - denoising_start))).sum())
            if self.order == 2 and count % 2 == 0:
                count += 1
            start = len(self._cpu_timesteps) - count
        if start >= len(self._cpu_timesteps):
            raise ValueError(f"denoising_start={denoising_start} with steps={steps} leaves no denoising step: lower "
                             "it or raise steps")
        end = None
        if denoising_end is not None:
            end = int((self._cpu_timesteps >= round(n_train * (1.0 - denoising_end))).sum())
            if end <= start:
                raise ValueError(f"denoising_end={denoising_end} with steps={steps} leaves no denoising step: raise "
                                 "it or steps")
        if start:
            self.start_at(start)
        return start, end

    def scale_model_input(self, sample: Tensor, index: int) -> Tensor:
        return sample

    def step(
        self, model_output: Tensor, index: int, sample: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """The sample after model call `index`; `model_output` is the raw U-Net output (epsilon or v)."""
        raise NotImplementedError

    def add_noise(self, original: Tensor, noise: Tensor, index: int) -> Tensor:
        """Forward process q(x_t | x_0) at timesteps[index] (Ho et al. 2020, eq. 4)."""
        alpha_prod = self.alphas_cumprod.to(original.dtype)[self._cpu_timesteps[index]]
        return alpha_prod**0.5 * original + (1 - alpha_prod) ** 0.5 * noise

    # -- helpers for subclasses --

    def _make_timesteps(self, n: int) -> Tensor:
        """The timesteps of an n-step run, one per model call; sigma-based schedulers also set `sigmas` here."""
        return torch.from_numpy(self._spacing(n).round().astype(np.int64))

    def _reset(self) -> None:
        """Clear per-run state; stateless schedulers have none."""

    def _spacing(self, n: int, points: int | None = None) -> np.ndarray:
        """n descending float64 timesteps (Lin et al. 2023, table 2). linspace/leading lay `points` (default n)
        points over the training range and keep the n highest; diffusers' multistep solvers use n + 1."""
        c, m = self.config, points or n
        n_train = c.num_train_timesteps
        if c.timestep_spacing == "linspace":
            return np.linspace(0, n_train - 1, m)[::-1][:n]
        if c.timestep_spacing == "leading":
            return (np.arange(m) * (n_train // m)).round()[::-1][:n] + c.steps_offset
        return (np.round(np.arange(n_train, 0, -n_train / n)) - 1)[:n]

    def _alpha_prev(self, t: int) -> Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _clip(self, x0: Tensor) -> Tensor:
        r = self.config.clip_sample_range
        return x0.clamp(-r, r) if self.config.clip_sample else x0
