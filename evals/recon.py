"""Tokenizer (reconstruction) metrics: PSNR, SSIM, LPIPS, rFID, codebook usage and perplexity.

Images are ``(B, C, H, W)`` in ``[-1, 1]`` (data range 2) unless ``data_range`` says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(data_range^2 / MSE)`` (``(B,)``; inf for identical images)."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0), window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al., IEEE TIP 2004, Eq. 13) with an 11x11 Gaussian window, sigma 1.5.

    Local means, variances and covariance come from the Gaussian-weighted window over the 'valid'
    region (no padding, as in the paper's reference code); ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``;
    the SSIM map is averaged over pixels and channels. Returns ``(B,)``.

    SSIM's luminance term is not shift invariant, so images are first mapped from ``value_range``
    to [0, 1] (data range 1), the range the index was defined and is reported on.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images: SSIM needs at least {window_size}x{window_size} pixels, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma)
    kernel_h = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    kernel_v = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kernel_h, groups=channels), kernel_v, groups=channels)

    low, high = value_range
    x, y = (x.double() - low) / (high - low), (y.double() - low) / (high - low)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict:
    """Fraction of the ``codebook_size`` codes used at least once, and the perplexity
    ``exp(H(p))`` of the empirical code distribution (``codebook_size`` when all are used uniformly)."""
    flat = torch.as_tensor(indices).reshape(-1).long()
    if flat.numel() == 0:
        raise ValueError("indices: empty")
    if flat.min() < 0 or flat.max() >= codebook_size:
        raise ValueError(f"indices: codes must lie in [0, {codebook_size}), got [{flat.min()}, {flat.max()}]")
    counts = torch.bincount(flat, minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"codebook_usage": (counts > 0).double().mean().item(), "codebook_perplexity": math.exp(entropy),
            "codes_used": int((counts > 0).sum())}


def reconstruction_metrics(originals: torch.Tensor, reconstructions: torch.Tensor, *, lpips_net: str | None = "alex",
                           rfid_extractor: str | None = None, kid_subset_size: int | None = None,
                           batch_size: int = 64) -> dict:
    """PSNR / SSIM (means) and, when available, LPIPS and rFID (FID of reconstructions against the
    originals through torch-fidelity with ``rfid_extractor``) for images in ``[-1, 1]``."""
    _check_pair(originals, reconstructions)
    out = {"num_images": len(originals), "psnr": psnr(originals, reconstructions).mean().item()}
    if min(originals.shape[-2:]) >= 11:
        out["ssim"] = ssim(originals, reconstructions).mean().item()
    if lpips_net is not None and originals.shape[1] in (1, 3):
        from genmod.evals.lpips import load_lpips

        try:
            model = load_lpips(lpips_net)
        except FileNotFoundError as err:
            out["lpips_unavailable"] = str(err)
        else:
            rgb = (lambda t: t.expand(-1, 3, -1, -1)) if originals.shape[1] == 1 else (lambda t: t)
            with torch.no_grad():
                values = [model(rgb(originals[s:s + batch_size]).float(), rgb(reconstructions[s:s + batch_size]).float())
                          for s in range(0, len(originals), batch_size)]
            out[f"lpips_{lpips_net}"] = torch.cat(values).mean().item()
    if rfid_extractor is not None:
        from genmod.evals.generator_adapter import SampleDataset, to_uint8
        from genmod.evals.metrics import fidelity_metrics

        rgb = rfid_extractor.startswith("genmod-inception")
        result = fidelity_metrics(SampleDataset(to_uint8(reconstructions), rgb=rgb), SampleDataset(to_uint8(originals), rgb=rgb),
                                  metrics=("fid",), feature_extractor=rfid_extractor)
        out["rfid"] = result["frechet_inception_distance"]
        out["rfid_extractor"] = rfid_extractor
    return out


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"images: expected two (B, C, H, W) batches of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
