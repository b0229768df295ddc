"""Shared pieces of every quantizer: the output type, fp32 execution, layout helpers, code statistics
and the few collective calls that keep data-dependent codebook edits identical across processes."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class QuantizerOutput(NamedTuple):
    """What every quantizer's ``forward`` returns.

    z_q: quantized tensor, same shape and dtype as the input, carrying the chosen gradient estimator.
    indices: int64 code indices (shape documented per quantizer).
    loss: scalar tensor to add to the training loss (commitment / codebook terms; zero for FSQ).
    stats: floats or tensors for logging: ``usage`` (fraction of codes hit in this batch),
        ``perplexity`` (exp of the entropy of the batch code histogram), ``dead_codes`` and extras.
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict


def fp32_no_autocast(device_type: str):
    """Context that disables autocast: quantizer math (distances, argmin, rounding, index arithmetic)
    must run in fp32, since bf16 holds integers only up to 256 exactly (tokenizers.md §6.3)."""
    if device_type not in ("cuda", "cpu", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layer`` in fp32 whatever dtype its parameters were cast to (avoids the
    'mat1 and mat2 must have the same dtype' family of mixed-precision bugs)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def channel_first_to_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, D, *spatial)`` -> ``(B, *spatial, D)``."""
    if x.ndim < 3:
        raise ValueError(f"channel-first input must be (B, D, ...spatial), got shape {tuple(x.shape)}")
    return x.movedim(1, -1)


def channel_last_to_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, *spatial, D)`` -> ``(B, D, *spatial)``."""
    return x.movedim(-1, 1)


class QuantizerBase(nn.Module):
    """Common interface: channel-last ``forward(z)`` plus a channel-first convenience wrapper."""

    def forward_channel_first(self, z: torch.Tensor, **kwargs) -> QuantizerOutput:
        """Quantize a channel-first map ``(B, D, H, W)`` (or ``(B, D, T)``); ``z_q`` comes back
        channel-first, ``indices`` as ``(B, H, W, ...)`` (trailing dims as the channel-last call)."""
        out = self(channel_first_to_last(z), **kwargs)
        return QuantizerOutput(channel_last_to_first(out.z_q), out.indices, out.loss, out.stats)

    def indices_to_codes_channel_first(self, indices: torch.Tensor) -> torch.Tensor:
        return channel_last_to_first(self.indices_to_codes(indices))


def check_last_dim(z: torch.Tensor, dim: int, name: str) -> None:
    if not torch.is_tensor(z):
        raise TypeError(f"{name}: z must be a tensor, got {type(z).__name__}")
    if z.ndim < 1 or z.shape[-1] != dim:
        raise ValueError(f"{name}: z must be channel-last (..., {dim}), got shape {tuple(z.shape)} "
                         f"(use forward_channel_first for (B, D, H, W) maps)")


def code_histogram_stats(counts: torch.Tensor) -> dict:
    """Usage (fraction of codes hit at least once) and perplexity exp(H(p)) of a code histogram
    (taming's perplexity, tokenizers.md §3.2)."""
    counts = counts.float()
    total = counts.sum().clamp_min(1.0)
    probs = counts / total
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    # 0-d tensors, not Python numbers, so logging does not force a device sync every step
    return {
        "usage": (counts > 0).float().mean(),
        "perplexity": torch.exp(entropy),
        "unused_codes": (counts == 0).sum(),
    }


# ----------------------------------------------------------------------------- distributed helpers

def distributed_world() -> bool:
    """True when torch.distributed runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no-op on a single process)."""
    if distributed_world():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place broadcast of rank 0's values so every process makes the same codebook edit."""
    if distributed_world():
        dist.broadcast(tensor, src=0)
    return tensor
