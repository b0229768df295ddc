"""Adaptive-step ODE solvers through torchdiffeq (Chen et al. 2018, ``torchdiffeq.odeint``).

An adaptive solver picks its own steps to keep the local error estimate under ``atol + rtol * |x|``
(Hairer, Norsett & Wanner, "Solving ODEs I", Sec. II.4), so the number of network evaluations (NFE) is
an output, not an input. Like the fixed-step solvers it only sees ``velocity_fn(x, t)`` (``t`` of shape
``[B]``) and integrates between the times of a grid; the embedded Runge-Kutta pairs are torchdiffeq's:

* ``dopri5``: Dormand-Prince 5(4), 6 NFE per accepted step (first-same-as-last), the usual default;
* ``dopri8``: Dormand-Prince 8(7); ``bosh3``: Bogacki-Shampine 3(2); ``fehlberg2``: Runge-Kutta-Fehlberg
  2(1); ``adaptive_heun``: Heun-Euler 2(1).

Rejected steps and torchdiffeq's initial step-size selection also call the velocity; all calls count.
The whole grid is one ``odeint`` call whose output times are the grid's times, so a grid of more than
two points costs the NFE of the step control, not one solve per interval.
"""

from __future__ import annotations

from typing import Callable

import torch

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
TORCHDIFFEQ_PIN = "torchdiffeq>=0.2.5,<0.3"


def require_torchdiffeq():
    """The torchdiffeq module, or an ImportError that says how to install it."""
    try:
        import torchdiffeq
    except ImportError:
        raise ImportError(f"adaptive solvers ({', '.join(ADAPTIVE_METHODS)}) need torchdiffeq: "
                          f"pip install '{TORCHDIFFEQ_PIN}' (a dependency of genmod; reinstall it)") from None
    return torchdiffeq


def check_tolerances(rtol: float, atol: float) -> None:
    """One-line errors for tolerances an adaptive solver cannot meet."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ValueError(f"{name}: expected a tolerance in (0, 1), got {value!r}")


def solve_adaptive(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_init: torch.Tensor,
                   time_grid, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                   callback=None) -> torch.Tensor:
    """Integrate ``dx/dt = velocity_fn(x, t)`` from ``time_grid[0]`` through every later grid time.

    ``callback(i, t_next, x_next)`` is called at each grid time after the first, as the fixed-step
    solvers do after each step. Returns x at ``time_grid[-1]``.
    """
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"method: expected one of {', '.join(ADAPTIVE_METHODS)}, got {method!r}")
    check_tolerances(rtol, atol)
    torchdiffeq = require_torchdiffeq()
    dtype = torch.promote_types(x_init.dtype, torch.float32)
    times = torch.as_tensor(time_grid, dtype=torch.float64).flatten()

    def func(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # torchdiffeq's f(t, y), t a 0-d tensor
        return velocity_fn(x, torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)).to(x.dtype)

    path = torchdiffeq.odeint(func, x_init, times.to(device=x_init.device, dtype=dtype), rtol=rtol, atol=atol,
                              method=method)
    if callback is not None:
        for i, t_next in enumerate(times[1:].tolist()):
            callback(i, t_next, path[i + 1])
    return path[-1]
