"""The flow-matching loss for velocity / x0 / epsilon networks (EDM-style: one small function).

``L = w(t) * || F(model_output) - target ||^2`` where the network output of type ``prediction`` is
converted exactly with the path into ``loss_space`` (velocity target ``alpha' x0 + sigma' eps``,
Lipman et al. 2023 eq. 23; x0 or epsilon otherwise). ``weight`` broadcasts from the left like ``t``
(``[B]`` or ``[B, T]``); ``mask`` (same convention, 1 = counts) restricts the loss to some tokens.

``min_snr_weight`` is Min-SNR-gamma (Hang et al. 2023, Sec. 3.4): in x0 space the weight is
``min(SNR, gamma)``; in another space it is rescaled by ``||d x0||^2 / ||d space||^2`` at fixed x_t, giving
``min(SNR, gamma) / SNR`` for epsilon and ``min(alpha^2, gamma sigma^2) / (alpha sigma' - sigma alpha')^2``
for the flow velocity.
"""

from __future__ import annotations

import torch

from genmod.core.paths import AffinePath, LinearPath, broadcast_like

LOSS_SPACES = ("velocity", "x0", "epsilon")


def flow_matching_loss(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    path: AffinePath | None = None,
    prediction: str = "velocity",
    loss_space: str | None = None,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted, masked MSE between the (converted) network output and the path's target.

    Args:
        model_output: network output of type ``prediction`` (``velocity``, ``x0`` or ``epsilon``).
        x0, noise, t: the clean data, the noise and the times used to build ``x_t``.
        loss_space: space in which the MSE is taken (default: the prediction type).
        weight: per-sample / per-token weight broadcasting from the left (e.g. ``min_snr_weight``).
        mask: 1 where the loss counts, broadcasting from the left (``[B]`` or ``[B, T]``).
        reduction: ``mean`` (over all counted elements), ``per_sample`` (``[B]``) or ``none``.
    """
    path = path or LinearPath()
    loss_space = loss_space or prediction
    for name, value in (("prediction", prediction), ("loss_space", loss_space)):
        if value not in LOSS_SPACES:
            raise ValueError(f"{name}: expected one of {', '.join(LOSS_SPACES)}, got {value!r}")
    if reduction not in ("mean", "per_sample", "none"):
        raise ValueError(f"reduction: expected 'mean', 'per_sample' or 'none', got {reduction!r}")
    if model_output.shape != x0.shape:
        raise ValueError(f"model_output: shape {tuple(model_output.shape)} differs from x0 shape {tuple(x0.shape)}")

    point = path.sample(x0, noise, t)
    targets = {"velocity": point.velocity_target, "x0": x0, "epsilon": noise}
    pred = model_output if prediction == loss_space else path.convert(model_output, point.x_t, t, prediction, loss_space)
    dtype = torch.promote_types(pred.dtype, torch.float32)  # bf16/fp16 outputs: the MSE in fp32
    err = (pred.to(dtype) - targets[loss_space].to(dtype)) ** 2
    if weight is not None:
        err = err * broadcast_like(weight, err)
    counted = torch.ones_like(err) if mask is None else broadcast_like(mask, err).expand_as(err)
    err = err * counted
    if reduction == "none":
        return err
    if reduction == "per_sample":
        dims = tuple(range(1, err.ndim))
        return err.sum(dims) / counted.sum(dims).clamp(min=1)
    return err.sum() / counted.sum().clamp(min=1)


def min_snr_weight(path: AffinePath, t: torch.Tensor, gamma: float = 5.0, loss_space: str = "velocity") -> torch.Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023) expressed in ``loss_space``; shape of ``t``."""
    if gamma <= 0:
        raise ValueError(f"gamma: must be > 0, got {gamma}")
    if loss_space not in LOSS_SPACES:
        raise ValueError(f"loss_space: expected one of {', '.join(LOSS_SPACES)}, got {loss_space!r}")
    a2, s2 = path.alpha(t) ** 2, path.sigma(t) ** 2
    if loss_space == "x0":
        return (a2 / s2).clamp(max=gamma)  # min(SNR, gamma); SNR = inf at t = 0 gives gamma
    if loss_space == "epsilon":
        return (gamma * s2 / a2).clamp(max=1.0)  # min(SNR, gamma) / SNR
    det = path.alpha(t) * path.d_sigma(t) - path.sigma(t) * path.d_alpha(t)
    return torch.minimum(a2, gamma * s2) / det**2
