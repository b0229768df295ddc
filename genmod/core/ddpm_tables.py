"""DDPM noise-level tables ``alpha_bar[n]`` (linear, cosine, sigmoid beta schedules) as float64 tensors.

``genmod.core.paths.DiscreteSchedulePath`` reads one of them as a continuous VP path.
"""

import math

import torch


def ddpm_alphas_cumprod(schedule: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02, cosine_s: float = 0.008, start: float = -3.0, end: float = 3.0,
                        tau: float = 1.0) -> torch.Tensor:
    """``prod_{i<=n} (1 - beta_i)`` for n = 0..N-1 (float64).

    ``linear``: betas evenly spaced in [beta_start, beta_end] (Ho et al. 2020, Sec. 4).
    ``cosine``: ``alpha_bar(n) = f(n)/f(0)``, ``f(n) = cos(((n/N) + s)/(1 + s) * pi/2)^2``, betas clipped
    at 0.999 (Nichol & Dhariwal 2021, eq. 17). ``sigmoid``: ``f(u) = sigmoid(end / tau) - sigmoid((start + u (end -
    start)) / tau)`` in place of the cosine's f, u = n/N, same clipping (Jabri et al. 2022, Fig. 8; DF v1.5 video).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    elif schedule == "cosine":
        n = torch.arange(num_steps + 1, dtype=torch.float64)
        f = torch.cos(((n / num_steps) + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    elif schedule == "sigmoid":
        u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64)) - torch.sigmoid((start + u * (end - start)) / tau)
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"schedule: expected 'linear', 'cosine' or 'sigmoid', got {schedule!r}")
    return torch.cumprod(1 - betas, dim=0)
