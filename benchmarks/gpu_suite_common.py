"""Shared pieces of benchmarks/gpu_suite.py: time budgets, synchronised step timing, peak memory,
FLOP counts (FlopCounterMode and the FlowTransformer's analytic count) and the bf16 peak table.

Timing rule: warm-up steps run first and are not timed; the clock starts after a device
synchronisation and stops after another, so queued GPU work is inside the interval.
"""

from __future__ import annotations

import gc
import math
import time

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s. Checked in order,
# by substring of torch.cuda.get_device_name(); an unknown GPU gets no MFU (None).
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / "H100 80GB HBM3"
    ("A100", 312e12),
)


def peak_bf16_flops(device_name: str | None) -> float | None:
    """Datasheet dense bf16 FLOP/s of the named GPU, or None when the table does not know it."""
    for key, flops in PEAK_BF16_FLOPS:
        if device_name and key.lower() in device_name.lower():
            return flops
    return None


class Budget:
    """A wall-clock deadline, never later than its parent's (the global budget)."""

    def __init__(self, seconds: float, parent: "Budget | None" = None):
        deadline = time.perf_counter() + seconds
        self.deadline = min(deadline, parent.deadline) if parent is not None else deadline

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def expired(self) -> bool:
        return self.left() <= 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int, budget: Budget) -> dict:
    """Run ``step()`` ``warmup`` times untimed, then up to ``steps`` timed (at least one, fewer when the
    budget ends first); seconds per timed step between two synchronisations."""
    for _ in range(warmup):
        step()
    sync(device)
    start, done = time.perf_counter(), 0
    while done < steps:
        step()
        done += 1
        if budget.expired():
            break
    sync(device)
    elapsed = time.perf_counter() - start
    return {"timed_steps": done, "seconds_per_step": elapsed / done, "truncated": done < steps}


def reset_memory(device: torch.device) -> None:
    """Free what the last case left and restart the peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def count_flops(fn, device: torch.device) -> int:
    """FLOPs of the matrix products (mm, bmm, conv, attention) that ``fn()`` runs, forward and backward.

    FlopCounterMode knows the CUDA attention kernels (flash, memory-efficient, cuDNN) but not the CPU
    fused one, so on CPU attention runs through the math path (plain bmm) while counting."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    kernels = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
    with kernels, FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flow_transformer_train_flops(config, batch: int, height: int, width: int) -> int:
    """Matrix-product FLOPs of one training step (forward + backward) of ``genmod.flow.FlowTransformer``.

    Per token (T tokens of width D, depth L, MLP width M): q, k, v, out and the MLP, 3 x 2 x params
    (forward, grad input, grad weight); attention 12 T^2 D per layer (QK^T, PV forward; four
    products backward). Per sample: the adaLN linears on SiLU(c) and the timestep MLP (its first
    layer's input needs no gradient). The patch-embedding conv computes no input gradient: 2 x 2.
    """
    d, layers, p = config.hidden_size, config.depth, config.patch_size
    mlp = int(d * config.mlp_ratio)
    patch_in = config.in_channels * p * p
    out = patch_in * (2 if config.learn_sigma else 1)
    tokens = (height // p) * (width // p)
    freq = 256  # TimestepEmbedder's frequency_embedding_size
    per_token_params = layers * (4 * d * d + 2 * d * mlp) + d * out
    per_sample_params = layers * 6 * d * d + 2 * d * d + d * d  # block adaLN, final adaLN, timestep MLP layer 2
    flops = 6 * batch * tokens * per_token_params + 6 * batch * per_sample_params
    flops += 4 * batch * tokens * patch_in * d + 4 * batch * freq * d  # no input gradient for these two
    flops += 12 * batch * layers * tokens * tokens * d
    return flops


def mfu(flops_per_step: int | None, seconds_per_step: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak; None without a peak or a count."""
    if not peak or not flops_per_step or not math.isfinite(seconds_per_step) or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak
