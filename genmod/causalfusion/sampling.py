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

from dataclasses import dataclass
from typing import Callable

import torch

from genmod.core.paths import AffinePath, get_path
from genmod.core.settings import with_options
from genmod.nn.attention import KVCache
from genmod.samplers import SolverStats, classifier_free_guidance, get_time_grid, sample_ddpm, sample_ode
from genmod.samplers.scheduled import solve_with_scheduler


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


ORDERS = ("random", "raster")
PREDICTIONS = ("velocity", "x0", "epsilon")


@dataclass(frozen=True)
class CausalFusionSampling:
    """Settings of one CausalFusion sampling run: the AR axis and the diffusion axis of the dual
    factorization (Deng et al. 2024, Sec. 3), and classifier-free guidance.

    Args:
        num_ar_steps / step_sizes: number of AR steps (even split) or explicit sizes summing to the
            number of tokens to generate.
        num_inference_steps, solver, time_grid: the solve of every AR step (``samplers``): an ODE solver, or
            ``"ddpm"``: ancestral DDPM with fixed-large variance (the official sampler; with ``time_grid="ddpm"``
            ADM's respaced chain, ``path="ddpm_linear"``, ``prediction="epsilon"``).
        path, prediction: the path and output type the model was trained with.
        guidance_scale, guidance_interval: CFG weight w (1 = off) and the t-interval where it applies.
        order: ``"random"`` (per sample), ``"raster"`` or an explicit ``[B, L]`` permutation.
        use_cache: KV cache for the clean prefix (otherwise the full masked sequence every call).
        scheduler: a diffusers flow scheduler that replaces ``solver`` / ``time_grid`` for every AR step's
            solve (``genmod.samplers.scheduled``: FlowMatchEuler, ``FlowMatchSolverScheduler``, DPM/UniPC
            with flow settings), ``num_inference_steps`` steps on its own grid.
    """

    num_ar_steps: int = 1
    step_sizes: tuple[int, ...] | None = None
    num_inference_steps: int = 16
    solver: str = "euler"
    time_grid: str = "uniform"
    path: AffinePath | str = "linear"
    prediction: str = "velocity"
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    order: str | torch.Tensor = "random"
    use_cache: bool = True
    scheduler: object | None = None

    def __post_init__(self):
        if self.num_ar_steps < 1:
            raise ValueError(f"num_ar_steps: must be >= 1, got {self.num_ar_steps}")
        if self.step_sizes is not None:
            object.__setattr__(self, "step_sizes", tuple(int(s) for s in self.step_sizes))
            if not self.step_sizes or any(s <= 0 for s in self.step_sizes):
                raise ValueError(f"step_sizes: need positive sizes, got {list(self.step_sizes)}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: must be >= 1, got {self.num_inference_steps}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if isinstance(self.order, str) and self.order not in ORDERS:
            raise ValueError(f"order: expected 'random' or 'raster', got {self.order!r}")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"guidance_interval: need 0 <= t_lo <= t_hi <= 1, got {self.guidance_interval}")


def _gather(tokens_BLD: torch.Tensor, pos_BN: torch.Tensor) -> torch.Tensor:
    """The tokens at positions ``pos_BN`` of each row: ``[B, N, D]``."""
    return tokens_BLD.gather(1, pos_BN[..., None].expand(-1, -1, tokens_BLD.shape[-1]))


def _noise_and_order(model, batch_size: int, settings: CausalFusionSampling, generator, noise):
    """Initial noise ``[B, L, D]`` (drawn unless given) and the token order ``[B, L]`` (drawn unless explicit)."""
    device, dtype = model.pos_embed.device, model.pos_embed.dtype
    length, token_dim = model.num_tokens, model.token_dim
    order = settings.order
    drawn_noise, drawn_order = draw_noise_and_order(batch_size, length, token_dim, generator,
                                                    order if isinstance(order, str) else "random", device, dtype)
    noise = drawn_noise if noise is None else noise.to(device=device, dtype=dtype)
    if noise.shape != (batch_size, length, token_dim):
        raise ValueError(f"noise: expected shape {(batch_size, length, token_dim)}, got {tuple(noise.shape)}")
    if isinstance(order, str):
        return noise, drawn_order
    order_BL = torch.as_tensor(order, device=device).long()
    if order_BL.shape != (batch_size, length) or not (order_BL.sort(1).values == torch.arange(length, device=device)).all():
        raise ValueError(f"order: expected a permutation of range({length}) per sample, shape ({batch_size}, {length})")
    return noise, order_BL


def _place_known(tokens_BLD, order_BL, known_tokens, known_mask):
    """Zero-shot editing (Deng et al. 2024, in-context editing): known tokens replace their noise and
    move to the front of the order. Returns ``(tokens, order, number of known tokens)``."""
    if known_mask is None:
        return tokens_BLD, order_BL, 0
    batch_size, length, token_dim = tokens_BLD.shape
    known_mask = torch.as_tensor(known_mask, device=tokens_BLD.device).bool()
    if known_mask.dim() == 1:
        known_mask = known_mask.expand(batch_size, -1)
    if known_mask.shape != (batch_size, length):
        raise ValueError(f"known_mask: expected shape ({batch_size}, {length}) or ({length},), got {tuple(known_mask.shape)}")
    if known_tokens is None or tuple(known_tokens.shape) != (batch_size, length, token_dim):
        raise ValueError(f"known_tokens: expected shape {(batch_size, length, token_dim)} with known_mask")
    order_BL, num_known = _known_first(order_BL, known_mask)
    known = known_tokens.to(device=tokens_BLD.device, dtype=tokens_BLD.dtype)
    return torch.where(known_mask[..., None], known, tokens_BLD), order_BL, num_known


def _ar_step_sizes(settings: CausalFusionSampling, remaining: int) -> list[int]:
    """Sizes of the AR steps over the ``remaining`` tokens (the subsets kappa_s of Sec. 3)."""
    if settings.step_sizes is None:
        sizes = even_step_sizes(remaining, settings.num_ar_steps)
    else:
        sizes = list(settings.step_sizes)
    if sum(sizes) != remaining or any(s <= 0 for s in sizes):
        raise ValueError(f"step_sizes: need positive sizes summing to {remaining} tokens to generate, got {sizes}")
    return sizes


def _class_labels(model, class_labels, batch_size: int):
    """Class ids ``[B]`` for a class-conditional model, None for an unconditional one."""
    num_classes = model.config.num_classes
    if not num_classes:
        if class_labels is not None:
            raise ValueError("class_labels: this model is unconditional (num_classes=0)")
        return None
    if class_labels is None:
        raise ValueError("class_labels: this model is class-conditional; pass class ids")
    labels = torch.as_tensor(class_labels, device=model.pos_embed.device).long().reshape(-1)
    if labels.shape != (batch_size,):
        raise ValueError(f"class_labels: expected {batch_size} labels, got shape {tuple(labels.shape)}")
    return labels


class _CleanPrefix:
    """The condition tokens and the clean tokens of the finished AR steps, as the noisy tokens of the
    next step see them under the generalized causal mask (Deng et al. 2024, Sec. 3): pushed once into
    per-layer KV caches (``use_cache``) or kept as tokens for a full masked forward at every call.
    With CFG the caches hold the conditional and the null-class halves."""

    def __init__(self, model, labels, batch_size: int, settings: CausalFusionSampling):
        self.model, self.labels, self.batch_size, self.settings = model, labels, batch_size, settings
        self.path = get_path(settings.path)
        self.do_cfg = labels is not None and settings.guidance_scale != 1.0
        self.null = torch.full_like(labels, model.config.num_classes) if labels is not None else None
        self.sizes: list[int] = []  # clean block sizes, in order
        self.caches: list[KVCache] | None = None
        if settings.use_cache:
            cache_labels = torch.cat([labels, self.null]) if self.do_cfg else labels
            self.caches = model.prefill_condition(cache_labels, 2 * batch_size if self.do_cfg else batch_size)

    def append(self, clean_BND: torch.Tensor, pos_BN: torch.Tensor, push: bool = True):
        """A finished block of clean tokens; ``push`` writes it into the caches (skipped for the last step)."""
        self.sizes.append(pos_BN.shape[1])
        if self.caches is None or not push:
            return
        if self.do_cfg:
            clean_BND, pos_BN = torch.cat([clean_BND, clean_BND]), torch.cat([pos_BN, pos_BN])
        self.model.forward_cached(clean_BND, pos_BN, self.caches, timestep=None, commit=True)

    def _cond_half(self) -> list[KVCache]:
        """Views of the caches' conditional half (where the guidance interval switches CFG off)."""
        views = []
        for cache in self.caches:
            view = KVCache()
            if cache.key is not None:
                view.key, view.value = cache.key[:self.batch_size], cache.value[:self.batch_size]
            views.append(view)
        return views

    def velocity_fn(self, tokens_BLD: torch.Tensor, order_BL: torch.Tensor, start: int, pos_BN: torch.Tensor):
        """``v(x, t)`` of the noisy tokens at ``pos_BN`` given the prefix ``order_BL[:, :start]`` (guided)."""
        clean_pos = order_BL[:, :start]
        clean_tokens, step_index, clean_sizes = _gather(tokens_BLD, clean_pos), len(self.sizes), list(self.sizes)
        model, settings, batch_size = self.model, self.settings, self.batch_size

        def model_fn(x, t, y):
            reps = x.shape[0] // batch_size
            pos_n = pos_BN.repeat(reps, 1)
            if self.caches is not None:
                caches = self.caches if (not self.do_cfg or reps == 2) else self._cond_half()
                out = model.forward_cached(x, pos_n, caches, timestep=self.path.network_timestep(t), commit=False)
            else:
                out = model.forward_tokens(x, pos_n, self.path.network_timestep(t), y, clean_tokens.repeat(reps, 1, 1),
                                           clean_pos.repeat(reps, 1), clean_sizes, [x.shape[1]], step_index)
            if settings.prediction != "velocity":
                out = self.path.convert(out, x, t, src=settings.prediction, dst="velocity")
            return out

        if self.do_cfg:
            return classifier_free_guidance(model_fn, self.labels, self.null, settings.guidance_scale,
                                            settings.guidance_interval)
        return lambda x, t: model_fn(x, t, self.labels)


def _solve(velocity, x_BND: torch.Tensor, grid: torch.Tensor, settings: CausalFusionSampling, generator):
    """One AR step's diffusion: an ODE solve, or ancestral DDPM (``solver="ddpm"``, the official sampler;
    its noise comes from ``generator``, one draw per step in the token order of ``x_BND``)."""
    if settings.scheduler is not None:  # a swapped-in diffusers scheduler (the pipeline's `scheduler`)
        x, nfe = solve_with_scheduler(settings.scheduler, velocity, x_BND, settings.num_inference_steps)
        return x, SolverStats(nfe=nfe, num_steps=settings.num_inference_steps, time_grid=grid)
    if settings.solver == "ddpm":
        return sample_ddpm(velocity, x_BND, grid, path=get_path(settings.path), generator=generator, return_stats=True)
    return sample_ode(velocity, x_BND, grid, method=settings.solver, path=get_path(settings.path), return_stats=True)


def _step_end(on_ar_step_end, step: int, tokens_BLD: torch.Tensor, x_BND: torch.Tensor, pos_BN: torch.Tensor):
    """``on_ar_step_end(step, tokens)`` may return replacement tokens; the step's own are then re-read from them."""
    replaced = on_ar_step_end(step, tokens_BLD) if on_ar_step_end is not None else None
    return (tokens_BLD, x_BND) if replaced is None else (replaced, _gather(replaced, pos_BN))


@torch.no_grad()
def sample_tokens(
    model,
    class_labels: torch.Tensor | None,
    batch_size: int,
    settings: CausalFusionSampling | None = None,
    *,
    generator=None,
    known_tokens: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    on_ar_step: Callable[[int], None] | None = None,
    on_ar_step_end: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    return_stats: bool = False,
    **options,
):
    """Generate ``[B, L, token_dim]`` tokens (raster layout) with a ``CausalFusionTransformer`` by walking
    the dual factorization (Deng et al. 2024, Sec. 3): AR steps over token subsets, an ODE solve each.

    ``class_labels``: ``[B]`` ids or None; ``settings``: a ``CausalFusionSampling`` (``options``, its field
    names, override single fields); ``generator``: one or one per sample (noise and random order).
    ``known_tokens`` ``[B, L, D]`` + ``known_mask`` ``[B, L]``: zero-shot editing, kept as a clean prefix.
    ``noise``: initial noise ``[B, L, D]`` instead of drawing it; ``on_ar_step(step)`` after each AR step;
    ``on_ar_step_end(step, tokens_BLD)`` before the step's tokens join the clean prefix, may return replacements.
    Returns the tokens, and with ``return_stats`` also ``{"nfe": network calls, "step_sizes": ...}``.
    """
    settings = with_options(settings or CausalFusionSampling(), options, "sample_tokens")
    noise, order_BL = _noise_and_order(model, batch_size, settings, generator, noise)
    tokens_BLD, order_BL, num_known = _place_known(noise.clone(), order_BL, known_tokens, known_mask)
    remaining = model.num_tokens - num_known
    if remaining == 0:
        return (tokens_BLD, {"nfe": 0, "step_sizes": []}) if return_stats else tokens_BLD
    sizes = _ar_step_sizes(settings, remaining)
    prefix = _CleanPrefix(model, _class_labels(model, class_labels, batch_size), batch_size, settings)
    if num_known:  # the kept tokens of an edit are the first clean block
        prefix.append(_gather(tokens_BLD, order_BL[:, :num_known]), order_BL[:, :num_known])
    grid = get_time_grid(settings.time_grid, settings.num_inference_steps)
    start, nfe = num_known, 0
    for step, size in enumerate(sizes):
        # 1. this AR step's tokens kappa_s: the next `size` positions along the order
        pos_BN = order_BL[:, start:start + size]
        # 2. their velocity given the condition and the clean prefix (generalized causal mask), with CFG
        velocity = prefix.velocity_fn(tokens_BLD, order_BL, start, pos_BN)
        # 3. one diffusion model per AR step: integrate the noisy tokens from t = 1 to t = 0
        x_BND, stats = _solve(velocity, _gather(tokens_BLD, pos_BN), grid, settings, generator)
        nfe += stats.nfe
        # 4. write the clean tokens back (raster layout) and append them to the prefix
        x_BND = x_BND.to(tokens_BLD.dtype)
        tokens_BLD = tokens_BLD.scatter(1, pos_BN[..., None].expand(-1, -1, tokens_BLD.shape[-1]), x_BND)
        tokens_BLD, x_BND = _step_end(on_ar_step_end, step, tokens_BLD, x_BND, pos_BN)  # a callback may replace them
        prefix.append(x_BND, pos_BN, push=step < len(sizes) - 1)
        start += size
        if on_ar_step is not None:
            on_ar_step(step)
    return (tokens_BLD, {"nfe": nfe, "step_sizes": sizes}) if return_stats else tokens_BLD
