"""Audio metrics: multi-resolution STFT distance, mel distance, SI-SDR, and domain-feature Frechet distance.

Signals are ``(B, N)`` or ``(B, 1, N)`` float tensors (mono).
"""

from __future__ import annotations

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
    """Frechet distance and KID in the embedding of a domain classifier (:mod:`evals.feature_net`)
    trained on the built-in audio data, the offline stand-in for FAD (VGGish needs a download)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    from evals.metrics import frechet_distance

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
