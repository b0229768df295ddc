"""Log-likelihoods of a flow model: the ODE from data (t = 0) to noise (t = 1) with the divergence.

Along a trajectory of ``dx/dt = v(x, t)`` the log-density obeys the instantaneous change of variables
``d log p_t(x_t) / dt = -div v(x_t, t)`` (Chen et al. 2018, "Neural ODEs", Thm. 1; Song et al. 2021,
Sec. D.2), so with ``p_1 = N(0, I)`` (the package convention, docs/DESIGN.md §1):

    log p_0(x_0) = log N(x_1; 0, I) + int_0^1 div v(x_t, t) dt,

integrated as one augmented ODE on ``[x_t, int div]`` by any solver of ``genmod.samplers`` (a fixed-step
stepper over an increasing grid, or an adaptive torchdiffeq pair). The divergence is

* ``exact``: the trace of the Jacobian by ``D`` autograd passes (small D: toy data, tests);
* ``hutchinson``: ``e^T (dv/dx) e`` with one probe ``e`` per sample held fixed over the trajectory
  (Hutchinson 1989; Grathwohl et al. 2019, "FFJORD", Sec. 3.1), Rademacher or Gaussian, one vector-Jacobian
  product per evaluation. ``E[e e^T] = I`` makes it unbiased for the trace, and since the trajectory does
  not depend on ``e``, the log-likelihood estimate is unbiased too (up to the solver's error).

Bits per dimension of 8-bit images (``image_bits_per_dim``): pixels ``k in {0..255}`` sit at the package's
data points ``k / 127.5 - 1``. Uniform dequantisation (Theis et al. 2016, Sec. 3.1; Ho et al. 2019 Sec. 3.1)
adds ``(u - 1/2) / 127.5``, ``u ~ U[0, 1)^D``, so each bin of width ``1/127.5`` is centred on its data
point. With ``z = k + u`` in bin units and ``x = z / 127.5 + c``, the density of z is
``q(z) = p(x) 127.5^-D`` and Jensen gives ``log P(k) >= E_u log q(k + u)``, hence

    bits/dim <= ( -E_u log p(x) + D log 127.5 ) / (D log 2).

Check: a density uniform over the union of the bins, ``(127.5 / 256)^D``, gives exactly 8 bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from genmod.samplers.adaptive import ADAPTIVE_METHODS, solve_adaptive
from genmod.samplers.ode import NFECounter, solve
from genmod.samplers.steppers import ODESolver

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
BIN_WIDTH_8BIT = 1 / 127.5   # one 8-bit level in the package's [-1, 1] data range


@dataclass
class LikelihoodResult:
    """``log_prob`` = ``prior_log_prob`` + ``divergence_integral`` per sample; ``noise`` is x at t = 1."""

    log_prob: torch.Tensor
    prior_log_prob: torch.Tensor
    divergence_integral: torch.Tensor
    noise: torch.Tensor
    nfe: int


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per sample (all dimensions after the first summed), ``[B]``."""
    flat = z.flatten(1)
    return -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def draw_probe(like: torch.Tensor, kind: str = "rademacher", generator: torch.Generator | None = None) -> torch.Tensor:
    """A Hutchinson probe shaped like ``like``: ``+-1`` with equal odds (Rademacher) or ``N(0, 1)``."""
    if kind not in PROBES:
        raise ValueError(f"probe: expected one of {', '.join(PROBES)}, got {kind!r}")
    device = generator.device if generator is not None else like.device
    e = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device)
    return (e.sign() if kind == "rademacher" else e).to(like.device)


def exact_divergence(velocity_fn, x: torch.Tensor, t: torch.Tensor):
    """``(v, tr dv/dx)`` at ``(x, t)``: one autograd pass per dimension (rows of the batch are independent)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity_fn(x, t)
        flat_v = v.flatten(1)
        div = torch.zeros(x.shape[0], dtype=v.dtype, device=x.device)
        for i in range(flat_v.shape[1]):
            (grad,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=i + 1 < flat_v.shape[1])
            div = div + grad.flatten(1)[:, i]
    return v.detach(), div.detach()


def hutchinson_divergence(velocity_fn, x: torch.Tensor, t: torch.Tensor, probe: torch.Tensor):
    """``(v, e^T (dv/dx) e)`` at ``(x, t)`` with probe ``e``: one vector-Jacobian product."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity_fn(x, t)
        (e_jacobian,) = torch.autograd.grad((v * probe).sum(), x)
    return v.detach(), (e_jacobian * probe).flatten(1).sum(1).detach()


def augmented_velocity(velocity_fn, shape, divergence: str, probe: torch.Tensor | None):
    """The velocity of the augmented state ``[x.flatten(1), int div]`` (``[B, D + 1]``)."""
    def field(state: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = state[:, :-1].reshape(shape)
        if divergence == "exact":
            v, div = exact_divergence(velocity_fn, x, t)
        else:
            v, div = hutchinson_divergence(velocity_fn, x, t, probe)
        return torch.cat([v.flatten(1).to(state.dtype), div[:, None].to(state.dtype)], dim=1)

    return field


def check_likelihood_args(divergence: str, probe: str, num_steps: int | None) -> None:
    """One-line errors naming the argument."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if probe not in PROBES:
        raise ValueError(f"probe: expected one of {', '.join(PROBES)}, got {probe!r}")
    if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")


def log_likelihood(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   method: str = "dopri5", num_steps: int = 100, time_grid=None, divergence: str = "exact",
                   probe: str = "rademacher", generator: torch.Generator | None = None, rtol: float = 1e-5,
                   atol: float = 1e-5, t_min: float = 0.0) -> LikelihoodResult:
    """``log p_0(x)`` per sample of ``x [B, ...]`` under the flow of ``velocity_fn`` with ``p_1 = N(0, I)``.

    ``method``: an adaptive torchdiffeq pair (``dopri5`` ...; ``rtol`` / ``atol``) or a fixed-step
    solver (``euler``, ``midpoint``, ``heun``, ``rk4``) over ``time_grid`` (increasing, from ``t_min`` to
    1; default ``num_steps`` uniform steps). ``divergence``: ``exact`` or ``hutchinson`` (``probe``
    ``rademacher`` / ``gaussian`` from ``generator``, one per sample, fixed along the path). ``t_min > 0``
    starts at a slightly noisy time where v(x, 0) is singular (VP path, x0-predicting nets).
    Not differentiable in the model's parameters (the solve runs on detached tensors).
    """
    check_likelihood_args(divergence, probe, num_steps if time_grid is None else None)
    if time_grid is None:
        time_grid = torch.linspace(t_min, 1.0, num_steps + 1, dtype=torch.float64)
    grid = torch.as_tensor(time_grid, dtype=torch.float64)
    if grid[0] >= grid[-1] or float(grid[-1]) != 1.0:
        raise ValueError(f"time_grid: a likelihood solve runs from data (t = 0) up to noise, ending at 1; got {grid.tolist()}")
    e = draw_probe(x, probe, generator) if divergence == "hutchinson" else None
    counter = NFECounter(augmented_velocity(velocity_fn, x.shape, divergence, e))
    dtype = torch.promote_types(x.dtype, torch.float32)
    state = torch.cat([x.detach().flatten(1).to(dtype), torch.zeros(x.shape[0], 1, dtype=dtype, device=x.device)], 1)
    with torch.no_grad():
        if method in ADAPTIVE_METHODS:
            end = solve_adaptive(counter, state, grid, method, rtol=rtol, atol=atol)
        else:
            end = solve(ODESolver(method), counter, state, grid)
    noise = end[:, :-1].reshape(x.shape)
    prior = standard_normal_log_prob(noise)
    integral = end[:, -1]
    return LikelihoodResult(prior + integral, prior, integral, noise, counter.nfe)


def dequantize(images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit images -> continuous points ``k / 127.5 - 1 + (u - 1/2) / 127.5``, ``u ~ U[0, 1)``, float32."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8 pixels, got {images_uint8.dtype}")
    device = generator.device if generator is not None else images_uint8.device
    u = torch.rand(images_uint8.shape, generator=generator, device=device).to(images_uint8.device)
    return (images_uint8.float() + u - 0.5) * BIN_WIDTH_8BIT - 1.0


def bits_per_dim(log_prob: torch.Tensor, num_dims: int, bin_width: float = BIN_WIDTH_8BIT) -> torch.Tensor:
    """``(-log p(x) - D log(bin_width)) / (D log 2)``: the discrete bits/dim bound of a dequantised density."""
    if num_dims < 1 or not bin_width > 0:
        raise ValueError(f"num_dims/bin_width: expected >= 1 and > 0, got {num_dims}, {bin_width}")
    return (-log_prob - num_dims * math.log(bin_width)) / (num_dims * math.log(2))


def image_bits_per_dim(velocity_fn, images_uint8: torch.Tensor, generator: torch.Generator | None = None,
                       **likelihood_kwargs) -> tuple[torch.Tensor, LikelihoodResult]:
    """Bits/dim per image of uint8 ``images [B, C, H, W]`` (dequantised with ``generator``) and the solve."""
    x = dequantize(images_uint8, generator)
    result = log_likelihood(velocity_fn, x, generator=generator, **likelihood_kwargs)
    return bits_per_dim(result.log_prob, x[0].numel()), result
