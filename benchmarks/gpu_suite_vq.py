"""Case 3 of benchmarks/gpu_suite.py: VQ forward + backward, genmod's VectorQuantizer against
vector-quantize-pytorch's VectorQuantize in the same process, on the same input.

Both: fp32, EMA codebook update (decay 0.99), straight-through gradient, no k-means init, training
mode; one step = forward, ``(z_q^2).mean() + aux loss``, backward, as in
benchmarks/quantizers_vs_vqtorch.py. The peer is optional (the ``bench`` extra); when it is not
installed its numbers are None and ``peer_skipped`` says why. Each side's peak memory is measured on
its own (the counter is reset between them).
"""

from __future__ import annotations

import torch

from gpu_suite_common import Budget, peak_memory, reset_memory, time_steps


def build_quantizer(impl: str, dim: int, codes: int):
    if impl == "genmod":
        from genmod.tokenizers_vq.quantizers import VectorQuantizer

        return VectorQuantizer(dim, codes, codebook_update="ema", ema_decay=0.99, gradient="ste")
    import vector_quantize_pytorch as vqp

    return vqp.VectorQuantize(dim=dim, codebook_size=codes, decay=0.99)


def vq_step_fn(impl: str, module, x: torch.Tensor):
    def step():
        out = module(x)
        if impl == "genmod":
            z_q, aux = out.z_q, out.loss
        else:
            z_q, aux = out[0], out[2].sum()
        (z_q.square().mean() + aux).backward()

    return step


def time_quantizer(impl: str, spec: dict, device: torch.device, budget: Budget) -> dict:
    """Seconds per forward + backward and peak memory of one implementation."""
    reset_memory(device)
    torch.manual_seed(0)
    module = build_quantizer(impl, spec["dim"], spec["codes"]).train().to(device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(spec["batch"], spec["tokens"], spec["dim"], device=device, generator=g).requires_grad_(True)
    timing = time_steps(vq_step_fn(impl, module, x), device, spec["warmup"], spec["steps"], budget)
    tokens = spec["batch"] * spec["tokens"]
    return {"tokens_per_s": tokens / timing["seconds_per_step"], "peak_memory_bytes": peak_memory(device), **timing}


def peer_missing() -> str | None:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError as err:
        return f"vector-quantize-pytorch not installed ({err}); pip install -e '.[bench]'"
    return None


def vq_vs_peer(spec: dict, device: torch.device, budget: Budget, peak: float | None = None) -> dict:
    """genmod and (when installed) the peer at one codebook size; ratio = genmod tokens/s over the peer's."""
    ours = time_quantizer("genmod", spec, device, budget)
    result = {"codes": spec["codes"], "dim": spec["dim"], "tokens": spec["batch"] * spec["tokens"],
              "genmod": ours, "peer": None, "peer_skipped": peer_missing(), "peer_error": None,
              "ratio_genmod_over_peer": None}
    if result["peer_skipped"] is None:
        try:
            result["peer"] = time_quantizer("vector-quantize-pytorch", spec, device, budget)
            result["ratio_genmod_over_peer"] = ours["tokens_per_s"] / result["peer"]["tokens_per_s"]
        except Exception as err:  # the peer failing (out of memory at 100k codes, say) is a result, not a crash
            result["peer_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return result
