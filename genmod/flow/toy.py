"""2-D flow matching in seconds: toy targets, a small velocity MLP, a training loop and path measures.

The coupling and reflow tests and ``benchmarks/flow_couplings_2d.py`` train here, with the same
coupling math (``genmod.core.couplings``) and loss (``genmod.core.loss``) as the flow family's images.
The source is ``N(0, I)`` at t = 1, the target the data at t = 0 (docs/DESIGN.md §1).

* ``eight_gaussians``: 8 isotropic Gaussians (std 0.4) on a circle of radius 4, the
  standard OT-CFM benchmark (Tong et al. 2023, Fig. 1 / Table 2 use 8gaussians and moons).
* ``two_moons``: two interleaved half circles with Gaussian jitter (the usual "moons").
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from genmod.core.couplings import couple, brownian_bridge_sample, straightness
from genmod.core.loss import flow_matching_loss
from genmod.samplers import sample_ode


def eight_gaussians(num: int, generator: torch.Generator, radius: float = 4.0, std: float = 0.4) -> torch.Tensor:
    """``[num, 2]`` samples of 8 equal Gaussians (std ``std``) centred on a circle of ``radius``."""
    k = torch.randint(0, 8, (num,), generator=generator)
    angle = k.double() * (2 * math.pi / 8)
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return (centres + std * torch.randn(num, 2, generator=generator, dtype=torch.float64)).float()


def two_moons(num: int, generator: torch.Generator, noise: float = 0.1, scale: float = 2.0) -> torch.Tensor:
    """``[num, 2]`` samples of the two interleaved moons (upper arc centred at 0, lower at (1, 0.5)), scaled, centred."""
    upper = torch.rand(num, generator=generator, dtype=torch.float64) < 0.5
    angle = math.pi * torch.rand(num, generator=generator, dtype=torch.float64)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], dim=1) + noise * torch.randn(num, 2, generator=generator, dtype=torch.float64)
    return (scale * points).float()


TARGETS: dict[str, Callable] = {"8gaussians": eight_gaussians, "moons": two_moons}


class VelocityMLP(torch.nn.Module):
    """``v(x, t)``: an MLP on ``[x, t]`` (width 64, SELU, as torchcfm's 2-D examples use)."""

    def __init__(self, dim: int = 2, width: int = 64, depth: int = 3):
        super().__init__()
        layers, size = [], dim + 1
        for _ in range(depth):
            layers += [torch.nn.Linear(size, width), torch.nn.SELU()]
            size = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(size, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)], dim=1))


def train_toy_flow(sample_data: Callable, coupling: str = "independent", steps: int = 1000, batch_size: int = 256,
                   lr: float = 1e-3, seed: int = 0, sb_sigma: float = 0.2, reg: float = 0.05,
                   pairs: Optional[tuple[torch.Tensor, torch.Tensor]] = None, distill_steps: int = 0) -> VelocityMLP:
    """Fit a ``VelocityMLP`` by flow matching with ``coupling``, or on fixed ``pairs = (x0, noise)`` (reflow).

    ``sample_data(num, generator)`` draws data; with ``pairs`` the batches are drawn from the pairs instead,
    and ``distill_steps = K`` trains only at the K-step Euler times (as ``--distill_steps``).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = VelocityMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        if pairs is None:
            x0 = sample_data(batch_size, generator)
            noise = couple(x0, torch.randn(x0.shape, generator=generator), coupling, reg, sb_sigma, generator)
        else:
            idx = torch.randint(0, pairs[0].shape[0], (batch_size,), generator=generator)
            x0, noise = pairs[0][idx], pairs[1][idx]
        if distill_steps:
            t = 1.0 - torch.randint(0, distill_steps, (batch_size,), generator=generator).float() / distill_steps
        else:
            t = torch.rand(batch_size, generator=generator)
        if coupling == "sb":
            x_t, target = brownian_bridge_sample(x0, noise, t, sb_sigma, torch.randn(x0.shape, generator=generator))
            loss = (model(x_t, t) - target).pow(2).mean()
        else:
            x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
            loss = flow_matching_loss(model(x_t, t), x0, noise, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def trajectory(velocity_fn, noise: torch.Tensor, num_steps: int, method: str = "euler"):
    """``(x at t = 0, [states], grid)`` of a uniform ``num_steps`` solve from ``noise``."""
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    states = [noise]
    x = sample_ode(velocity_fn, noise, grid, method=method, callback=lambda i, t, x: states.append(x))
    return x, states, grid


def wasserstein2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Empirical W2 between two equal-size point clouds (exact assignment)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(a.double(), b.double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


@torch.no_grad()
def path_report(model, target_samples: torch.Tensor, noise: torch.Tensor, euler_steps=(1, 2, 4, 8),
                reference_steps: int = 100) -> dict:
    """Straightness of the learned flow, Euler error against its own fine solve, and W2 to the target.

    The reference is an RK4 solve of ``reference_steps`` steps (no adaptive solver needed: the field is smooth);
    ``euler_error[K]`` is ``E ||x_K - x_ref||`` and ``w2[K]`` the W2 of the K-step samples to ``target_samples``.
    """
    fn = lambda x, t: model(x, t)  # noqa: E731
    ref, states, grid = trajectory(fn, noise, reference_steps, method="rk4")
    report = {"straightness": straightness(states, grid), "w2_reference": wasserstein2(ref, target_samples),
              "euler_error": {}, "w2": {}}
    for k in euler_steps:
        x = trajectory(fn, noise, k)[0]
        report["euler_error"][k] = float((x - ref).norm(dim=1).mean())
        report["w2"][k] = wasserstein2(x, target_samples)
    return report
