"""The nine solvers: how each one steps from the model's output at one timestep to the sample at the next.
Reference: diffusers 0.42.1, ``diffusers/schedulers/scheduling_*.py`` (the class named in each docstring)."""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

from .parameterisation import eps_at_alpha, x0_at_alpha, x0_at_alpha_sigma, x0_at_sigma
from .schedule import Scheduler, noise_like

class DDIM(Scheduler):
    """Deterministic DDIM, eta = 0 (Song et al. 2021, eq. 12). Reference: DDIMScheduler."""

    def step(self, model_output, index, sample, generator=None):
        t = int(self._cpu_timesteps[index])
        # diffusers steps back a fixed N // n whatever the spacing, so we do too.
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod, alpha_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        x0 = self._clip(x0_at_alpha(self.config.prediction_type, model_output, sample, alpha_prod))
        eps = eps_at_alpha(self.config.prediction_type, model_output, sample, alpha_prod)
        return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


class PNDM(Scheduler):
    """PLMS, the pseudo linear multistep method of Liu et al. 2022 (arXiv:2202.09778) without its Runge-Kutta
    warm-up (diffusers' skip_prk_steps=True, as SD ships). Reference: PNDMScheduler.

    The second timestep is listed twice: the first call takes an Euler-like step with eps_0, the second redoes
    it from the same start with the mean of eps_0 and eps_1 (a second-order start); later calls use
    Adams-Bashforth combinations of up to four past noise predictions. n steps make n + 1 model calls.
    """

    def _make_timesteps(self, n):
        t = super()._make_timesteps(n)
        return torch.cat([t[:2], t[1:]])

    def _reset(self):
        self._eps_history: list[Tensor] = []
        self._first_sample: Tensor | None = None
        self._calls = 0

    def step(self, model_output, index, sample, generator=None):
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        t = int(self._cpu_timesteps[index])
        prev_t = t - ratio
        if self._calls == 1:
            prev_t, t = t, t + ratio  # redo the first step, from the first timestep
        else:
            self._eps_history = self._eps_history[-3:] + [model_output]
        e = self._eps_history
        if self._calls == 0:
            eps, self._first_sample = model_output, sample
        elif self._calls == 1:
            eps, sample, self._first_sample = (model_output + e[-1]) / 2, self._first_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self._calls += 1
        return self._transfer(sample, t, prev_t, eps)

    def _transfer(self, sample: Tensor, t: int, prev_t: int, out: Tensor) -> Tensor:
        """The transfer part phi of Liu et al. 2022 from t to prev_t. For v-prediction diffusers converts the
        combined output with the sample it steps from, which we follow."""
        alpha_prod, alpha_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        eps = eps_at_alpha(self.config.prediction_type, out, sample, alpha_prod)
        denom = alpha_prod * (1 - alpha_prev) ** 0.5 + (alpha_prod * (1 - alpha_prod) * alpha_prev) ** 0.5
        return (alpha_prev / alpha_prod) ** 0.5 * sample - (alpha_prev - alpha_prod) * eps / denom


class LCM(Scheduler):
    """Multistep latent consistency sampling (Luo et al. 2023, arXiv:2310.04378).
    Reference: LCMScheduler (strength 1). Timesteps come from the distillation schedule of
    `original_inference_steps`, so timestep_spacing and steps_offset do not apply."""

    def _make_timesteps(self, n):
        c = self.config
        if c.original_inference_steps > c.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps={c.original_inference_steps} exceeds "
                f"num_train_timesteps={c.num_train_timesteps}"
            )
        if n > c.original_inference_steps:
            raise ValueError(
                f"num_inference_steps={n} must be at most original_inference_steps={c.original_inference_steps}"
            )
        k = c.num_train_timesteps // c.original_inference_steps
        origin = (np.arange(1, c.original_inference_steps + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return torch.from_numpy(origin[picks].copy())

    def step(self, model_output, index, sample, generator=None):
        t = self._cpu_timesteps[index]
        last = index == len(self._cpu_timesteps) - 1
        alpha_prod = self.alphas_cumprod[t]
        x0 = self._clip(x0_at_alpha(self.config.prediction_type, model_output, sample, alpha_prod))
        # Consistency boundary condition with sigma_data = 0.5 (Song et al. 2023, consistency models, sec. 3).
        scaled_t = t * self.config.timestep_scaling
        c_skip = 0.25 / (scaled_t**2 + 0.25)
        c_out = scaled_t / (scaled_t**2 + 0.25) ** 0.5
        denoised = c_out * x0 + c_skip * sample
        if last:
            return denoised
        alpha_prev = self._alpha_prev(int(self._cpu_timesteps[index + 1]))
        noise = noise_like(model_output, generator, denoised.dtype)
        return alpha_prev.sqrt() * denoised + (1 - alpha_prev).sqrt() * noise


class _SigmaScheduler(Scheduler):
    """Samplers in sigma space, x = x0 + sigma * eps with sigma = sqrt((1 - a) / a) (Karras et al. 2022):
    float timesteps, sigmas interpolated linearly in t, a final sigma of 0, inputs scaled by 1/sqrt(sigma^2+1).
    Reference: EulerDiscreteScheduler and its siblings."""

    def _make_timesteps(self, n):
        timesteps = self._spacing(n).astype(np.float32)  # not rounded: linspace gives fractional timesteps
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        max_sigma = self.sigmas.max()
        # With "leading" spacing the first timestep sits below the top of the schedule, and diffusers scales
        # the initial noise to the variance of the scaled input, sigma^2 + 1.
        leading = self.config.timestep_spacing == "leading"
        self.init_noise_sigma = float((max_sigma**2 + 1) ** 0.5 if leading else max_sigma)
        return torch.from_numpy(timesteps)

    def scale_model_input(self, sample, index):
        return sample / (self.sigmas[index] ** 2 + 1) ** 0.5

    def add_noise(self, original, noise, index):
        return original + noise * self.sigmas.to(original.dtype)[index]

    def _x0(self, out: Tensor, sample: Tensor, sigma: Tensor) -> Tensor:
        return x0_at_sigma(self.config.prediction_type, out, sample, sigma)


class Euler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 1 without its correction).
    Reference: EulerDiscreteScheduler; like it, works on a float32 copy of the sample."""

    def step(self, model_output, index, sample, generator=None):
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        sample = sample.to(torch.float32)
        derivative = (sample - self._x0(model_output, sample, sigma)) / sigma
        return (sample + derivative * (sigma_next - sigma)).to(model_output.dtype)


class EulerAncestral(_SigmaScheduler):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up
    (k-diffusion's sample_euler_ancestral / get_ancestral_step, eta = 1).
    Reference: EulerAncestralDiscreteScheduler."""

    def step(self, model_output, index, sample, generator=None):
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        sample = sample.to(torch.float32)
        x0 = self._x0(model_output, sample, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        # Drawn on the last step too (where sigma_up = 0), as diffusers does, to keep generator streams aligned.
        noise = noise_like(model_output, generator, model_output.dtype)
        return (prev + noise * sigma_up).to(model_output.dtype)


class Heun(_SigmaScheduler):
    """Heun's second-order method (Karras et al. 2022, algorithm 1, no churn). Reference: HeunDiscreteScheduler.

    Every timestep after the first is listed twice: the first call of a pair takes an Euler step and keeps its
    slope, the second evaluates the model at the Euler endpoint and redoes the step with the mean slope. The
    last timestep has a single (Euler) call, since its step ends at sigma 0.
    """

    order = 2

    def _make_timesteps(self, n):
        timesteps = super()._make_timesteps(n)
        s = self.sigmas
        self.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        return torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])

    def _reset(self):
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None  # (slope, dt, start sample) of an Euler step

    def step(self, model_output, index, sample, generator=None):
        if self._pending is None:
            sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
            x0 = self._clip(self._x0(model_output, sample, sigma))
            derivative, dt = (sample - x0) / sigma, sigma_next - sigma
            self._pending = (derivative, dt, sample)
            return sample + derivative * dt
        sigma_next = self.sigmas[index]
        x0 = self._clip(self._x0(model_output, sample, sigma_next))
        first_derivative, dt, start = self._pending
        self._pending = None
        derivative = (first_derivative + (sample - x0) / sigma_next) / 2
        return start + derivative * dt


class _MultistepScheduler(Scheduler):
    """Shared by the exponential-integrator solvers (DPM-Solver++, UniPC) in diffusers' VP form: alpha_t =
    1/sqrt(sigma^2+1), sigma_t = sigma * alpha_t, lambda = log(alpha_t / sigma_t). Timesteps lay n + 1 points
    and drop t = 0, sigmas end at 0, and the model output is turned into a predicted x0 first."""

    karras = False

    def _make_timesteps(self, n):
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        if self.karras:
            sigmas = _karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), n)
            timesteps = _sigma_to_t(sigmas, np.log(train_sigmas))
            if self.config.beta_schedule != "squaredcos_cap_v2":  # diffusers truncates instead for cosine
                timesteps = timesteps.round()
        else:
            timesteps = self._spacing(n, n + 1).round()
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        return torch.from_numpy(timesteps.astype(np.int64))

    def add_noise(self, original, noise, index):
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas.to(original.dtype)[index])
        return alpha_t * original + sigma_t * noise

    @staticmethod
    def _alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def _lambda(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """(alpha_t, sigma_t, lambda_t) at sigmas[index]; lambda is +inf at the final sigma 0."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
        return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)

    def _x0(self, out: Tensor, sample: Tensor, index: int) -> Tensor:
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
        return x0_at_alpha_sigma(self.config.prediction_type, out, sample, alpha_t, sigma_t)


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max to sigma_min evenly spaced in sigma^(1/rho), rho = 7 (Karras et al. 2022, eq. 5)."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas`, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train_sigmas[:, None]  # (train, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


class DPMSolver2M(_MultistepScheduler):
    """DPM-Solver++(2M), midpoint form, data prediction (Lu et al. 2022, arXiv:2211.01095, algorithm 2).
    Reference: DPMSolverMultistepScheduler defaults (solver_order 2, dpmsolver++, midpoint,
    lower_order_final); like it, works on a float32 copy of the sample.

    First order on the first step of a run (no history yet) and on the last (its target sigma is 0, so
    lambda = inf and the update reduces to returning x0).
    """

    def _reset(self):
        self._prev_x0: Tensor | None = None

    def step(self, model_output, index, sample, generator=None):
        x0 = self._x0(model_output, sample, index)
        prev_x0, self._prev_x0 = self._prev_x0, x0
        sample = sample.to(torch.float32)
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        _, sigma_s0, lambda_s0 = self._lambda(index)
        h = lambda_t - lambda_s0
        phi = alpha_t * (torch.exp(-h) - 1.0)
        if prev_x0 is None or index == len(self._cpu_timesteps) - 1:
            prev = (sigma_t / sigma_s0) * sample - phi * x0
        else:
            r0 = (lambda_s0 - self._lambda(index - 1)[2]) / h
            d1 = (1.0 / r0) * (x0 - prev_x0)
            prev = (sigma_t / sigma_s0) * sample - phi * x0 - 0.5 * phi * d1
        return prev.to(x0.dtype)


class DPMSolver2MKarras(DPMSolver2M):
    """DPM-Solver++(2M) on Karras sigmas (diffusers' use_karras_sigmas=True): timesteps are the rounded
    training timesteps nearest each sigma, so timestep_spacing and steps_offset do not apply."""

    karras = True


class UniPC(_MultistepScheduler):
    """UniPC, order 2, B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, arXiv:2302.04867,
    algorithms 1-2). Reference: UniPCMultistepScheduler defaults.

    Each call first corrects the sample the previous call predicted (UniC, using this call's model output
    and the order the previous predictor used), then predicts the next one (UniP). Orders warm up from 1 and
    drop back to 1 for the last step (lower_order_final).
    """

    def _reset(self):
        self._x0s: list[Tensor] = []  # converted outputs of the last two calls, oldest first
        self._last_sample: Tensor | None = None  # the predictor's input of the previous call
        self._last_order = 0

    def step(self, model_output, index, sample, generator=None):
        x0 = self._x0(model_output, sample, index)
        if index > 0 and self._last_sample is not None:
            sample = self._correct(x0, index)
        self._x0s = self._x0s[-1:] + [x0]
        order = min(2, len(self._cpu_timesteps) - index, len(self._x0s))
        self._last_sample, self._last_order = sample, order
        return self._predict(sample, index, order)

    def _coefficients(self, target: int, source: int) -> tuple[Tensor, ...]:
        """For a step from sigmas[source] to sigmas[target]: alpha_t, sigma_t / sigma_s, h = lambda_t - lambda_s,
        B(h) = expm1(-h) (which is also h * phi_1 in the data-prediction form) and lambda_s."""
        alpha_t, sigma_t, lambda_t = self._lambda(target)
        _, sigma_s, lambda_s = self._lambda(source)
        h = lambda_t - lambda_s
        return alpha_t, sigma_t / sigma_s, h, torch.expm1(-h), lambda_s

    def _predict(self, x: Tensor, index: int, order: int) -> Tensor:
        alpha_t, ratio, h, b_h, lambda_s0 = self._coefficients(index + 1, index)
        m0 = self._x0s[-1]
        x_t = ratio * x - alpha_t * b_h * m0
        if order == 2:
            # The order-2 predictor's single weight is fixed at 1/2, as in the authors' code and diffusers.
            rk = (self._lambda(index - 1)[2] - lambda_s0) / h
            d1 = (self._x0s[-2] - m0) / rk
            x_t = x_t - alpha_t * b_h * (0.5 * d1)
        return x_t.to(x.dtype)

    def _correct(self, model_t: Tensor, index: int) -> Tensor:
        x, order = self._last_sample, self._last_order
        alpha_t, ratio, h, b_h, lambda_s0 = self._coefficients(index, index - 1)
        m0 = self._x0s[-1]
        x_t = ratio * x - alpha_t * b_h * m0
        d1_t = model_t - m0
        if order == 1:
            return (x_t - alpha_t * b_h * (0.5 * d1_t)).to(x.dtype)
        # Order 2: the weights solve R rho = b (UniC, Zhao et al. 2023, sec. 3.1): R's rows are the powers 0 and 1
        # of r = (rk, 1), b_k = k! (-h) phi_{k+1}(-h) / B(h), phi_{k+1} from the recursion phi_k(z) =
        # (phi_{k-1}(z) - 1/(k-1)!) / z. torch.linalg.solve on the same float32 inputs keeps us bit-equal.
        rk = (self._lambda(index - 2)[2] - lambda_s0) / h
        d1 = (self._x0s[-2] - m0) / rk
        hh = -h
        b1 = (b_h / hh - 1) / b_h
        b2 = ((b_h / hh - 1) / hh - 0.5) * 2 / b_h
        rks = torch.stack([rk, torch.ones(())])
        rhos = torch.linalg.solve(torch.stack([rks**0, rks**1]), torch.stack([b1, b2])).to(x.dtype)
        return (x_t - alpha_t * b_h * (rhos[0] * d1 + rhos[-1] * d1_t)).to(x.dtype)
