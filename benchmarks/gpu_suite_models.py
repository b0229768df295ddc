"""Cases 2-3 of benchmarks/gpu_suite.py and the matmul ceiling: one training step of VARTransformer and of
LatentLMTransformer (tokens/s, MFU), and VQ forward + backward, genmod against vector-quantize-pytorch.

A training step here is forward, backward, grad-norm clip at 1.0, AdamW step, ``zero_grad`` and one
``loss.item()``, under bf16 autocast with fp32 weights (no EMA, no trainer). VQ runs in fp32 (both
libraries compute distances in fp32), with the EMA codebook update (decay 0.99) and the
straight-through gradient in both.
"""

from __future__ import annotations

import torch

from gpu_suite_common import Budget, count_flops, mfu, time_steps


def matmul_ceiling(spec: dict, device: torch.device, budget: Budget, peak: float | None) -> dict:
    """bf16 ``n x n x n`` matrix products/s: the measured ceiling MFU numbers can be read against."""
    n = spec["n"]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    timing = time_steps(lambda: a @ b, device, spec["warmup"], spec["steps"], budget)
    flops = 2 * n ** 3
    return {"n": n, "flops_per_product": flops, "tflops": flops / timing["seconds_per_step"] / 1e12,
            "fraction_of_peak": mfu(flops, timing["seconds_per_step"], peak), **timing}


def train_step_fn(model, loss_fn, device: torch.device, precision: str):
    """One bare training step of ``model`` on ``loss_fn(model)`` (fixed inputs captured by ``loss_fn``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(model)
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return forward_backward, step


def measure_step(model, loss_fn, tokens_per_step: int, spec: dict, device: torch.device, budget: Budget,
                 peak: float | None) -> dict:
    """Tokens/s, FLOPs (FlopCounterMode on one forward + backward) and MFU of one training step."""
    forward_backward, step = train_step_fn(model, loss_fn, device, spec["precision"])
    flops = count_flops(forward_backward, device)
    model.zero_grad(set_to_none=True)
    timing = time_steps(step, device, spec["warmup"], spec["steps"], budget)
    seconds = timing["seconds_per_step"]
    return {"params": sum(p.numel() for p in model.parameters()), "batch": spec["batch"],
            "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / seconds,
            "flops_per_step": flops, "mfu": mfu(flops, seconds, peak), "precision": spec["precision"], **timing}


def var_step(spec: dict, device: torch.device, budget: Budget, peak: float | None) -> dict:
    """VARTransformer (teacher-forced logits over all scales, VAR's cross-entropy) on random tokens."""
    from genmod.var.transformer import VARTransformer, var_loss

    torch.manual_seed(0)
    model = VARTransformer(**spec["model"]).to(device).train()
    g = torch.Generator(device=device).manual_seed(0)
    b, length, first = spec["batch"], model.num_tokens, model.first_tokens
    labels = torch.randint(0, model.config.num_classes, (b,), device=device, generator=g)
    inputs = torch.randn(b, length - first, model.config.latent_channels, device=device, generator=g)
    targets = torch.randint(0, model.config.vocab_size, (b, length), device=device, generator=g)

    def loss_fn(m):
        dropout = torch.Generator(device=device).manual_seed(1)
        return var_loss(m(labels, inputs, dropout_generator=dropout).logits, targets)

    out = measure_step(model, loss_fn, b * length, spec, device, budget, peak)
    return {"depth": model.config.depth, "width": model.width, "sequence_length": length, **out}


def latentlm_batch(model, batch: int, device: torch.device):
    """Class-conditional sequences ``<bos> <class> <bol> z_1..z_L <eol> <eos>`` on random latents."""
    from genmod.latentlm.family import item_segments
    from genmod.latentlm.text import LatentLMTokenizer, pack_sequences

    g = torch.Generator().manual_seed(0)
    cfg = model.config
    latents = torch.randn(batch, cfg.latent_channels, *cfg.latent_grid, generator=g)
    tokens = model.latents_to_tokens(latents)
    tok = LatentLMTokenizer(cfg.num_classes)
    segments = [item_segments(tok, "class", label=i % cfg.num_classes) for i in range(batch)]
    return pack_sequences(segments, tokens, tokens.shape[-1], device=device)


def latentlm_step(spec: dict, device: torch.device, budget: Budget, peak: float | None) -> dict:
    """LatentLMTransformer: LM cross-entropy plus the next-token diffusion head (4 noise draws per latent)."""
    from genmod.core.paths import get_path
    from genmod.latentlm.family import next_element_loss
    from genmod.latentlm.text import LatentLMTokenizer
    from genmod.latentlm.transformer import LatentLMTransformer

    torch.manual_seed(0)
    kwargs = dict(spec["model"], vocab_size=LatentLMTokenizer(spec["model"]["num_classes"]).vocab_size)
    model = LatentLMTransformer(**kwargs).to(device).train()
    packed = latentlm_batch(model, spec["batch"], device)
    path = get_path(model.config.path)

    def loss_fn(m):
        generator = torch.Generator(device=device).manual_seed(1)
        return next_element_loss(m, packed, generator, path, m.config.prediction, spec["diffusion_batch_mul"])["loss"]

    out = measure_step(model, loss_fn, packed.tokens.numel(), spec, device, budget, peak)
    return {"depth": model.config.depth, "width": model.config.hidden_size,
            "sequence_length": packed.tokens.shape[1], **out}
