"""Training-time samplers for t in [0, 1] (t = 0 data, t = 1 noise; docs/DESIGN.md §1).

All draw from a passed ``torch.Generator`` (the trainer seeds it from seed, step and rank, so a
resumed run redraws the same t) and return shape ``[B]`` or any shape such as ``[B, T]`` for per-token
noise levels (Diffusion Forcing, LatentLM).

* uniform: ``t ~ U[t_min, t_max]``.
* logit-normal: ``t = sigmoid(m + s n)``, ``n ~ N(0, 1)`` (Esser et al. 2024, SD3, Sec. 3.1, eq. 19).
* shifted: ``t' = s t / (1 + (s - 1) t)`` (SD3 Sec. 5.3.2 resolution-dependent shift; s > 1 moves
  mass towards noise), applied to a uniform or logit-normal draw.
* discrete: DDPM's integer step ``n ~ U{0..N-1}`` at its knot ``t = (n + 1) / N`` (Ho et al. 2020, Alg. 1;
  the draw of LatentLM's and CausalFusion's training code), so that ``DiscreteSchedulePath.network_timestep``
  feeds the network exactly ``n``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def _shape(shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or any((not isinstance(n, int)) or n < 1 for n in shape):
        raise ValueError(f"shape: expected a positive int or a tuple of positive ints such as (B,) or (B, T), got {shape!r}")
    return shape


def _draw(kind: str, shape, generator: torch.Generator | None, device, dtype):
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.rand if kind == "rand" else torch.randn
    return draw(_shape(shape), generator=generator, device=gen_device, dtype=dtype).to(device or gen_device)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift ``t' = s t / (1 + (s - 1) t)`` (fixes 0 and 1; s = 1 is the identity)."""
    if shift <= 0:
        raise ValueError(f"shift: must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_num_tokens: int = 256) -> float:
    """SD3's shift for a resolution with ``num_tokens`` latent tokens relative to the training one: ``sqrt(m / n)``."""
    if num_tokens < 1 or base_num_tokens < 1:
        raise ValueError(f"num_tokens/base_num_tokens: must be >= 1, got {num_tokens}, {base_num_tokens}")
    return math.sqrt(num_tokens / base_num_tokens)


def sample_uniform_t(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                     t_min: float = 0.0, t_max: float = 1.0) -> torch.Tensor:
    """``t ~ U[t_min, t_max]``."""
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"t_min/t_max: need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    return t_min + (t_max - t_min) * _draw("rand", shape, generator, device, dtype)


def sample_logit_normal_t(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                          mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``t = sigmoid(mean + std * n)`` with ``n ~ N(0, 1)`` (SD3 eq. 19; SD3 uses mean 0, std 1)."""
    if std <= 0:
        raise ValueError(f"std: must be > 0, got {std}")
    return torch.sigmoid(mean + std * _draw("randn", shape, generator, device, dtype))


def sample_shifted_t(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                     shift: float = 3.0, base: str = "uniform", **base_kwargs) -> torch.Tensor:
    """A uniform (or ``base="logit_normal"``) draw pushed through ``shift_time``."""
    if base not in ("uniform", "logit_normal"):
        raise ValueError(f"base: expected 'uniform' or 'logit_normal', got {base!r}")
    sampler = sample_uniform_t if base == "uniform" else sample_logit_normal_t
    return shift_time(sampler(shape, generator, device, dtype, **base_kwargs), shift)


def sample_discrete_t(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                      num_steps: int = 1000) -> torch.Tensor:
    """DDPM's ``n ~ U{0..N-1}`` as package time ``t = (n + 1) / N`` (the knots of ``DiscreteSchedulePath``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    n = torch.randint(0, num_steps, _shape(shape), generator=generator, device=gen_device)
    return ((n + 1).to(torch.float64) / num_steps).to(device or gen_device, dtype)


TIME_SAMPLERS: dict[str, Callable] = {
    "uniform": sample_uniform_t,
    "logit_normal": sample_logit_normal_t,
    "shifted": sample_shifted_t,
    "discrete": sample_discrete_t,
}


def get_time_sampler(name: str, **kwargs) -> Callable:
    """``fn(shape, generator, device=None, dtype=float32) -> t`` with the sampler's options bound."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"time sampler: expected one of {', '.join(TIME_SAMPLERS)}, got {name!r}")
    sampler = TIME_SAMPLERS[name]

    def draw(shape, generator=None, device=None, dtype=torch.float32):
        return sampler(shape, generator, device, dtype, **kwargs)

    draw.__name__ = f"{name}_time_sampler"
    return draw
