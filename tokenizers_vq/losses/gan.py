"""Image GAN pieces of VQGAN (Esser et al. 2021, Sec. 3.1, Eq. 7): the PatchGAN discriminator
(Isola et al. 2017 ``NLayerDiscriminator``), hinge / LSGAN / non-saturating losses, the adaptive
weight ``lambda = ||grad_L L_rec|| / (||grad_L L_G|| + 1e-4)`` at the decoder's last layer L, and the
delayed start."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs (stride 2 for the first ``num_layers``), BatchNorm, LeakyReLU(0.2),
    one logit per patch; weights ~ N(0, 0.02), BatchNorm gamma ~ N(1, 0.02)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = base_channels
        for i in range(1, num_layers + 1):
            out = base_channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def lsgan_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """LSGAN (Mao et al. 2017), as DAC: ``mean(D(x_hat)^2) + mean((1 - D(x))^2)``."""
    return logits_fake.pow(2).mean() + (1.0 - logits_real).pow(2).mean()


def lsgan_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return (1.0 - logits_fake).pow(2).mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN Eq. 7: ``||d rec / d W_last|| / (||d g / d W_last|| + 1e-4)``, clamped to [0, max], detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def gan_factor(step: int, start_step: int) -> float:
    """0 before ``start_step``, 1 from then on (taming's ``adopt_weight``)."""
    return 1.0 if step >= start_step else 0.0
