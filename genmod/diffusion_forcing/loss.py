"""Diffusion Forcing loss weights: min-SNR per frame and the paper code's "fused SNR".

Min-SNR-gamma (Hang et al. 2023) is applied per frame through ``genmod.core.loss.min_snr_weight``.

Fused SNR (Diffusion Forcing v1.5 video configs, Chen et al. 2024): a frame whose past is already
clean carries less uncertainty, so its effective SNR mixes its own normalised SNR with a causal
exponential moving average of the clipped, normalised SNR of the frames before it::

    n_t  = snr_t / gamma,        c_t = min(n_t, 1)
    e_0  = c_0,                  e_t = d e_{t-1} + (1 - d) c_t            (d = decay)
    p_t  = e_{t-1} (p_0 = 0)     fused_t = 1 - (1 - d p_t) (1 - n_t)

Non-causal models (DFoT, Song et al. 2025) use the bidirectional version: ``p_t`` is the mean of the
forward average above and the same average run from the end of the clip backwards.

The weight is min-SNR with ``S_f = gamma * fused_t`` in place of the frame's SNR, in each loss space
exactly as the reference code writes it: x0 ``min(S_f, gamma)``, epsilon ``min(S_f, gamma) / S_f`` and,
for its DDPM v-target ``v = alpha eps - sigma x0`` (variance-preserving alpha, sigma),
``min(S_f, gamma) / (S_f + 1)``. genmod's velocity ``alpha' x0 + sigma' eps`` relates to that v by
``|dv_ddpm|^2 = (alpha^2 + sigma^2) / det^2 |dv|^2`` (``det = alpha sigma' - sigma alpha'``), a factor of
the frame's own time t (on the cosine path it is the constant ``(2 / pi)^2``), so the velocity weight is
``min(S_f, gamma) / (S_f + 1) * (alpha_t^2 + sigma_t^2) / det_t^2``. (Before session 6 this factor was
taken at the time whose SNR equals ``S_f``, which agrees only on the cosine path.)
"""

from __future__ import annotations

import torch

from genmod.core.paths import AffinePath


def _shifted_ema(clipped: torch.Tensor, decay: float) -> torch.Tensor:
    """``p_t = e_{t-1}`` (``p_0 = 0``) of the running average ``e`` over frames (module doc)."""
    ema = torch.zeros_like(clipped)
    for t in range(clipped.shape[1]):
        ema[:, t] = clipped[:, 0] if t == 0 else decay * ema[:, t - 1] + (1 - decay) * clipped[:, t]
    return torch.cat([torch.zeros_like(ema[:, :1]), ema[:, :-1]], dim=1)


def fused_snr(snr: torch.Tensor, gamma: float = 5.0, decay: float = 0.96, causal: bool = True) -> torch.Tensor:
    """The fused, normalised SNR ``fused_t`` ``[B, T]`` of per-frame SNRs ``snr`` ``[B, T]`` (see module doc).

    ``causal=False``: the past term is the mean of the forward and the backward average (DFoT)."""
    if snr.dim() != 2:
        raise ValueError(f"snr: expected per-frame SNRs [B, T], got shape {tuple(snr.shape)}")
    if gamma <= 0 or not 0 <= decay <= 1:
        raise ValueError(f"gamma/decay: need gamma > 0 and decay in [0, 1], got {gamma}, {decay}")
    normalised = snr / gamma
    clipped = normalised.clamp(max=1.0)
    past = _shifted_ema(clipped, decay)
    if not causal:
        past = 0.5 * (past + _shifted_ema(clipped.flip(1), decay).flip(1))
    return 1 - (1 - decay * past) * (1 - normalised)


def fused_snr_weight(path: AffinePath, t: torch.Tensor, gamma: float = 5.0, decay: float = 0.96,
                     loss_space: str = "velocity", causal: bool = True, decay_power: int = 1) -> torch.Tensor:
    """Per-frame loss weight ``[B, T]``: min-SNR-gamma evaluated at the fused SNR (module doc).

    ``decay_power``: the decay used is ``decay ** decay_power`` (the reference code raises its per-step
    decay to ``frame_stack * frame_skip``)."""
    if loss_space not in ("velocity", "x0", "epsilon"):
        raise ValueError(f"loss_space: expected velocity, x0 or epsilon, got {loss_space!r}")
    if int(decay_power) < 1:
        raise ValueError(f"decay_power: must be >= 1, got {decay_power}")
    t64 = t.to(torch.float64)
    snr_f = gamma * fused_snr(path.snr(t64), gamma, decay ** int(decay_power), causal)  # S_f
    capped = gamma * (snr_f / gamma).clamp(max=1.0)  # min(S_f, gamma)
    if loss_space == "x0":
        weight = capped
    elif loss_space == "epsilon":
        weight = (snr_f / gamma).clamp(max=1.0) / (snr_f / gamma)
    else:  # the reference DDPM-v weight, carried to genmod's velocity by the factor at the frame's own t
        a, s = path.alpha(t64), path.sigma(t64)
        det = a * path.d_sigma(t64) - s * path.d_alpha(t64)
        weight = capped / (snr_f + 1) * (a**2 + s**2) / det**2
    return weight.to(t.dtype)
