"""Pixel / sample reconstruction losses (L1 as in taming VQGAN and LDM, L2 as in VAR / SimVQ)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (``"l1"``) or squared (``"l2"``) error."""
    if x.shape != x_hat.shape:
        raise ValueError(f"reconstruction_loss: shapes differ, x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    if kind == "l2":
        return F.mse_loss(x_hat, x)
    raise ValueError(f"reconstruction_loss: kind must be 'l1' or 'l2', got {kind!r}")
