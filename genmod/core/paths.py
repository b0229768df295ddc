"""Affine Gaussian probability paths in the package convention (docs/DESIGN.md §1).

``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``t = 0`` data and ``t = 1`` noise. The velocity
(the flow-matching target) is ``d x_t / dt = alpha'(t) x0 + sigma'(t) eps`` (Lipman et al. 2023,
eq. 20; Liu et al. 2023 "rectified flow" for the linear path).

Given ``x_t`` and ``t``, the pair ``(x0, eps)`` and the velocity determine each other through the
2x2 system ``[alpha sigma; alpha' sigma'] [x0; eps] = [x_t; v]``, so prediction types convert exactly
(``AffinePath.convert``). ``t`` may be a scalar, ``[B]`` or any shape that broadcasts against the data
from the left (``[B, T]`` per-token levels for Diffusion Forcing / LatentLM).

Log-SNR helpers (``lambda(t) = log(alpha / sigma)``, half the log-SNR) serve DPM-Solver++ (Lu et al.
2022, Sec. 3) and min-SNR weighting (Hang et al. 2023). ``DiscreteSchedulePath`` puts DDPM's 1000-step
beta schedules (Ho et al. 2020 linear, Nichol & Dhariwal 2021 cosine) on the same continuous t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from genmod.core.ddpm_tables import ddpm_alphas_cumprod  # noqa: F401  (re-exported: genmod.core.paths.ddpm_alphas_cumprod)

PREDICTION_TYPES = ("velocity", "x0", "epsilon", "score")


@dataclass
class PathSample:
    """A point on the path: ``x_t``, its time ``t`` and the velocity target ``alpha' x0 + sigma' eps``."""

    x_t: torch.Tensor
    t: torch.Tensor
    velocity_target: torch.Tensor


def broadcast_like(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Right-pad ``coef`` (a scalar, or shape a prefix of ``x.shape`` such as ``[B]`` or ``[B, T]``) with singleton dims."""
    coef = torch.as_tensor(coef, device=x.device)
    if coef.ndim == 0:
        return coef.to(x.dtype)
    if coef.ndim > x.ndim or any(c not in (1, n) for c, n in zip(coef.shape, x.shape)):
        raise ValueError(f"t: shape {tuple(coef.shape)} does not broadcast from the left against data of shape {tuple(x.shape)}")
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim)).to(x.dtype)


def _as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if torch.is_tensor(t):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


def _check_prediction(name: str, value: str):
    if value not in PREDICTION_TYPES:
        raise ValueError(f"{name}: expected one of {', '.join(PREDICTION_TYPES)}, got {value!r}")


class AffinePath:
    """General affine path from user callables ``alpha(t)``, ``sigma(t)`` (tensors in, tensors out).

    Derivatives are taken from ``d_alpha`` / ``d_sigma`` when given, else by autograd through the
    callables. Subclasses override the four functions with closed forms.
    """

    name = "affine"

    def __init__(
        self,
        alpha: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
        d_alpha: Callable[[torch.Tensor], torch.Tensor] | None = None,
        d_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if type(self) is AffinePath and (alpha is None or sigma is None):
            raise ValueError("AffinePath: pass both alpha and sigma callables (or use LinearPath/VPPath/CosinePath)")
        self._alpha_fn, self._sigma_fn = alpha, sigma
        self._d_alpha_fn, self._d_sigma_fn = d_alpha, d_sigma

    # -- schedule functions ------------------------------------------------------------------
    def alpha(self, t):
        return self._alpha_fn(_as_time(t))

    def sigma(self, t):
        return self._sigma_fn(_as_time(t))

    def d_alpha(self, t):
        if self._d_alpha_fn is not None:
            return self._d_alpha_fn(_as_time(t))
        return self._autograd_derivative(self._alpha_fn, _as_time(t))

    def d_sigma(self, t):
        if self._d_sigma_fn is not None:
            return self._d_sigma_fn(_as_time(t))
        return self._autograd_derivative(self._sigma_fn, _as_time(t))

    def network_timestep(self, t):
        """What a network's timestep embedder sees at time ``t``: ``1000 t`` (DESIGN.md §1).

        ``DiscreteSchedulePath`` overrides it with the DDPM step index, as the official DDPM code feeds it.
        Families call this at the network edge instead of writing ``1000 * t``.
        """
        return 1000 * t

    @staticmethod
    def _autograd_derivative(fn, t):
        with torch.enable_grad():
            t_req = t.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(t_req).sum(), t_req)
        return grad.detach()

    # -- forward process ---------------------------------------------------------------------
    def sample(self, x0: torch.Tensor, noise: torch.Tensor, t) -> PathSample:
        """``x_t = alpha x0 + sigma eps`` and the velocity target ``alpha' x0 + sigma' eps``."""
        if x0.shape != noise.shape:
            raise ValueError(f"noise: shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        t = _as_time(t, x0)
        a, s = broadcast_like(self.alpha(t), x0), broadcast_like(self.sigma(t), x0)
        da, ds = broadcast_like(self.d_alpha(t), x0), broadcast_like(self.d_sigma(t), x0)
        return PathSample(x_t=a * x0 + s * noise, t=t, velocity_target=da * x0 + ds * noise)

    def coefficients(self, t, like: torch.Tensor):
        """``(alpha, sigma, alpha', sigma')`` at ``t``, broadcast against ``like``."""
        t = _as_time(t, like)
        return tuple(broadcast_like(f(t), like) for f in (self.alpha, self.sigma, self.d_alpha, self.d_sigma))

    # -- prediction types --------------------------------------------------------------------
    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str = "velocity", dst: str = "x0") -> torch.Tensor:
        """Exactly convert a prediction of type ``src`` to ``dst`` given ``(x_t, t)``.

        Types: ``velocity`` (alpha' x0 + sigma' eps), ``x0``, ``epsilon``, ``score`` (= -eps / sigma).
        Solves the 2x2 system ``[alpha sigma; alpha' sigma'] [x0; eps] = [x_t; v]``.
        """
        _check_prediction("src", src)
        _check_prediction("dst", dst)
        if src == dst:
            return pred
        a, s, da, ds = self.coefficients(t, x_t)
        if src == "score":
            pred, src = -s * pred, "epsilon"
        if src == "x0":
            x0 = pred
            eps = (x_t - a * x0) / s
        elif src == "epsilon":
            eps = pred
            x0 = (x_t - s * eps) / a
        else:  # velocity: Cramer's rule on the 2x2 system
            det = a * ds - s * da
            x0 = (ds * x_t - s * pred) / det
            eps = (a * pred - da * x_t) / det
        if dst == "x0":
            return x0
        if dst == "epsilon":
            return eps
        if dst == "score":
            return -eps / s
        return da * x0 + ds * eps

    # -- signal-to-noise ---------------------------------------------------------------------
    def snr(self, t) -> torch.Tensor:
        """``alpha(t)^2 / sigma(t)^2``."""
        return (self.alpha(t) / self.sigma(t)) ** 2

    def log_snr(self, t) -> torch.Tensor:
        """``log(alpha^2 / sigma^2)``, decreasing in t (+inf at data, -inf at pure noise)."""
        return 2 * self.half_log_snr(t)

    def half_log_snr(self, t) -> torch.Tensor:
        """DPM-Solver's ``lambda(t) = log(alpha(t) / sigma(t))`` (Lu et al. 2022, Sec. 3.1)."""
        t = _as_time(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_from_log_snr(self, log_snr) -> torch.Tensor:
        """Inverse of ``log_snr`` on [0, 1]; generic bisection (log-SNR must be decreasing in t)."""
        target = _as_time(log_snr).to(torch.float64)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            too_early = self.log_snr(mid) > target  # still too clean: the answer is later
            lo, hi = torch.where(too_early, mid, lo), torch.where(too_early, hi, mid)
        return 0.5 * (lo + hi)

    def __repr__(self):
        return f"{type(self).__name__}()"


class LinearPath(AffinePath):
    """CondOT / rectified flow: ``alpha = 1 - t``, ``sigma = t``, velocity ``eps - x0``."""

    name = "linear"

    def __init__(self):
        super().__init__()

    def alpha(self, t):
        return 1 - _as_time(t)

    def sigma(self, t):
        return _as_time(t)

    def d_alpha(self, t):
        return torch.full_like(_as_time(t), -1.0)

    def d_sigma(self, t):
        return torch.ones_like(_as_time(t))

    def t_from_log_snr(self, log_snr):
        # (1 - t) / t = exp(log_snr / 2)
        return torch.sigmoid(-0.5 * _as_time(log_snr))


class CosinePath(AffinePath):
    """``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)`` (variance preserving, Nichol & Dhariwal 2021)."""

    name = "cosine"

    def __init__(self):
        super().__init__()

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * _as_time(t))

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * _as_time(t))

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * _as_time(t))

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * _as_time(t))

    def t_from_log_snr(self, log_snr):
        # cot(pi t / 2) = exp(log_snr / 2)
        return torch.atan(torch.exp(-0.5 * _as_time(log_snr))) * (2 / math.pi)


class VPPath(AffinePath):
    """Continuous DDPM linear-beta schedule as a VP-SDE (Song et al. 2021, eq. 11 and App. B).

    ``beta(t) = beta_min + t (beta_max - beta_min)``, ``alpha(t) = exp(-1/2 int_0^t beta)``,
    ``sigma = sqrt(1 - alpha^2)``. With the defaults (0.1, 20) this is the limit of DDPM's 1000-step
    linear schedule 1e-4..0.02; ``alpha(1) ~ 6.6e-3`` (not exactly pure noise) and ``sigma'(t)`` blows up
    at ``t = 0``, so solvers that evaluate the velocity at ``t = 0`` need a grid ending at a small t_min
    (or DPM-Solver++, which never does).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        super().__init__()
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"VPPath: need 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t):
        return self.beta_min + _as_time(t) * (self.beta_max - self.beta_min)

    def _log_alpha(self, t):
        t = _as_time(t)
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def d_alpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        # sigma^2 = 1 - alpha^2  =>  sigma' = -alpha alpha' / sigma
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def half_log_snr(self, t):
        log_alpha = self._log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))

    def t_from_log_snr(self, log_snr):
        # alpha^2 = sigmoid(log_snr); c = -2 log alpha = softplus(-log_snr) = beta_min t + d t^2 / 2
        c = torch.nn.functional.softplus(-_as_time(log_snr))
        d = self.beta_max - self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * c)) / d

    def __repr__(self):
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


# ---------------------------------------------------------------------------------------------
# Discrete DDPM schedules on continuous t (the tables: genmod.core.ddpm_tables)
# ---------------------------------------------------------------------------------------------
class DiscreteSchedulePath(AffinePath):
    """A DDPM ``alphas_cumprod`` table as a continuous VP path.

    Step ``n`` (0-based, ``n = N-1`` noisiest) sits at ``t = (n + 1) / N``, so ``t = 0`` is clean data; the
    network is fed ``n`` itself (:meth:`network_timestep`), as the official DDPM code does. ``log alpha^2`` is
    interpolated piecewise-linearly between knots (with ``log alpha^2 = 0`` at t = 0), ``sigma = sqrt(1 - alpha^2)``.
    For the linear 1e-4..0.02 table this tracks ``VPPath(0.1, 20)`` closely.
    """

    name = "discrete"

    def __init__(self, alphas_cumprod: torch.Tensor | None = None, schedule: str = "linear", num_steps: int = 1000):
        super().__init__()
        if alphas_cumprod is None:
            alphas_cumprod = ddpm_alphas_cumprod(schedule, num_steps)
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if not ((alphas_cumprod > 0) & (alphas_cumprod < 1)).all() or (alphas_cumprod.diff() >= 0).any():
            raise ValueError("alphas_cumprod: must be strictly decreasing values in (0, 1)")
        self.num_steps = alphas_cumprod.numel()
        self.alphas_cumprod = alphas_cumprod
        self._knots_log_a2 = torch.cat([torch.zeros(1, dtype=torch.float64), alphas_cumprod.log()])

    def step_to_t(self, step) -> torch.Tensor:
        """Integer DDPM step n -> continuous t = (n + 1) / N."""
        return (torch.as_tensor(step, dtype=torch.float64) + 1) / self.num_steps

    def t_to_step(self, t) -> torch.Tensor:
        """Continuous t -> (fractional) DDPM step ``t N - 1``."""
        return _as_time(t) * self.num_steps - 1

    def network_timestep(self, t):
        """The DDPM step ``n = N t - 1`` of ``alpha_bar[n]`` (0..N-1 on the knots), the integer the official
        DDPM / ADM / LatentLM / CausalFusion / Diffusion Forcing code feeds its embedder (Ho et al. 2020,
        Sec. 4: ``t in {1..T}`` there is ``n + 1`` here). Between knots it is the same affine map; values within
        1e-3 of an integer are snapped onto it (computed in float64), so a knot ``t = (n + 1) / N`` stored in
        float32 feeds exactly the integer ``n`` the official network saw in training."""
        time = torch.as_tensor(t)
        step = time.double() * self.num_steps - 1
        nearest = step.round()
        step = torch.where((step - nearest).abs() < 1e-3, nearest, step)
        if not isinstance(t, torch.Tensor):
            return float(step) if step.dim() == 0 else step.float()
        return step.to(t.dtype if t.is_floating_point() else torch.float32)

    def _log_a2_and_slope(self, t):
        t = _as_time(t)
        pos = (t.to(torch.float64) * self.num_steps).clamp(0, self.num_steps)
        idx = pos.floor().long().clamp(max=self.num_steps - 1)
        knots = self._knots_log_a2.to(pos.device)
        slope = (knots[idx + 1] - knots[idx]) * self.num_steps
        value = knots[idx] + (pos - idx) * (knots[idx + 1] - knots[idx])
        return value.to(t.dtype), slope.to(t.dtype)

    def alpha(self, t):
        return torch.exp(0.5 * self._log_a2_and_slope(t)[0])

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(self._log_a2_and_slope(t)[0]))

    def d_alpha(self, t):
        log_a2, slope = self._log_a2_and_slope(t)
        return 0.5 * slope * torch.exp(0.5 * log_a2)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def __repr__(self):
        return f"DiscreteSchedulePath(num_steps={self.num_steps})"


PATHS = {"linear": LinearPath, "cosine": CosinePath, "vp": VPPath}


def get_path(name: str | AffinePath, **kwargs) -> AffinePath:
    """A path by name (``linear``, ``cosine``, ``vp``, ``ddpm_linear``, ``ddpm_cosine``, ``ddpm_sigmoid``) or passed through."""
    if isinstance(name, AffinePath):
        return name
    if name in PATHS:
        return PATHS[name](**kwargs)
    if name in ("ddpm_linear", "ddpm_cosine", "ddpm_sigmoid"):
        return DiscreteSchedulePath(schedule=name.split("_")[1], **kwargs)
    raise ValueError(f"path: expected one of {', '.join(list(PATHS) + ['ddpm_linear', 'ddpm_cosine', 'ddpm_sigmoid'])}, got {name!r}")
