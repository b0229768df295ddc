"""Minibatch couplings of data and noise for flow-matching training (layer 0: knows no trainer).

Plain flow matching pairs every data point ``x0`` of a batch with an independent noise draw
(the *independent* coupling). Pooladian et al. 2023 ("Multisample flow matching") and Tong et al.
2023 ("Improving and generalizing flow-based generative models with minibatch optimal transport",
OT-CFM / SB-CFM) re-pair the batch by an optimal-transport plan ``pi`` between the batch's data and
its noise, with cost ``c(x0, eps) = ||x0 - eps||^2``. The conditional paths then cross less, the
marginal velocity field is straighter and few-step ODE solves are more accurate.

* ``ot``: the exact plan of the batch, a permutation (``scipy.optimize.linear_sum_assignment``).
* ``sinkhorn``: the entropic plan ``argmin <pi, C> - reg H(pi)`` (POT, log-domain Sinkhorn).
* ``sb``: the Schrodinger bridge (Tong et al. 2023, Sec. 4 / torchcfm's SB-CFM): the entropic plan with
  ``reg = 2 sigma^2`` and, on the path, the Brownian-bridge noise
  ``x_t = (1 - t) x0 + t eps + sigma sqrt(t (1 - t)) z`` whose conditional velocity is
  ``(eps - x0) + (1 - 2t) / (2 t (1 - t)) (x_t - mu_t)`` (Tong et al. 2023, Prop. 3.4 in their time
  convention, written here with t = 0 data, t = 1 noise).

The entropic plans are sampled *stratified by rows*: every data point of the batch is kept once and its
noise partner is drawn from ``pi(j | i)`` (torchcfm draws the (i, j) pairs i.i.d. from ``pi``; both are
samples of the plan, this one keeps the batch's data and labels intact). With ``labels`` every plan is
solved within each class (class-conditional training couples within class). All randomness comes
from the caller's ``torch.Generator``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

COUPLINGS = ("independent", "ot", "sinkhorn", "sb")


def transport_cost(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` squared Euclidean costs ``||x0_i - noise_j||^2`` of flattened samples, in float64."""
    a = x0.reshape(x0.shape[0], -1).double()
    b = noise.reshape(noise.shape[0], -1).double()
    return torch.cdist(a, b).pow(2)


def exact_ot_assignment(cost_BB: torch.Tensor) -> torch.Tensor:
    """The optimal permutation ``perm`` (``sum_i cost[i, perm[i]]`` minimal) of a square cost matrix."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost_BB.detach().cpu().numpy())
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long)


def sinkhorn_plan(cost_BB: torch.Tensor, reg: float, num_iter: int = 1000, tol: float = 1e-6) -> torch.Tensor:
    """Entropic OT plan with uniform marginals (POT), ``[B, B]`` float64 summing to 1.

    POT's stabilised Sinkhorn (log-domain absorption, fast), and its full log-domain Sinkhorn where that
    overflows (``reg`` tiny against the costs, e.g. images with ``reg`` << ``2 D``: slow, and the plan is then
    the exact one anyway, so prefer ``--coupling ot`` there). ``reg`` is in cost units (``||x0 - eps||^2``).
    """
    try:
        import ot
    except ImportError as err:
        raise ImportError("--coupling sinkhorn/sb needs POT: pip install 'genmod[ot]'") from err
    if not reg > 0:
        raise ValueError(f"--coupling_reg: the entropic plan needs reg > 0, got {reg}")
    cost = cost_BB.detach().cpu().double()
    n, m = cost.shape
    a, b = torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-finite plans are caught below; slow convergence is not an error
        plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_stabilized", numItermax=num_iter, stopThr=tol)
        if not torch.isfinite(plan).all() or not plan.sum() > 0:
            plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=num_iter, stopThr=tol)
    if not torch.isfinite(plan).all() or not plan.sum() > 0:
        raise FloatingPointError(f"--coupling_reg {reg}: Sinkhorn returned a non-finite plan")
    return plan


def sample_plan_rows(plan_BB: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """For every row ``i`` a column ``j ~ plan[i, :] / sum(plan[i, :])`` (a row-stratified sample of the plan)."""
    probs = plan_BB / plan_BB.sum(dim=1, keepdim=True)
    uniform = torch.rand(plan_BB.shape[0], dtype=torch.float64, generator=generator,
                         device=generator.device if generator is not None else "cpu").cpu()
    cdf = probs.cumsum(dim=1)
    cols = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:]).squeeze(1)
    return cols.clamp(max=plan_BB.shape[1] - 1)


def _groups(labels: torch.Tensor | None, batch: int) -> list[torch.Tensor]:
    """Index sets that are coupled separately: one per class present, or the whole batch."""
    if labels is None:
        return [torch.arange(batch)]
    labels = labels.detach().cpu()
    return [torch.nonzero(labels == value).squeeze(1) for value in torch.unique(labels)]


def coupling_permutation(x0: torch.Tensor, noise: torch.Tensor, method: str, reg: float = 0.05,
                         generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``idx`` ``[B]`` such that ``(x0[i], noise[idx[i]])`` are the coupled pairs (within class if ``labels``).

    ``ot`` gives a permutation; ``sinkhorn`` / ``sb`` draw each partner from the entropic plan (``reg``), so a
    noise sample may be used twice; ``independent`` is the identity.
    """
    if method not in COUPLINGS:
        raise ValueError(f"--coupling: expected one of {', '.join(COUPLINGS)}, got {method!r}")
    batch = x0.shape[0]
    if noise.shape != x0.shape:
        raise ValueError(f"noise: shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    idx = torch.arange(batch)
    if method == "independent":
        return idx.to(x0.device)
    for group in _groups(labels, batch):
        if group.numel() < 2:
            continue
        cost = transport_cost(x0[group.to(x0.device)], noise[group.to(x0.device)])
        if method == "ot":
            cols = exact_ot_assignment(cost)
        else:
            cols = sample_plan_rows(sinkhorn_plan(cost, reg), generator)
        idx[group] = group[cols]
    return idx.to(x0.device)


def couple(x0: torch.Tensor, noise: torch.Tensor, method: str, reg: float = 0.05, sb_sigma: float = 1.0,
           generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The noise re-ordered so that ``(x0[i], result[i])`` are coupled; ``sb`` uses ``reg = 2 sb_sigma^2``."""
    if method == "sb":
        if not sb_sigma > 0:
            raise ValueError(f"--sb_sigma: the Schrodinger bridge needs sigma > 0, got {sb_sigma}")
        reg = 2.0 * sb_sigma**2
    return noise[coupling_permutation(x0, noise, method, reg, generator, labels)]


def brownian_bridge_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sb_sigma: float,
                           z: torch.Tensor, eps: float = 1e-5):
    """``(x_t, u_t)`` on the Brownian bridge from ``x0`` (t = 0) to ``noise`` (t = 1) with diffusion ``sb_sigma``.

    ``x_t = (1 - t) x0 + t noise + sb_sigma sqrt(t (1 - t)) z`` and the conditional velocity
    ``u_t = noise - x0 + sb_sigma (1 - 2t) / (2 sqrt(t (1 - t))) z`` (= ``(1 - 2t) / (2 t (1 - t)) (x_t - mu_t)``
    for the bridge term); ``t`` is clamped to ``[eps, 1 - eps]`` where the bridge's derivative is infinite.
    ``sb_sigma = 0`` is the straight (rectified-flow) path.
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    tt = t.to(x0.dtype).clamp(eps, 1 - eps).reshape(shape)
    root = torch.sqrt(tt * (1 - tt))
    x_t = (1 - tt) * x0 + tt * noise + sb_sigma * root * z
    u_t = noise - x0 + sb_sigma * (1 - 2 * tt) / (2 * root) * z
    return x_t, u_t


def mean_transport_cost(x0: torch.Tensor, noise: torch.Tensor) -> float:
    """``mean_i ||x0_i - noise_i||^2`` of already paired samples (the cost a coupling is judged by)."""
    return float((x0.reshape(x0.shape[0], -1).double() - noise.reshape(noise.shape[0], -1).double()).pow(2).sum(1).mean())


def straightness(trajectory: list[torch.Tensor], times: torch.Tensor) -> float:
    """Straightness ``S = int_0^1 E ||(x_1 - x_0) - v_t||^2 dt`` of a discretised ODE trajectory (Liu et al. 2022, eq. 7).

    ``trajectory``: the states ``x(t_k)`` on a decreasing grid ``times`` (``t_0 = 1`` noise ... ``t_K = 0`` data);
    the velocity on each interval is the finite difference, so ``S`` is 0 exactly for straight paths
    (Tong et al. 2023 report the same quantity as "normalized path energy" minus one).
    """
    times = torch.as_tensor(times, dtype=torch.float64)
    if len(trajectory) != times.numel():
        raise ValueError(f"trajectory: {len(trajectory)} states for {times.numel()} times")
    start, end = trajectory[0].double(), trajectory[-1].double()
    chord = (start - end) / float(times[0] - times[-1])  # d x / d t of the straight line, data -> noise
    total = 0.0
    for k in range(len(trajectory) - 1):
        dt = float(times[k] - times[k + 1])
        v = (trajectory[k].double() - trajectory[k + 1].double()) / dt
        total += dt * float((chord - v).reshape(v.shape[0], -1).pow(2).sum(1).mean())
    return total / abs(float(times[0] - times[-1]))


__all__ = ["COUPLINGS", "transport_cost", "exact_ot_assignment", "sinkhorn_plan", "sample_plan_rows",
           "coupling_permutation", "couple", "brownian_bridge_sample", "mean_transport_cost", "straightness"]
