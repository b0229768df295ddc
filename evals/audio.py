"""Audio metrics: multi-resolution STFT distance, mel distance, SI-SDR, and domain-feature Frechet distance.

Signals are ``(B, N)`` or ``(B, 1, N)`` float tensors (mono).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _mono(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x.mean(1)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{name}: expected (B, N) or (B, C, N) audio, got shape {tuple(x.shape)}")
    return x.double()


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale-invariant SDR in dB (Le Roux et al., ICASSP 2019, Eqs. 1-3), per signal ``(B,)``.

    Both signals are made zero-mean; the target is the reference scaled by
    ``alpha = <s_hat, s> / |s|^2``; SI-SDR = ``10 log10(|alpha s|^2 / |alpha s - s_hat|^2)``.
    """
    est, ref = _mono(estimate, "estimate"), _mono(reference, "reference")
    if est.shape != ref.shape:
        raise ValueError(f"estimate: shape {tuple(est.shape)} differs from reference {tuple(ref.shape)}")
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * ref
    return (10 * torch.log10(target.pow(2).sum(-1) / ((target - est).pow(2).sum(-1) + eps) + eps)).float()


def stft_magnitude(x: torch.Tensor, fft_size: int, hop: int, win: int) -> torch.Tensor:
    window = torch.hann_window(win, dtype=x.dtype, device=x.device)
    spec = torch.stft(x, fft_size, hop, win, window=window, return_complex=True)
    return spec.abs().clamp_min(1e-7)


def stft_distance(estimate: torch.Tensor, reference: torch.Tensor, fft_size: int = 1024, hop: int = 256,
                  win: int = 1024) -> torch.Tensor:
    """Spectral convergence + log-magnitude L1 at one resolution (Yamamoto et al., Parallel WaveGAN,
    ICASSP 2020, Eqs. 4-6): ``|| |S| - |S_hat| ||_F / || |S| ||_F + mean | log|S| - log|S_hat| |``, per signal."""
    est, ref = _mono(estimate, "estimate"), _mono(reference, "reference")
    if est.shape != ref.shape:
        raise ValueError(f"estimate: shape {tuple(est.shape)} differs from reference {tuple(ref.shape)}")
    mag_est, mag_ref = stft_magnitude(est, fft_size, hop, win), stft_magnitude(ref, fft_size, hop, win)
    convergence = (mag_ref - mag_est).flatten(1).norm(dim=1) / mag_ref.flatten(1).norm(dim=1)
    log_mag = (mag_ref.log() - mag_est.log()).abs().flatten(1).mean(1)
    return (convergence + log_mag).float()


def multi_resolution_stft_distance(estimate: torch.Tensor, reference: torch.Tensor,
                                   resolutions=((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))) -> torch.Tensor:
    """Mean of :func:`stft_distance` over ``(fft_size, hop, window)`` resolutions (Parallel WaveGAN Eq. 7)."""
    return torch.stack([stft_distance(estimate, reference, *r) for r in resolutions]).mean(0)


def mel_distance(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int = 16000, n_fft: int = 1024,
                 hop: int = 256, n_mels: int = 80) -> torch.Tensor:
    """Mean L1 between log-mel spectrograms (the HiFi-GAN / codec mel reconstruction distance), per signal."""
    import torchaudio

    est, ref = _mono(estimate, "estimate").float(), _mono(reference, "reference").float()
    if est.shape != ref.shape:
        raise ValueError(f"estimate: shape {tuple(est.shape)} differs from reference {tuple(ref.shape)}")
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    return (torch.log(mel(est) + 1e-5) - torch.log(mel(ref) + 1e-5)).abs().flatten(1).mean(1)


def audio_frechet_distance(fake_audio: torch.Tensor, real_audio: torch.Tensor, feature_net, batch_size: int = 64) -> dict:
    """Frechet distance and KID in the embedding of a domain classifier (:mod:`genmod.evals.feature_net`)
    trained on the built-in audio data, the offline stand-in for FAD (VGGish needs a download)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    from genmod.evals.metrics import frechet_distance

    model = feature_net.model if hasattr(feature_net, "model") else feature_net

    def embed(audio):
        audio = audio if audio.ndim == 3 else audio.unsqueeze(1)
        with torch.no_grad():
            return torch.cat([model(audio[s:s + batch_size].float())[0] for s in range(0, len(audio), batch_size)])

    fake, real = embed(fake_audio), embed(real_audio)
    subset = min(len(fake), len(real), 1000)
    kid = kid_features_to_metric(fake, real, kid_subsets=100, kid_subset_size=subset, verbose=False,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1, rng_seed=2020)
    out = {"frechet_distance": frechet_distance(fake, real), "num_fake": len(fake), "num_real": len(real)}
    out.update({"kid_mean": kid["kernel_inception_distance_mean"], "kid_std": kid["kernel_inception_distance_std"]})
    if hasattr(feature_net, "describe"):
        out["feature_net"] = feature_net.describe()
    return out


# ------------------------------------------------------------------------------------------------
# Reference codecs: what a tokenizer's numbers should be read against


def mu_law_encode(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """ITU-T G.711-style mu-law companding with ``mu = 2**bits - 1`` and uniform quantisation to
    ``2**bits`` integer codes: ``F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu)`` on ``[-1, 1]``, code
    ``round((F(x) + 1) / 2 * mu)`` in ``[0, mu]`` (the WaveNet, van den Oord et al. 2016, Sec. 2.2, form)."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    mu = 2 ** bits - 1
    x = x.double().clamp(-1.0, 1.0)
    companded = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return torch.round((companded + 1) / 2 * mu).long()


def mu_law_decode(codes: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Inverse of :func:`mu_law_encode`: ``x = sign(y) ((1 + mu)^|y| - 1) / mu`` with ``y = 2 code / mu - 1``."""
    mu = 2 ** bits - 1
    y = 2 * codes.double() / mu - 1
    return (torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu).float()


def resampled_mu_law(x: torch.Tensor, sample_rate: int, codec_rate: int, bits: int) -> torch.Tensor:
    """A naive waveform codec at ``codec_rate * bits`` bit/s: band-limit and resample ``x`` to
    ``codec_rate`` (torchaudio's windowed-sinc resampler), mu-law quantise to ``bits``, resample back.
    ``x``: ``(..., T)``; returns the same shape."""
    import torchaudio

    if codec_rate > sample_rate:
        raise ValueError(f"codec_rate={codec_rate} must not exceed sample_rate={sample_rate}")
    low = x.float() if codec_rate == sample_rate else torchaudio.functional.resample(x.float(), sample_rate, codec_rate)
    low = mu_law_decode(mu_law_encode(low, bits), bits)
    back = low if codec_rate == sample_rate else torchaudio.functional.resample(low, codec_rate, sample_rate)
    length = x.shape[-1]
    back = back[..., :length]
    return F.pad(back, (0, length - back.shape[-1]))


# (name, codec sample rate, bits per sample); None = silence. Bitrates 0, 128, 64, 16, 8 and 4 kbit/s.
DEFAULT_BASELINES = (("silence", None, 0), ("mulaw8_16k", 16000, 8), ("mulaw8_8k", 8000, 8),
                     ("mulaw4_4k", 4000, 4), ("mulaw4_2k", 2000, 4), ("mulaw4_1k", 1000, 4))


def audio_baselines(x: torch.Tensor, sample_rate: int, baselines=DEFAULT_BASELINES) -> dict:
    """``{name: (reconstruction, bits_per_second)}`` of the reference codecs in ``baselines`` for ``x``
    ``(..., T)``; codec rates above ``sample_rate`` are skipped."""
    out = {}
    for name, rate, bits in baselines:
        if rate is None:
            out[name] = (torch.zeros_like(x, dtype=torch.float32), 0)
        elif rate <= sample_rate:
            out[name] = (resampled_mu_law(x, sample_rate, rate, bits), rate * bits)
    return out


def reconstruction_scores(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int) -> dict:
    """Per-signal SI-SDR (dB), multi-resolution STFT distance and log-mel distance, as lists.
    SI-SDR of an all-zero estimate is undefined and given as ``None``."""
    est, ref = _mono(estimate, "estimate"), _mono(reference, "reference")
    silent = est.abs().flatten(1).amax(1) == 0
    scores = si_sdr(est, ref).tolist()
    return {"si_sdr": [None if s else v for s, v in zip(silent.tolist(), scores)],
            "mr_stft_distance": multi_resolution_stft_distance(est, ref).tolist(),
            "mel_distance": mel_distance(est, ref, sample_rate=sample_rate).tolist()}


def log_mel_db(x: torch.Tensor, sample_rate: int = 16000, n_fft: int = 1024, hop: int = 160, n_mels: int = 80) -> torch.Tensor:
    """Log-mel power spectrogram in dB (floor -100 dB) of mono ``(T,)`` audio, ``(n_mels, frames)``; for plots."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    return 10 * torch.log10(mel(x.float().reshape(-1)).clamp_min(1e-10))


def save_mel_comparison(path: str, rows: list[tuple[str, list[torch.Tensor]]], sample_rate: int = 16000) -> str:
    """A PNG grid of log-mel spectrograms: one row per clip, one column per version.
    ``rows`` is ``[(column_title, [clip_0, clip_1, ...]), ...]`` with mono clips ``(T,)`` or ``(1, T)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows or not rows[0][1]:
        raise ValueError("save_mel_comparison: nothing to plot")
    num_clips, num_cols = len(rows[0][1]), len(rows)
    fig, axes = plt.subplots(num_clips, num_cols, figsize=(3.2 * num_cols, 2.0 * num_clips), squeeze=False)
    for col, (title, clips) in enumerate(rows):
        for row, clip in enumerate(clips):
            spec = log_mel_db(clip, sample_rate).numpy()
            ax = axes[row][col]
            ax.imshow(spec, origin="lower", aspect="auto", vmin=spec.max() - 80, vmax=spec.max(), cmap="magma",
                      extent=(0, clip.shape[-1] / sample_rate, 0, spec.shape[0]))
            ax.set_title(f"{title} #{row}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("s", fontsize=6)
            ax.set_ylabel("mel bin", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
