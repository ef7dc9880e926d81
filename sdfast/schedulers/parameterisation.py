"""The model's output read as a clean-image estimate x0 (or as noise): epsilon or v parameterisation, in the three
coordinate systems the solvers work in. One formula per system, written as diffusers writes it so that results
agree bit for bit (v = sqrt(a) eps - sqrt(1-a) x0: Salimans & Ho 2022, sec. 4 and appendix D)."""

from __future__ import annotations

from torch import Tensor


def x0_at_alpha(prediction_type: str, out: Tensor, sample: Tensor, alpha_prod: Tensor) -> Tensor:
    """Variance-preserving x_t = sqrt(a) x0 + sqrt(1-a) eps at cumulative alpha ``alpha_prod`` (DDPM eq. 15)."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_prod) ** 0.5 * out) / alpha_prod**0.5
    return alpha_prod**0.5 * sample - (1 - alpha_prod) ** 0.5 * out


def eps_at_alpha(prediction_type: str, out: Tensor, sample: Tensor, alpha_prod: Tensor) -> Tensor:
    """The noise in the same variance-preserving coordinates."""
    if prediction_type == "epsilon":
        return out
    return alpha_prod**0.5 * out + (1 - alpha_prod) ** 0.5 * sample


def x0_at_sigma(prediction_type: str, out: Tensor, sample: Tensor, sigma: Tensor) -> Tensor:
    """Variance-exploding x = x0 + sigma eps (Karras et al. 2022), the Euler / Heun family's coordinates."""
    if prediction_type == "epsilon":
        return sample - sigma * out
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)


def x0_at_alpha_sigma(prediction_type: str, out: Tensor, sample: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """x_t = alpha_t x0 + sigma_t eps with alpha_t, sigma_t given (the DPM-Solver / UniPC family)."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * out) / alpha_t
    return alpha_t * sample - sigma_t * out
