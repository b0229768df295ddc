"""DDIM steps with stochasticity eta on any affine path (Song et al. 2021, eq. 12 and eq. 16).

From ``x_t = alpha_t x0 + sigma_t eps`` to ``t_next < t``, DDIM keeps the marginal
``x_next ~ N(alpha_next x0, sigma_next^2)`` and chooses how much of ``sigma_next`` is fresh noise::

    x_next = alpha_next x0_hat + sqrt(sigma_next^2 - s^2) eps_hat + s z,
    s = eta * (sigma_next / sigma_t) * sqrt(sigma_t^2 - (alpha_t / alpha_next)^2 sigma_next^2).

The square root is the std of the forward step ``x_t | x_next`` (``sigma_{t|next}``), so ``eta = 0`` is the
deterministic DDIM / ODE step and ``eta = 1`` draws from the DDPM posterior ``q(x_next | x_t, x0_hat)``, whose
variance ``sigma_{t|next}^2 sigma_next^2 / sigma_t^2`` is, on a variance-preserving path, Ho et al.'s
``(1 - abar_next) / (1 - abar_t) * (1 - abar_t / abar_next)`` (the reference code's formula with
``abar = alpha^2``).
"""

from __future__ import annotations

import torch

from genmod.core.paths import AffinePath


def ddim_noise_std(path: AffinePath, t, t_next, eta: float) -> torch.Tensor:
    """``s`` of the module doc (0 where ``t_next = 0`` or ``eta = 0``); ``t``/``t_next`` tensors or floats."""
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    t, t_next = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(t_next, dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    a_next, s_next = path.alpha(t_next), path.sigma(t_next)
    forward_var = (s**2 - (a / a_next) ** 2 * s_next**2).clamp(min=0.0)
    return eta * s_next / s.clamp(min=1e-12) * forward_var.sqrt()


def ddim_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, path: AffinePath, t, t_next, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step (module doc) for scalar ``t``/``t_next``; ``noise`` (standard normal, shape of ``x0_hat``)
    is required when ``eta > 0`` (the caller owns the randomness)."""
    t_next_64 = torch.as_tensor(t_next, dtype=torch.float64)
    a_next, s_next = path.alpha(t_next_64), path.sigma(t_next_64)
    if eta == 0:
        return a_next.to(x0_hat.dtype) * x0_hat + s_next.to(x0_hat.dtype) * eps_hat
    if noise is None:
        raise ValueError("noise: ddim_step needs a standard-normal draw when eta > 0")
    std = ddim_noise_std(path, t, t_next_64, eta)
    direction = (s_next**2 - std**2).clamp(min=0.0).sqrt()
    dtype = x0_hat.dtype
    return a_next.to(dtype) * x0_hat + direction.to(dtype) * eps_hat + std.to(dtype) * noise
