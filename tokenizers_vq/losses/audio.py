"""Audio losses, all on ``torch.stft`` (torchaudio is in maintenance mode, tokenizers.md §4).

* :class:`MultiScaleMelLoss`: DAC's multi-scale log10-mel L1 (Kumar et al. 2023, Sec. 3.4):
  windows 32..2048, mels 5..320, hop = window / 4, clamp 1e-5.
* :class:`MultiResolutionSTFTLoss`: spectral convergence + log-magnitude L1 summed over resolutions
  (Yamamoto et al. 2020, Parallel WaveGAN, Eq. 1-3).
* :class:`MultiPeriodDiscriminator` (HiFi-GAN, Kong et al. 2020, Sec. 2.2) and
  :class:`MultiBandSTFTDiscriminator` (DAC's MRD: complex STFT split into frequency bands),
  each returning per-sub-discriminator ``(logits, feature_maps)``; :func:`feature_matching_loss`
  (HiFi-GAN Eq. 4: L1 between real and fake feature maps).
* :func:`si_sdr`: scale-invariant SDR in dB (Le Roux et al. 2019).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def stft_magnitude(x: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    """|STFT| of ``(B, C, T)`` or ``(B, T)`` audio -> ``(B*C, freq, frames)``, Hann window, centred."""
    x = x.reshape(-1, x.shape[-1]).float()
    window = torch.hann_window(win, device=x.device)
    spec = torch.stft(x, n_fft, hop, win, window=window, center=True, pad_mode="reflect", return_complex=True)
    return spec.abs()


def hz_to_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0) if isinstance(f, float) else 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None,
                   device=None) -> torch.Tensor:
    """Triangular HTK-mel filterbank ``(n_mels, n_fft // 2 + 1)`` (unnormalised, like torchaudio's default)."""
    f_max = f_max if f_max is not None else sample_rate / 2.0
    freqs = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, device=device)
    mel_points = torch.linspace(hz_to_mel(float(f_min)), hz_to_mel(float(f_max)), n_mels + 2, device=device)
    hz_points = 700.0 * (10.0 ** (mel_points / 2595.0) - 1.0)
    lower, center, upper = hz_points[:-2, None], hz_points[1:-1, None], hz_points[2:, None]
    up = (freqs - lower) / (center - lower)
    down = (upper - freqs) / (upper - center)
    return torch.clamp(torch.minimum(up, down), min=0.0)


class MultiScaleMelLoss(nn.Module):
    """DAC multi-scale mel loss: ``sum_s mean |log10 mel_s(x) - log10 mel_s(x_hat)|``."""

    def __init__(self, sample_rate: int, windows: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048),
                 n_mels: Sequence[int] = (5, 10, 20, 40, 80, 160, 320), clamp_eps: float = 1e-5):
        super().__init__()
        if len(windows) != len(n_mels):
            raise ValueError("MultiScaleMelLoss: windows and n_mels must have the same length")
        self.sample_rate, self.windows, self.n_mels, self.clamp_eps = sample_rate, tuple(windows), tuple(n_mels), clamp_eps
        for w, m in zip(self.windows, self.n_mels):
            self.register_buffer(f"fb_{w}", mel_filterbank(w, m, sample_rate), persistent=False)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        for w in self.windows:
            fb = getattr(self, f"fb_{w}")
            mel_x = fb @ stft_magnitude(x, w, w // 4, w)
            mel_y = fb @ stft_magnitude(x_hat, w, w // 4, w)
            total = total + (mel_x.clamp_min(self.clamp_eps).log10() - mel_y.clamp_min(self.clamp_eps).log10()).abs().mean()
        return total


class MultiResolutionSTFTLoss(nn.Module):
    """Parallel WaveGAN MR-STFT loss: mean over resolutions of spectral convergence
    ``||S - S_hat||_F / ||S||_F`` plus log-magnitude L1 ``mean |log S - log S_hat|``."""

    def __init__(self, fft_sizes: Sequence[int] = (1024, 2048, 512), hop_sizes: Sequence[int] = (120, 240, 50),
                 win_sizes: Sequence[int] = (600, 1200, 240), eps: float = 1e-7):
        super().__init__()
        if not (len(fft_sizes) == len(hop_sizes) == len(win_sizes)):
            raise ValueError("MultiResolutionSTFTLoss: fft_sizes, hop_sizes and win_sizes must have the same length")
        self.resolutions = list(zip(fft_sizes, hop_sizes, win_sizes))
        self.eps = eps

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        for n_fft, hop, win in self.resolutions:
            s = stft_magnitude(x, n_fft, hop, win).clamp_min(self.eps)
            s_hat = stft_magnitude(x_hat, n_fft, hop, win).clamp_min(self.eps)
            sc = torch.linalg.norm(s - s_hat) / torch.linalg.norm(s)
            mag = (s.log() - s_hat.log()).abs().mean()
            total = total + sc + mag
        return total / len(self.resolutions)


def si_sdr(reference: torch.Tensor, estimate: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-signal SI-SDR in dB: ``10 log10(||a s||^2 / ||a s - s_hat||^2)``, ``a = <s_hat, s> / ||s||^2``
    (means removed first). Inputs ``(..., T)``; returns shape ``(...)``."""
    s = reference.float() - reference.float().mean(-1, keepdim=True)
    s_hat = estimate.float() - estimate.float().mean(-1, keepdim=True)
    alpha = (s_hat * s).sum(-1, keepdim=True) / (s.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * s
    return 10 * torch.log10(target.pow(2).sum(-1) / ((target - s_hat).pow(2).sum(-1) + eps) + eps)


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN sub-discriminator: audio folded into ``(T / p, p)``, 2D convs with (k, 1) kernels."""

    def __init__(self, period: int, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.period = period
        convs, prev = [], 1
        for c in channels:
            convs.append(nn.utils.parametrizations.weight_norm(nn.Conv2d(prev, c, (5, 1), (3, 1), padding=(2, 0))))
            prev = c
        convs.append(nn.utils.parametrizations.weight_norm(nn.Conv2d(prev, prev, (5, 1), 1, padding=(2, 0))))
        self.convs = nn.ModuleList(convs)
        self.conv_out = nn.utils.parametrizations.weight_norm(nn.Conv2d(prev, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor):
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), mode="reflect")
        h = x.reshape(b, c, -1, self.period)
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.1)
            features.append(h)
        logits = self.conv_out(h)
        features.append(logits)
        return logits, features


class MultiPeriodDiscriminator(nn.Module):
    """MPD with DAC's periods (2, 3, 5, 7, 11)."""

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, x: torch.Tensor):
        return [d(x) for d in self.discriminators]


class BandSTFTDiscriminator(nn.Module):
    """DAC MRD at one FFT size: complex STFT (real, imag as channels), frequency split into bands,
    a conv stack per band with (3, 9) kernels striding over frequency, bands concatenated, one logit map."""

    BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))

    def __init__(self, n_fft: int, channels: int = 32, num_layers: int = 4):
        super().__init__()
        self.n_fft = n_fft
        bins = n_fft // 2 + 1
        self.band_edges = [(int(lo * bins), int(hi * bins)) for lo, hi in self.BANDS]
        wn = nn.utils.parametrizations.weight_norm
        self.band_convs = nn.ModuleList()
        for _ in self.BANDS:
            layers = [wn(nn.Conv2d(2, channels, (3, 9), (1, 1), padding=(1, 4)))]
            layers += [wn(nn.Conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4))) for _ in range(num_layers - 1)]
            self.band_convs.append(nn.ModuleList(layers))
        self.conv_out = wn(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1]).float()
        window = torch.hann_window(self.n_fft, device=x.device)
        spec = torch.stft(flat, self.n_fft, self.n_fft // 4, self.n_fft, window=window, return_complex=True)
        spec = torch.view_as_real(spec).permute(0, 3, 2, 1)  # (B, 2, frames, freq)
        features, outs = [], []
        for (lo, hi), convs in zip(self.band_edges, self.band_convs):
            h = spec[..., lo:hi]
            for conv in convs:
                h = F.leaky_relu(conv(h), 0.1)
                features.append(h)
            outs.append(h)
        logits = self.conv_out(torch.cat(outs, dim=-1))
        features.append(logits)
        return logits, features


class MultiBandSTFTDiscriminator(nn.Module):
    """DAC's multi-resolution, multi-band STFT discriminator (FFT sizes 2048, 1024, 512)."""

    def __init__(self, fft_sizes: Sequence[int] = (2048, 1024, 512), channels: int = 32):
        super().__init__()
        self.discriminators = nn.ModuleList(BandSTFTDiscriminator(n, channels) for n in fft_sizes)

    def forward(self, x: torch.Tensor):
        return [d(x) for d in self.discriminators]


def feature_matching_loss(real_outputs, fake_outputs) -> torch.Tensor:
    """HiFi-GAN Eq. 4: mean over sub-discriminators and layers of L1(features_real (detached), features_fake)."""
    losses = [F.l1_loss(f, r.detach()) for (_, rf), (_, ff) in zip(real_outputs, fake_outputs) for r, f in zip(rf, ff)]
    return torch.stack(losses).mean()
