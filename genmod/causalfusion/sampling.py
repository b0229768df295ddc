"""CausalFusion sampling: AR steps over token subsets, an ODE solve per step, a KV cache for the prefix.

Deng et al. 2024 (arXiv 2412.12095), dual factorization: generation walks the dual factorization. The tokens are visited in an order
(random per sample by default, as in training, or raster) and split into ``num_ar_steps`` subsets.
For AR step s the noisy tokens of that subset are denoised jointly from t = 1 to t = 0 with any
``samplers`` ODE solver, seeing the condition tokens and the clean tokens of steps < s; the result is
then appended to the clean prefix. N = 1 is plain diffusion (all tokens at once); N = number of tokens
is pure autoregression (one token per step). With ``use_cache`` the prefix lives in per-layer KV
caches (each clean step is pushed once); without it every network call re-runs the whole
``[cond | clean prefix | noisy step]`` sequence under the generalized causal mask (same numbers).

Zero-shot editing (the paper's in-context in-/out-painting): tokens given in ``known_tokens`` / ``known_mask`` form a
clean prefix block before the first AR step, so the remaining tokens are generated conditioned on them.

Classifier-free guidance ``v_u + w (v_c - v_u)`` (docs/DESIGN.md §1) runs the conditional and the
null-class batch together; the cache holds both halves and is viewed as the conditional half where the
guidance interval switches guidance off.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from genmod.core.paths import AffinePath, get_path
from genmod.nn.attention import KVCache
from samplers import classifier_free_guidance, get_time_grid, sample_ode


def even_step_sizes(num_tokens: int, num_ar_steps: int) -> list[int]:
    """``num_tokens`` split into ``num_ar_steps`` contiguous sizes differing by at most one (larger first)."""
    if not 1 <= num_ar_steps <= num_tokens:
        raise ValueError(f"num_ar_steps: must be in [1, {num_tokens}] (number of tokens), got {num_ar_steps}")
    base, extra = divmod(num_tokens, num_ar_steps)
    return [base + (1 if i < extra else 0) for i in range(num_ar_steps)]


def _per_sample_generators(generator, batch: int) -> list:
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {batch}")
        return list(generator)
    return [generator] * batch


def draw_noise_and_order(batch: int, num_tokens: int, token_dim: int, generator=None, order: str = "random",
                         device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise ``[B, L, token_dim]`` (raster layout) and token orders ``[B, L]``, one draw per sample.

    With a list of generators sample i depends only on ``generator[i]`` (reproducible alone).
    """
    if order not in ("random", "raster"):
        raise ValueError(f"order: expected 'random' or 'raster', got {order!r}")
    noises, orders = [], []
    for gen in _per_sample_generators(generator, batch):
        gen_device = gen.device if gen is not None else torch.device("cpu")
        noises.append(torch.randn((num_tokens, token_dim), generator=gen, device=gen_device, dtype=dtype))
        if order == "random":
            orders.append(torch.argsort(torch.rand(num_tokens, generator=gen, device=gen_device)))
        else:
            orders.append(torch.arange(num_tokens, device=gen_device))
    return torch.stack(noises).to(device), torch.stack(orders).to(device)


def _known_first(order: torch.Tensor, known_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reorder each row of ``order`` so the known tokens come first (keeping the relative order)."""
    counts = known_mask.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"known_mask: every sample needs the same number of known tokens, got {counts.tolist()}")
    unknown_rank = (~known_mask).gather(1, order).long()  # 0 for known tokens along the order
    key = unknown_rank * order.shape[1] + torch.arange(order.shape[1], device=order.device)
    return order.gather(1, key.argsort(dim=1)), int(counts[0])


@torch.no_grad()
def sample_tokens(
    model,
    class_labels: torch.Tensor | None,
    batch_size: int,
    num_ar_steps: int = 1,
    step_sizes: Sequence[int] | None = None,
    num_inference_steps: int = 16,
    solver: str = "euler",
    time_grid: str = "uniform",
    path: AffinePath | str = "linear",
    prediction: str = "velocity",
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    generator=None,
    order: str | torch.Tensor = "random",
    known_tokens: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    noise: torch.Tensor | None = None,
    on_ar_step: Callable[[int], None] | None = None,
    return_stats: bool = False,
):
    """Generate ``[B, L, token_dim]`` tokens (raster layout) with a ``CausalFusionTransformer``.

    Args:
        class_labels: ``[B]`` ids (conditional models) or None.
        num_ar_steps / step_sizes: number of AR steps (even split) or explicit sizes summing to the
            number of tokens to generate.
        num_inference_steps, solver, time_grid: the ODE solve of every AR step (``samplers``).
        path, prediction: the path and output type the model was trained with.
        guidance_scale, guidance_interval: CFG weight w (1 = off) and the t-interval where it applies.
        generator: one generator or one per sample (noise and the random order are drawn from it).
        order: ``"random"`` (per sample), ``"raster"`` or an explicit ``[B, L]`` permutation.
        known_tokens, known_mask: zero-shot editing: ``[B, L, token_dim]`` tokens and ``[B, L]`` bool
            (same count per sample) kept as a clean prefix; only the others are generated.
        use_cache: KV cache for the clean prefix (otherwise the full masked sequence every call).
        noise: optional initial noise ``[B, L, token_dim]`` (raster layout) instead of drawing it.
        on_ar_step: called with the AR step index after each step (progress bars).
    Returns the tokens, and with ``return_stats`` a dict with ``nfe`` (noisy-step network calls) and
    ``step_sizes``.
    """
    path = get_path(path)
    device, dtype = model.pos_embed.device, model.pos_embed.dtype
    length, token_dim = model.num_tokens, model.token_dim
    drawn_noise, drawn_order = draw_noise_and_order(batch_size, length, token_dim, generator,
                                                    "random" if not isinstance(order, str) else order, device, dtype)
    noise = drawn_noise if noise is None else noise.to(device=device, dtype=dtype)
    if noise.shape != (batch_size, length, token_dim):
        raise ValueError(f"noise: expected shape {(batch_size, length, token_dim)}, got {tuple(noise.shape)}")
    if not isinstance(order, str):
        drawn_order = torch.as_tensor(order, device=device).long()
        if drawn_order.shape != (batch_size, length) or not (drawn_order.sort(1).values == torch.arange(length, device=device)).all():
            raise ValueError(f"order: expected a permutation of range({length}) per sample, shape ({batch_size}, {length})")
    order_t = drawn_order
    num_known = 0
    tokens = noise.clone()
    if known_mask is not None:
        known_mask = torch.as_tensor(known_mask, device=device).bool()
        if known_mask.dim() == 1:
            known_mask = known_mask.expand(batch_size, -1)
        if known_mask.shape != (batch_size, length):
            raise ValueError(f"known_mask: expected shape ({batch_size}, {length}) or ({length},), got {tuple(known_mask.shape)}")
        if known_tokens is None or tuple(known_tokens.shape) != (batch_size, length, token_dim):
            raise ValueError(f"known_tokens: expected shape {(batch_size, length, token_dim)} with known_mask")
        order_t, num_known = _known_first(order_t, known_mask)
        tokens = torch.where(known_mask[..., None], known_tokens.to(device=device, dtype=dtype), tokens)
    remaining = length - num_known
    if remaining == 0:
        return (tokens, {"nfe": 0, "step_sizes": []}) if return_stats else tokens
    sizes = even_step_sizes(remaining, num_ar_steps) if step_sizes is None else [int(s) for s in step_sizes]
    if sum(sizes) != remaining or any(s <= 0 for s in sizes):
        raise ValueError(f"step_sizes: need positive sizes summing to {remaining} tokens to generate, got {sizes}")

    num_classes = model.config.num_classes
    labels = None
    if num_classes:
        if class_labels is None:
            raise ValueError("class_labels: this model is class-conditional; pass class ids")
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if labels.shape != (batch_size,):
            raise ValueError(f"class_labels: expected {batch_size} labels, got shape {tuple(labels.shape)}")
    elif class_labels is not None:
        raise ValueError("class_labels: this model is unconditional (num_classes=0)")
    do_cfg = labels is not None and guidance_scale != 1.0
    null = torch.full_like(labels, num_classes) if labels is not None else None
    grid = get_time_grid(time_grid, num_inference_steps)

    def gather(x, pos):
        return x.gather(1, pos[..., None].expand(-1, -1, token_dim))

    caches: list[KVCache] | None = None
    if use_cache:
        cache_labels = torch.cat([labels, null]) if do_cfg else labels
        caches = model.prefill_condition(cache_labels, 2 * batch_size if do_cfg else batch_size)

    def commit_clean(clean, pos):
        if do_cfg:
            clean, pos = torch.cat([clean, clean]), torch.cat([pos, pos])
        model.forward_cached(clean, pos, caches, timestep=None, commit=True)

    def cond_half(full: list[KVCache]) -> list[KVCache]:
        views = []
        for c in full:
            view = KVCache()
            if c.key is not None:
                view.key, view.value = c.key[:batch_size], c.value[:batch_size]
            views.append(view)
        return views

    clean_sizes: list[int] = []
    if num_known:
        clean_sizes.append(num_known)
        if use_cache:
            commit_clean(gather(tokens, order_t[:, :num_known]), order_t[:, :num_known])
    start, nfe = num_known, 0
    for step, size in enumerate(sizes):
        pos = order_t[:, start:start + size]
        clean_pos = order_t[:, :start]
        clean_tokens = gather(tokens, clean_pos)
        step_index = len(clean_sizes)

        def model_fn(x, t, y, pos=pos, clean_pos=clean_pos, clean_tokens=clean_tokens, step_index=step_index):
            n = x.shape[0]
            reps = n // batch_size
            pos_n = pos.repeat(reps, 1)
            if use_cache:
                step_caches = caches if (not do_cfg or n == 2 * batch_size) else cond_half(caches)
                out = model.forward_cached(x, pos_n, step_caches, timestep=1000 * t, commit=False)
            else:
                out = model.forward_tokens(x, pos_n, 1000 * t, y, clean_tokens.repeat(reps, 1, 1), clean_pos.repeat(reps, 1),
                                           list(clean_sizes), [x.shape[1]], step_index)
            if prediction != "velocity":
                out = path.convert(out, x, t, src=prediction, dst="velocity")
            return out

        if do_cfg:
            velocity = classifier_free_guidance(model_fn, labels, null, guidance_scale, guidance_interval)
        else:
            velocity = lambda x, t, fn=model_fn: fn(x, t, labels)  # noqa: E731
        x, stats = sample_ode(velocity, gather(tokens, pos), grid, method=solver, path=path, return_stats=True)
        nfe += stats.nfe
        tokens = tokens.scatter(1, pos[..., None].expand(-1, -1, token_dim), x.to(dtype))
        clean_sizes.append(size)
        if use_cache and step < len(sizes) - 1:
            commit_clean(x.to(dtype), pos)
        start += size
        if on_ar_step is not None:
            on_ar_step(step)
    return (tokens, {"nfe": nfe, "step_sizes": sizes}) if return_stats else tokens
