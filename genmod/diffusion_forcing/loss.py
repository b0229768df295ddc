"""Diffusion Forcing loss weights: min-SNR per frame and the paper code's "fused SNR".

Min-SNR-gamma (Hang et al. 2023) is applied per frame through ``genmod.core.loss.min_snr_weight``.

Fused SNR (Diffusion Forcing v1.5 video configs, Chen et al. 2024): a frame whose past is already
clean carries less uncertainty, so its effective SNR mixes its own normalised SNR with a causal
exponential moving average of the clipped, normalised SNR of the frames before it::

    n_t  = snr_t / gamma,        c_t = min(n_t, 1)
    e_0  = c_0,                  e_t = d e_{t-1} + (1 - d) c_t            (d = decay)
    p_t  = e_{t-1} (p_0 = 0)     fused_t = 1 - (1 - d p_t) (1 - n_t)

and the weight is min-SNR with ``gamma * fused_t`` in place of the frame's SNR. In x0 space this is
``gamma * min(fused, 1)`` and for epsilon ``min(fused, 1) / fused`` (the reference code's formulas);
other loss spaces use the path's own x0 -> space factor at the time whose SNR equals the fused one
(``path.t_from_log_snr``), so one formula covers every path and prediction type.
"""

from __future__ import annotations

import torch

from genmod.core.loss import min_snr_weight
from genmod.core.paths import AffinePath


def fused_snr(snr: torch.Tensor, gamma: float = 5.0, decay: float = 0.96) -> torch.Tensor:
    """The fused, normalised SNR ``fused_t`` ``[B, T]`` of per-frame SNRs ``snr`` ``[B, T]`` (see module doc)."""
    if snr.dim() != 2:
        raise ValueError(f"snr: expected per-frame SNRs [B, T], got shape {tuple(snr.shape)}")
    if gamma <= 0 or not 0 <= decay <= 1:
        raise ValueError(f"gamma/decay: need gamma > 0 and decay in [0, 1], got {gamma}, {decay}")
    normalised = snr / gamma
    clipped = normalised.clamp(max=1.0)
    ema = torch.zeros_like(clipped)
    for t in range(clipped.shape[1]):
        ema[:, t] = clipped[:, 0] if t == 0 else decay * ema[:, t - 1] + (1 - decay) * clipped[:, t]
    past = torch.cat([torch.zeros_like(ema[:, :1]), ema[:, :-1]], dim=1)
    return 1 - (1 - decay * past) * (1 - normalised)


def fused_snr_weight(path: AffinePath, t: torch.Tensor, gamma: float = 5.0, decay: float = 0.96,
                     loss_space: str = "velocity") -> torch.Tensor:
    """Per-frame loss weight ``[B, T]``: min-SNR-gamma evaluated at the fused SNR (module doc)."""
    t64 = t.to(torch.float64)
    fused = gamma * fused_snr(path.snr(t64), gamma, decay)
    t_equiv = path.t_from_log_snr(torch.log(fused.clamp(min=1e-12)))
    weight = min_snr_weight(path, t_equiv.clamp(1e-6, 1 - 1e-6), gamma, loss_space)
    if loss_space == "x0":  # exact closed form (no inversion round-off)
        weight = gamma * (fused / gamma).clamp(max=1.0)
    elif loss_space == "epsilon":
        weight = (fused / gamma).clamp(max=1.0) / (fused / gamma)
    return weight.to(t.dtype)
