"""Codebook statistics of a discrete tokenizer: per-codebook histograms, usage, perplexity, bitrate."""
from __future__ import annotations

import math

import torch

__all__ = ["code_histograms", "usage_metrics", "token_rate"]


def code_histograms(model, indices: torch.Tensor) -> list[torch.Tensor]:
    """One histogram per codebook (per RVQ stage; one for FSQ / VQ / multi-scale)."""
    size = model.quantize_layer.codebook_size if hasattr(model.quantize_layer, "codebook_size") else model.config.codebook_size
    if model.config.quantizer in ("rvq", "rfsq"):
        stages = model.quantize_layer.stages
        return [torch.bincount(indices[..., s][indices[..., s] >= 0].flatten(), minlength=stages[s].codebook_size)
                for s in range(indices.shape[-1])]
    return [torch.bincount(indices.flatten(), minlength=int(size))]


def usage_metrics(histograms: list[torch.Tensor]) -> dict:
    """Usage (fraction of codes hit) and perplexity (exp of the whole-set code entropy), per codebook and averaged."""
    usages, perplexities = [], []
    for h in histograms:
        p = h.double() / h.sum().clamp_min(1)
        usages.append(float((h > 0).double().mean()))
        perplexities.append(float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum())))
    metrics = {"codebook_usage": sum(usages) / len(usages), "perplexity": sum(perplexities) / len(perplexities),
               "codebook_size": int(histograms[0].numel())}
    if len(histograms) > 1:
        metrics["usage_per_codebook"] = usages
        metrics["perplexity_per_codebook"] = perplexities
    return metrics


def token_rate(model, sample_rate: int) -> dict:
    """Frames per second and, for discrete tokenizers, bits per frame (``sum_stages log2 codebook_size``)
    and the bitrate ``frames/s * bits/frame`` of an audio tokenizer."""
    frames = sample_rate / model.downsample_factor
    out = {"frames_per_second": frames}
    config = model.config
    if "quantizer" in config:
        if config.quantizer in ("rvq", "rfsq"):
            sizes = [stage.codebook_size for stage in model.quantize_layer.stages]
        else:
            sizes = [int(getattr(model.quantize_layer, "codebook_size", config.codebook_size))]
        out["bits_per_frame"] = float(sum(math.log2(n) for n in sizes))
        out["bitrate_bps"] = frames * out["bits_per_frame"]
    else:
        out["latent_channels"] = int(config.latent_channels)
        out["floats_per_second"] = frames * int(config.latent_channels)
    return out
