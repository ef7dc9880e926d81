"""Noise schedulers for Stable Diffusion: tensor maths only, numerically equal to diffusers.

Scope: the nine samplers SD users expect (`SCHEDULERS`), configured from an SD folder's
`scheduler/scheduler_config.json` dict. The config supplies the model's noise schedule (betas, prediction
type, timestep spacing, offsets); the scheduler *name* fixes the method, so method keys in the config
(solver_order, algorithm_type, use_karras_sigmas, ...) are ignored. Unknown keys are ignored, missing keys
take SD 1.5's values.

Reference: diffusers 0.42.1, `diffusers/schedulers/scheduling_*.py` (the class named in each docstring,
default arguments unless stated). We match its timesteps, sigmas and every step's output, including its
float32 scalar arithmetic and where it upcasts the sample, so results agree bit for bit in our CPU tests
(float32 and float16).
One deliberate difference: "trailing" spacing keeps exactly n timesteps, where diffusers' float `arange`
yields an extra timestep -1 for some n (61, 103, ...).

Callers address model calls by *index* into `.timesteps` rather than by timestep value, so there is no
hidden step counter; the multistep methods (pndm, heun, dpmpp_2m, unipc) keep the history of the current
run, which `set_timesteps` and `start_at` clear.
"""

from __future__ import annotations

from .schedule import PREDICTION_TYPES, SD_SCHEDULE, SD_SCHEDULER_CONFIG, ScheduleConfig, Scheduler
from .solvers import (DDIM, LCM, PNDM, DPMSolver2M, DPMSolver2MKarras, Euler, EulerAncestral, Heun,
                      UniPC)

__all__ = ["PREDICTION_TYPES", "SCHEDULERS", "SD_SCHEDULE", "SD_SCHEDULER_CONFIG", "STOCHASTIC_SCHEDULERS",
           "ScheduleConfig", "Scheduler", "make_scheduler"]

SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIM,
    "pndm": PNDM,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "heun": Heun,
    "dpmpp_2m": DPMSolver2M,
    "dpmpp_2m_karras": DPMSolver2MKarras,
    "unipc": UniPC,
    "lcm": LCM,
}


# Schedulers that draw fresh noise at every step (from the generator they are given): their output depends on the
# whole run's draws, so a batch or an interpolation frame would not equal the same image made alone.
STOCHASTIC_SCHEDULERS = ("euler_a", "lcm")


def make_scheduler(name: str, config: dict) -> Scheduler:
    """The scheduler `name` configured from a scheduler_config.json dict."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](config)
