"""LatentLM inference: next-token diffusion for latent spans, next-token prediction for text.

Latents (Sun et al. 2024, Sec. 2.2 and the released ``sample_hf.py``): the decoder runs on the prompt
once, then one latent at a time with a KV cache. For each latent the diffusion head is solved from
noise to data with DPM-Solver++(2M) in ``num_head_steps`` steps. ``temperature`` is genmod's own knob:
it scales the initial noise of that deterministic ODE solve (``x_1 = temperature * eps``), nothing else.
The released LatentLM has no temperature; MAR's (Li et al. 2024) is a different thing, a factor on the
per-step noise of its ancestral DDPM head sampler, which an ODE solve does not have. At 1 all agree.
Classifier-free guidance runs the conditional and the null-condition
sequences as one batch, both fed the same sampled latent, and mixes the head outputs
``u + w (c - u)`` (package convention, w = 1 is off). Text: greedy / top-k / top-p next-token
sampling at discrete positions (captioning). ``use_kv_cache=False`` recomputes the whole sequence at
every step (the reference the cache is tested against, and the benchmark's baseline).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from genmod.core.paths import get_path
from genmod.latentlm.text import EOS, LATENT, PAD, pack_sequences
from genmod.samplers import combine_guidance, get_time_grid, sample_logits, sample_ode
from genmod.samplers.scheduled import solve_with_scheduler


def randn_per_sample(shape: Sequence[int], generator, batch: int, device) -> torch.Tensor:
    """``[batch, *shape]`` normals from one generator or a list of one per sample."""
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {batch}")
        return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn((batch, *shape), generator=generator, device=gen_device).to(device)


def sample_head(model, hidden: torch.Tensor, num_steps: int, guidance_scale: float = 1.0, temperature: float = 1.0,
                generator=None, do_cfg: bool = False, noise: Optional[torch.Tensor] = None, scheduler=None,
                guidance_interval: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """One latent per row of ``hidden [R, C]`` (``R = 2B`` with CFG: conditional rows first) -> ``[B, D]``.

    Solves the head's probability-flow ODE on the model's path with DPM-Solver++(2M) over a uniform
    ``num_steps`` grid from t = 1 to 0; the head's output is guided in its own prediction space
    (linear, so equal to guiding the velocity) and converted to a velocity with ``path.convert``.
    ``scheduler``: a diffusers flow scheduler solving instead (``genmod.samplers.scheduled``);
    ``guidance_interval=(lo, hi)``: CFG only for t in [lo, hi] (Kynkaanniemi et al. 2024), conditional rows elsewhere.
    """
    cfg = model.config
    path = get_path(cfg.path)
    batch = hidden.shape[0] // 2 if do_cfg else hidden.shape[0]
    if noise is None:
        noise = randn_per_sample((model.token_dim,), generator, batch, hidden.device)
    x = temperature * noise.to(hidden.dtype)

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guided = do_cfg and (guidance_interval is None or guidance_interval[0] <= float(t[0]) <= guidance_interval[1])
        if do_cfg and not guided:
            out = model.head(x_t, path.network_timestep(t), hidden[:batch])
        elif guided:
            out = model.head(torch.cat([x_t, x_t]), path.network_timestep(torch.cat([t, t])), hidden)
            cond, uncond = out.chunk(2)
            out = combine_guidance(cond, uncond, guidance_scale)
        else:
            out = model.head(x_t, path.network_timestep(t), hidden)
        if cfg.prediction != "velocity":
            out = path.convert(out, x_t, t, src=cfg.prediction, dst="velocity")
        return out

    if scheduler is not None:
        return solve_with_scheduler(scheduler, velocity, x, int(num_steps))[0]
    grid = get_time_grid("uniform", int(num_steps))
    return sample_ode(velocity, x, grid, method="dpm_solver_pp_2m", path=path)


@torch.no_grad()
def generate_latents(model, prompts: list[list[int]], null_prompts: Optional[list[list[int]]] = None,
                     num_head_steps: int = 10, guidance_scale: float = 1.0, temperature: float = 1.0,
                     generator=None, use_kv_cache: bool = True, progress: bool = False, scheduler=None,
                     guidance_interval: Optional[tuple[float, float]] = None, on_latent=None) -> torch.Tensor:
    """Latent tokens ``[B, L, D]`` following each prompt (id lists ending with ``<bol>``).

    ``scheduler`` / ``guidance_interval``: see ``sample_head``; ``on_latent(i, z [B, D])`` after each head
    solve may return a replacement for the latent before the decoder reads it.

    ``null_prompts`` (same count) are the unconditional prefixes for CFG (``<bos> <bol>`` for text,
    ``<bos> <null> <bol>`` for classes); guidance is off when absent or ``guidance_scale == 1``.
    """
    device = next(model.parameters()).device
    dim, num_latents = model.token_dim, model.num_latent_tokens
    do_cfg = null_prompts is not None and guidance_scale != 1.0
    if do_cfg and len(null_prompts) != len(prompts):
        raise ValueError(f"null_prompts: expected {len(prompts)}, got {len(null_prompts)}")
    rows = list(prompts) + (list(null_prompts) if do_cfg else [])
    packed = pack_sequences([[p] for p in rows], None, dim, left_pad=True, device=device)
    tokens, seq_latents, is_latent = packed.tokens, packed.latents, packed.is_latent
    key_mask, positions = packed.valid, packed.positions
    padded = not bool(key_mask.all())
    caches = model.make_kv_caches() if use_kv_cache else None
    hidden = model(tokens, positions=positions, key_mask=key_mask if padded else None, kv_caches=caches).hidden_states[:, -1]
    generated = []
    steps = range(num_latents)
    for i in tqdm(steps, desc="latents", leave=False, disable=not progress):
        z = sample_head(model, hidden, num_head_steps, guidance_scale, temperature, generator, do_cfg,
                        scheduler=scheduler, guidance_interval=guidance_interval)
        if on_latent is not None:
            replaced = on_latent(i, z)
            z = z if replaced is None else replaced
        generated.append(z)
        if i == num_latents - 1:
            break
        z_in = torch.cat([z, z]) if do_cfg else z
        new_token = torch.full((len(rows), 1), PAD, dtype=torch.long, device=device)
        new_pos = positions[:, -1:] + 1
        new_latent = torch.ones(len(rows), 1, dtype=torch.bool, device=device)
        tokens, positions = torch.cat([tokens, new_token], 1), torch.cat([positions, new_pos], 1)
        is_latent = torch.cat([is_latent, new_latent], 1)
        seq_latents = torch.cat([seq_latents, z_in[:, None].to(seq_latents.dtype)], 1)
        key_mask = torch.cat([key_mask, new_latent], 1)
        if use_kv_cache:
            out = model(new_token, z_in[:, None], new_latent, positions=new_pos,
                        key_mask=key_mask if padded else None, kv_caches=caches)
        else:
            out = model(tokens, seq_latents, is_latent, positions=positions, key_mask=key_mask if padded else None)
        hidden = out.hidden_states[:, -1]
    return torch.stack(generated, dim=1)


def _sample_ids(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.stack([sample_logits(logits[i:i + 1], temperature, top_k, top_p, generator=g)[0]
                            for i, g in enumerate(generator)])
    return sample_logits(logits, temperature, top_k, top_p, generator=generator)


@torch.no_grad()
def generate_text(model, segments: list[list], latents: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  generator=None, use_kv_cache: bool = True) -> list[list[int]]:
    """Continue each sequence (segments: id lists and ``LATENT`` spans filled from ``latents [B, L, D]``)
    with discrete tokens until ``<eos>`` or ``max_new_tokens``; ``temperature=0`` is greedy."""
    device = next(model.parameters()).device
    packed = pack_sequences(segments, latents, model.token_dim, left_pad=True, device=device)
    tokens, seq_latents, is_latent = packed.tokens, packed.latents, packed.is_latent
    key_mask, positions = packed.valid, packed.positions
    padded = not bool(key_mask.all())
    caches = model.make_kv_caches() if use_kv_cache else None
    logits = model(tokens, seq_latents, is_latent, positions=positions, key_mask=key_mask if padded else None,
                   kv_caches=caches).logits[:, -1]
    batch = tokens.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(max_new_tokens):
        ids = _sample_ids(logits.float(), temperature, top_k, top_p, generator).to(device)
        for b in range(batch):
            if not finished[b]:
                out[b].append(int(ids[b]))
        finished |= ids == EOS
        if bool(finished.all()):
            break
        ids = ids.masked_fill(finished, PAD)
        new_pos = positions[:, -1:] + 1
        not_latent = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        tokens, positions = torch.cat([tokens, ids[:, None]], 1), torch.cat([positions, new_pos], 1)
        is_latent = torch.cat([is_latent, not_latent], 1)
        seq_latents = torch.cat([seq_latents, seq_latents.new_zeros(batch, 1, seq_latents.shape[-1])], 1)
        key_mask = torch.cat([key_mask, ~not_latent], 1)
        if use_kv_cache:
            logits = model(ids[:, None], positions=new_pos, key_mask=key_mask if padded else None, kv_caches=caches).logits[:, -1]
        else:
            logits = model(tokens, seq_latents, is_latent, positions=positions, key_mask=key_mask if padded else None).logits[:, -1]
    return out


__all__ = ["generate_latents", "generate_text", "sample_head", "randn_per_sample", "LATENT"]
