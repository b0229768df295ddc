"""Reconstruction metrics of a trained tokenizer (``evaluate_tokenizer``), images and audio.

Images: PSNR, SSIM and LPIPS (Zhang et al. 2018) per image, averaged. Audio: SI-SDR, multi-resolution
STFT and log-mel distances (``genmod.evals.audio``), DAC's multi-scale mel distance (Kumar et al. 2023,
Sec. 3.4) and reference codecs at known bitrates. Discrete tokenizers add codebook usage and
perplexity (:mod:`genmod.tokenizer.codebook`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from genmod.tokenizers_vq.losses import MultiScaleMelLoss, PerceptualLoss
from genmod.tokenizers_vq.models.common import batch_input

from .codebook import code_histograms, token_rate, usage_metrics

__all__ = ["evaluate_tokenizer", "evaluate_image_tokenizer", "evaluate_audio_tokenizer", "load_eval_dataset"]


# ---------------------------------------------------------------------------- shared pieces
def _add_histograms(model, indices: Optional[torch.Tensor], histograms: Optional[list]) -> Optional[list]:
    """Running per-codebook histograms (None while the tokenizer is continuous)."""
    if indices is None:
        return histograms
    hists = code_histograms(model, indices)
    return hists if histograms is None else [a + b for a, b in zip(histograms, hists)]


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _extend(store: dict, values: dict) -> None:
    for key, vals in values.items():
        store.setdefault(key, []).extend(vals)


def _write_metrics(out_dir: str, metrics: dict) -> None:
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


# ---------------------------------------------------------------------------- images
def _lpips_or_none(enabled: bool, net: str, device):
    """LPIPS-``net`` when asked for and its weights are available, else None."""
    if not enabled:
        return None
    try:
        return PerceptualLoss(net=net).to(device)
    except RuntimeError:
        return None


def _save_side_by_side(out_dir: str, shown: list[tuple], num_show: int) -> None:
    """``reconstructions.png``: each input next to its reconstruction."""
    from genmod.data.io import save_image_grid

    x_BCHW = torch.cat([pair[0] for pair in shown])[:num_show]
    x_hat_BCHW = torch.cat([pair[1] for pair in shown])[:num_show]
    grid = torch.cat([x_BCHW, x_hat_BCHW], dim=-1)
    save_image_grid(grid, os.path.join(out_dir, "reconstructions.png"), nrow=max(1, int(math.sqrt(len(grid)))))


@torch.no_grad()
def evaluate_image_tokenizer(model, dataset, out_dir: str, num_samples: int, batch_size: int = 64, num_show: int = 8,
                             lpips: bool = True, lpips_net: str = "alex") -> dict:
    """PSNR / SSIM / LPIPS averaged over the first ``num_samples`` images, codebook usage, a side-by-side PNG."""
    from genmod.evals.recon import psnr as psnr_fn, ssim as ssim_fn

    device = next(model.parameters()).device
    lpips_fn = _lpips_or_none(lpips, lpips_net, device)
    sums: dict[str, float] = {}
    histograms, shown = None, []
    for start in tqdm(range(0, num_samples, batch_size), desc="eval tokenizer", leave=False):
        # 1) reconstruct one batch
        items = [dataset[i] for i in range(start, min(start + batch_size, num_samples))]
        x_BCHW = torch.stack([batch_input(item, "image") for item in items]).to(device)
        out = model(x_BCHW)
        x_hat_BCHW = out.sample.clamp(-1, 1)
        # 2) per-image scores, summed over the set
        sums["psnr"] = sums.get("psnr", 0.0) + float(psnr_fn(x_BCHW, x_hat_BCHW).sum())
        sums["ssim"] = sums.get("ssim", 0.0) + float(ssim_fn(x_BCHW, x_hat_BCHW).sum())
        if lpips_fn is not None:
            key = f"lpips_{lpips_net}"
            sums[key] = sums.get(key, 0.0) + float(lpips_fn(x_BCHW, x_hat_BCHW)) * x_BCHW.shape[0]
        # 3) code histogram and the first pairs to show
        histograms = _add_histograms(model, out.indices, histograms)
        if len(shown) * batch_size < num_show:
            shown.append((x_BCHW[:num_show].cpu(), x_hat_BCHW[:num_show].cpu()))
    metrics = {k: v / num_samples for k, v in sums.items()}
    metrics["num_samples"] = num_samples
    if histograms is not None:
        metrics.update(usage_metrics(histograms))
    _write_metrics(out_dir, metrics)  # numbers first, so a failing image writer cannot lose them
    _save_side_by_side(out_dir, shown, num_show)
    return metrics


# ---------------------------------------------------------------------------- audio
@dataclass
class _AudioTally:
    """What the audio evaluation collects batch by batch."""

    scores: dict = field(default_factory=dict)
    base_scores: dict = field(default_factory=dict)
    base_bitrates: dict = field(default_factory=dict)
    histograms: Optional[list] = None
    shown_in: list = field(default_factory=list)
    shown_out: list = field(default_factory=list)


def _hop_clips(dataset, num_samples: int, hop: int) -> list[torch.Tensor]:
    """The first ``num_samples`` clips ``(C, T)``, each cut (or padded) to a whole number of hops."""
    clips = []
    for i in range(num_samples):
        x_CT = batch_input(dataset[i], "audio")
        length = max(hop, x_CT.shape[-1] // hop * hop)
        clips.append(F.pad(x_CT, (0, max(0, length - x_CT.shape[-1])))[..., :length])
    return clips


def _equal_length_groups(clips: list[torch.Tensor], batch_size: int) -> list[list[torch.Tensor]]:
    """Runs of equal-length clips, at most ``batch_size`` each (so each run stacks into one batch)."""
    groups, current = [], []
    for clip in clips:
        if current and (clip.shape[-1] != current[0].shape[-1] or len(current) == batch_size):
            groups.append(current)
            current = []
        current.append(clip)
    groups.append(current)
    return groups


def _score_audio_batch(model, x_BCT: torch.Tensor, sample_rate: int, multiscale_mel, tally: _AudioTally,
                       baselines: bool, num_show: int) -> None:
    """Reconstruct one batch and add its per-clip scores (and the baselines') to ``tally``."""
    from genmod.evals.audio import audio_baselines, reconstruction_scores

    out = model(x_BCT)
    x_hat_BCT = out.sample.clamp(-1, 1)
    _extend(tally.scores, reconstruction_scores(x_hat_BCT.cpu(), x_BCT.cpu(), sample_rate))
    tally.scores.setdefault("multiscale_mel_distance", []).extend(
        float(multiscale_mel(x_BCT[i:i + 1], x_hat_BCT[i:i + 1])) for i in range(len(x_BCT)))
    if baselines:
        for name, (y, bitrate) in audio_baselines(x_BCT.cpu(), sample_rate).items():
            tally.base_bitrates[name] = bitrate
            _extend(tally.base_scores.setdefault(name, {}), reconstruction_scores(y, x_BCT.cpu(), sample_rate))
    tally.histograms = _add_histograms(model, out.indices, tally.histograms)
    for i in range(len(x_BCT)):
        if len(tally.shown_in) < num_show:
            tally.shown_in.append(x_BCT[i].cpu())
            tally.shown_out.append(x_hat_BCT[i].cpu())


def _audio_metrics(model, tally: _AudioTally, clips: list, sample_rate: int, baselines: bool) -> dict:
    metrics = {key: _mean(vals) for key, vals in tally.scores.items()}
    metrics["num_samples"] = len(clips)
    metrics["seconds"] = sum(c.shape[-1] for c in clips) / sample_rate
    metrics["sample_rate"] = sample_rate
    metrics.update(token_rate(model, sample_rate))
    if tally.histograms is not None:
        metrics.update(usage_metrics(tally.histograms))
    if baselines:
        metrics["baselines"] = {name: {"bitrate_bps": tally.base_bitrates[name], **{k: _mean(v) for k, v in vals.items()}}
                                for name, vals in tally.base_scores.items()}
    return metrics


def _write_audio_examples(out_dir: str, tally: _AudioTally, sample_rate: int) -> None:
    """``input_XX.wav`` / ``recon_XX.wav`` and ``mel_spectrograms.png`` (inputs vs reconstructions)."""
    from genmod.evals.audio import save_mel_comparison
    from genmod.data.io import save_wav

    for i in range(len(tally.shown_in)):
        save_wav(os.path.join(out_dir, f"input_{i:02d}.wav"), tally.shown_in[i], sample_rate)
        save_wav(os.path.join(out_dir, f"recon_{i:02d}.wav"), tally.shown_out[i], sample_rate)
    count = min(4, len(tally.shown_in))
    save_mel_comparison(os.path.join(out_dir, "mel_spectrograms.png"),
                        [("input", tally.shown_in[:count]), ("reconstruction", tally.shown_out[:count])], sample_rate)


@torch.no_grad()
def evaluate_audio_tokenizer(model, dataset, out_dir: str, num_samples: int = 1000, batch_size: int = 64,
                             num_show: int = 8, baselines: bool = True) -> dict:
    """Audio reconstruction metrics (see :func:`evaluate_tokenizer`) on clips at their own lengths (cut
    to a multiple of the hop; clips of different lengths are run one at a time).

    Per clip, averaged: SI-SDR (dB), multi-resolution STFT distance and 80-band log-mel distance
    (``genmod.evals.audio``), and DAC's multi-scale mel distance (the training loss). With ``baselines`` the same
    numbers for silence and resampled mu-law codecs (``genmod.evals.audio.DEFAULT_BASELINES``) on the same
    clips, so the tokenizer's numbers can be read against known bitrates. Writes ``metrics.json``,
    ``input_XX.wav`` / ``recon_XX.wav`` and ``mel_spectrograms.png`` (inputs vs reconstructions)."""
    device = next(model.parameters()).device
    sample_rate = int(getattr(dataset, "sample_rate", 16000))
    multiscale_mel = MultiScaleMelLoss(sample_rate).to(device)
    clips = _hop_clips(dataset, num_samples, model.downsample_factor)
    tally = _AudioTally()
    for group in tqdm(_equal_length_groups(clips, batch_size), desc="eval tokenizer", leave=False):
        _score_audio_batch(model, torch.stack(group).to(device), sample_rate, multiscale_mel, tally, baselines, num_show)
    metrics = _audio_metrics(model, tally, clips, sample_rate, baselines)
    _write_metrics(out_dir, metrics)
    _write_audio_examples(out_dir, tally, sample_rate)
    return metrics


# ---------------------------------------------------------------------------- entry point
@torch.no_grad()
def evaluate_tokenizer(model, dataset, out_dir: str, num_samples: int = 1000, batch_size: int = 64,
                       num_show: int = 8, lpips: bool = True, lpips_net: str = "alex", baselines: bool = True) -> dict:
    """Reconstruction metrics of ``model`` on the first ``num_samples`` items of ``dataset``.

    Images (:func:`evaluate_image_tokenizer`): PSNR, SSIM, LPIPS-``lpips_net`` (when its weights are
    available); audio (:func:`evaluate_audio_tokenizer`): SI-SDR, multi-resolution STFT distance, mel
    distances, frames/s and bitrate, and the same numbers for reference codecs (``baselines``). Discrete
    tokenizers: codebook usage (fraction of codes used over the whole set) and perplexity (exp of the
    entropy of the whole-set code histogram), per codebook (RVQ stage) and averaged.
    Writes ``metrics.json`` and ``reconstructions.png`` (or ``input_XX.wav`` / ``recon_XX.wav`` and
    ``mel_spectrograms.png``) into ``out_dir`` and returns the metrics.
    """
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    num_samples = min(num_samples, len(dataset))
    if num_samples <= 0:
        raise ValueError(f"evaluate_tokenizer: dataset is empty or num_samples={num_samples}")
    if model.config.modality == "audio":
        return evaluate_audio_tokenizer(model, dataset, out_dir, num_samples, batch_size, num_show, baselines)
    return evaluate_image_tokenizer(model, dataset, out_dir, num_samples, batch_size, num_show, lpips, lpips_net)


def load_eval_dataset(name: str, split: str, modality: str, duration: Optional[float] = None):
    """The evaluation set: for audio, clips at their own lengths (``duration=None``) when the dataset
    takes a ``duration`` (speech digits, audio folders) instead of zero-padded to a fixed length."""
    from genmod.data import get_dataset

    if modality == "audio":
        try:
            return get_dataset(name, split=split, duration=duration)
        except TypeError:  # a dataset without a duration argument (tones): its own fixed length
            pass
    return get_dataset(name, split=split)
