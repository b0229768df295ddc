"""Diffusion Forcing rollouts: scheduling matrices, stabilised clean context, KV cache, sliding window, guidance.

``rollout`` generates ``num_frames`` frames after ``context`` in chunks (Chen et al. 2024, Sec. 3.3,
Alg. 2). Each chunk of ``h`` frames sees the last clean frames as history and is denoised along a
scheduling matrix ``K[m, t]`` (``genmod.diffusion_forcing.schedules``): at step ``m`` every frame whose
level changes takes one DDIM step (Song et al. 2021, eq. 12) from ``t = tau[K[m]]`` to ``tau[K[m + 1]]``
on the package path, ``x_to = alpha(t_to) x0_hat + sigma(t_to) eps_hat`` for ``eta = 0`` (for the
linear path the Euler step of the flow ODE); ``eta > 0`` adds fresh noise (``genmod.samplers.ddim_step``).

* **Chunks**: by default every chunk has ``chunk_size`` frames (``window - min(max(C, 1), window // 2)``)
  and sees the last ``window - h`` frames; ``history_frames = L`` re-chooses them per chunk as DFoT does:
  ``c = min(L, frames so far)`` history frames and ``h = min(remaining, window - c[, chunk_size])``.
* **Stabilisation** (Sec. 3.3): clean frames (context and finished frames) are shown to the model as if
  at level ``t_c = context_noise``; ``stabilization`` picks the official semantics
  (``genmod.diffusion_forcing.stabilization``: ``v1.5`` scales by alpha without noise, the default).
* **KV cache**: the history is fixed during a chunk, so its keys/values are computed once per chunk
  (``kv_cache="reencode"``, exactly the uncached result) or once per frame and kept (``"incremental"``;
  identical while the rollout fits in the window, then a Transformer-XL-style recurrence); ``None``
  recomputes history and chunk at every step (the reference). Non-causal models and fresh-noise
  stabilisation recompute the history at every step (a cache would not be exact).
* **Non-causal models** (``config.causal = False``, DFoT): every chunk frame is evaluated at every step
  (a frame sees the later ones).
* **Sliding window**: a chunk never sees more than ``window`` frames (default the training length),
  so rollouts can be far longer than training clips; temporal positions are rotary (relative).
* **History guidance** (Song et al. 2025; HG-v ``noise``/``drop``, HG-f ``fractional``, HG-t ``temporal``)
  and **gradient / Monte Carlo guidance** (DF Sec. 3.4): ``genmod.diffusion_forcing.guidance``.
  ``guidance_fn(x0_hat [B, n, ...]) -> loss`` per sample (lower is better) moves the x0 prediction of the
  frames being updated before the DDIM step; the gradient is taken at ``x0_hat`` (``guidance_grad="x0"``)
  or with respect to ``x_t`` through the network (``"x_t"``, as the DF code does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from genmod.core.paths import AffinePath, get_path
from genmod.core.settings import with_options
from genmod.diffusion_forcing.frame_schedulers import FrameSchedulers
from genmod.diffusion_forcing.guidance import GUIDANCE_SCALING, HISTORY_GUIDANCE, denoise
from genmod.diffusion_forcing.predictor import Predictor
from genmod.diffusion_forcing.schedules import get_scheduling_matrix, level_times
from genmod.diffusion_forcing.stabilization import STABILIZATION_MODES, Stabilizer, draw, present_clean
from genmod.samplers import ddim_step, get_time_grid

KV_CACHE_MODES = (None, "reencode", "incremental")
PREDICTIONS = ("velocity", "x0", "epsilon")
__all__ = ["RolloutSettings", "rollout", "present_clean", "chunk_sizes", "plan_chunks"]


def _randn(shape: Sequence[int], generator, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise; ``generator`` may be a list of one per sample (diffusers convention)."""
    return draw(shape, generator, device, dtype)


@dataclass(frozen=True)
class RolloutSettings:
    """Settings of a Diffusion Forcing rollout (Chen et al. 2024, Sec. 3.3 / Alg. 2, and the module docstring).

    Args:
        path, prediction: the package path and the network's output type it was trained with.
        schedule: ``autoregressive``, ``pyramid`` (``slope`` levels of lag per frame), ``full_sequence``,
            ``trapezoid`` or a user matrix ``[M + 1, chunk]``; ``num_inference_steps`` = number of levels S.
        chunk_size: frames generated jointly (default ``window - min(max(C, 1), window // 2)``).
        window: frames a chunk sees, history included (default the model's ``max_frames``).
        time_grid: the ``samplers`` grid the levels map to; context_noise: stabilisation level ``t_c``.
        kv_cache: ``None`` | ``reencode`` | ``incremental`` (how the clean history is encoded).
        guidance_scale, history_guidance: history guidance weight w (1 = off) and its kind (``noise`` |
            ``drop`` HG-v, ``fractional`` HG-f at level ``history_freq_scale``, ``temporal`` HG-t over
            ``history_subsets`` with ``history_weights``); guidance_interval: ``(t_lo, t_hi)``, a frame is guided
            only while its level is inside (None = always).
        guidance_fn, guidance_strength, guidance_grad: gradient guidance on the x0 prediction (Sec. 3.4);
            guidance_scaling: ``constant`` or ``ddim`` (``sigma_t sigma_next / alpha_t``, DF v1.5);
            guidance_mc_samples: Monte Carlo guidance samples (> 1 needs ``guidance_grad="x_t"``).
        clip_denoised: clamp the x0 prediction to ``[-c, c]`` (pixels: 1; None for latents and sequences).
        stabilization: ``v1.5`` | ``v1.5_ddpm`` | ``dfot`` | ``fixed_noise`` (``stabilization`` module).
        eta: DDIM stochasticity (0 deterministic, 1 DDPM posterior).
        history_frames: DFoT's per-chunk history length L (``-1`` = ``window - 1``; None = fixed chunks).
        scheduler: None (DDIM steps) or a flow scheduler stepping each frame (``frame_schedulers`` module).
    """

    path: str | AffinePath = "cosine"
    prediction: str = "velocity"
    schedule: str | Sequence | torch.Tensor = "autoregressive"
    num_inference_steps: int = 20
    slope: float = 1.0
    chunk_size: int | None = None
    window: int | None = None
    time_grid: str = "uniform"
    context_noise: float = 0.02
    kv_cache: str | None = "reencode"
    guidance_scale: float = 1.0
    history_guidance: str = "noise"
    guidance_interval: tuple[float, float] | None = None
    guidance_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    guidance_strength: float = 0.0
    guidance_grad: str = "x0"
    clip_denoised: float | None = None
    stabilization: str = "v1.5"
    eta: float = 0.0
    history_frames: int | None = None
    history_freq_scale: float = 0.5
    history_subsets: Sequence[Sequence[int]] | None = None
    history_weights: Sequence[float] | None = None
    guidance_scaling: str = "constant"
    guidance_mc_samples: int = 1
    scheduler: object = None

    def __post_init__(self):
        self._check_session6_fields()
        if self.kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache: expected one of {KV_CACHE_MODES}, got {self.kv_cache!r}")
        if self.guidance_grad not in ("x0", "x_t"):
            raise ValueError(f"guidance_grad: expected 'x0' or 'x_t', got {self.guidance_grad!r}")
        if self.history_guidance not in HISTORY_GUIDANCE:
            raise ValueError(f"history_guidance: expected one of {', '.join(HISTORY_GUIDANCE)}, got {self.history_guidance!r}")
        if not 0 <= self.context_noise < 1:
            raise ValueError(f"context_noise: must be in [0, 1), got {self.context_noise}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: must be >= 1, got {self.num_inference_steps}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window: must be >= 1, got {self.window}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size: must be >= 1, got {self.chunk_size}")
        if self.clip_denoised is not None and self.clip_denoised <= 0:
            raise ValueError(f"clip_denoised: must be > 0 or None, got {self.clip_denoised}")

    def _check_session6_fields(self):
        if self.stabilization not in STABILIZATION_MODES:
            raise ValueError(f"stabilization: expected one of {', '.join(STABILIZATION_MODES)}, got {self.stabilization!r}")
        if self.eta < 0:
            raise ValueError(f"eta: must be >= 0, got {self.eta}")
        if self.guidance_interval is not None and not (len(self.guidance_interval) == 2 and
                                                       0 <= self.guidance_interval[0] <= self.guidance_interval[1] <= 1):
            raise ValueError(f"guidance_interval: need (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, got {self.guidance_interval}")
        if self.history_frames is not None and self.history_frames < 1 and self.history_frames != -1:
            raise ValueError(f"history_frames: must be >= 1, -1 (window - 1) or None, got {self.history_frames}")
        if not 0 < self.history_freq_scale < 1:
            raise ValueError(f"history_freq_scale: must be in (0, 1), got {self.history_freq_scale}")
        if self.history_guidance == "temporal" and (not self.history_subsets or self.history_weights is None
                                                    or len(self.history_subsets) != len(self.history_weights)):
            raise ValueError("history_subsets/history_weights: temporal history guidance needs one weight per subset")
        if self.guidance_scaling not in GUIDANCE_SCALING:
            raise ValueError(f"guidance_scaling: expected one of {', '.join(GUIDANCE_SCALING)}, got {self.guidance_scaling!r}")
        if self.guidance_mc_samples < 1 or (self.guidance_mc_samples > 1 and self.guidance_grad != "x_t"):
            raise ValueError(f"guidance_mc_samples: must be >= 1 (> 1 only with guidance_grad='x_t'), got {self.guidance_mc_samples}")


@dataclass
class _Rollout:
    """What every chunk of one rollout shares: the model, settings, path, level times and randomness."""

    model: object
    settings: RolloutSettings
    path: AffinePath
    tau: torch.Tensor  # [S + 1] times of the levels 0..S
    predictor: Predictor
    generator: object
    window: int
    num_context: int
    bar: object = None

    @property
    def guided(self) -> bool:
        return self.settings.guidance_scale != 1.0

    @property
    def stabilizer(self) -> Stabilizer:
        return self.predictor.stabilizer

    @property
    def use_cache(self) -> bool:
        """A KV cache is exact only for a causal model whose history is fixed during the chunk."""
        return self.settings.kv_cache is not None and self.predictor.causal and not self.stabilizer.fresh


def _compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: ``ModelMixin.dtype`` is the compute dtype under layerwise casting
    (a parameter's dtype would be the fp8/fp16 storage); plain modules: their first parameter's."""
    return getattr(model, "dtype", None) or next(model.parameters()).dtype


def _check_context(model, context, batch_size) -> torch.Tensor:
    """Context frames ``[B, C, *frame]`` on the model's device and dtype (``[B, 0, ...]`` when None)."""
    device, dtype = next(model.parameters()).device, _compute_dtype(model)
    frame_shape = tuple(model.frame_shape)
    if context is None:
        context = torch.zeros((batch_size or 1, 0, *frame_shape), device=device, dtype=dtype)
    context = context.to(device=device, dtype=dtype)
    if context.dim() != 2 + len(frame_shape) or tuple(context.shape[2:]) != frame_shape:
        raise ValueError(f"context: expected [B, C, {', '.join(map(str, frame_shape))}], got shape {tuple(context.shape)}")
    return context


def _window_and_chunk(model, settings: RolloutSettings, num_context: int) -> tuple[int, int]:
    """Attention window (frames) and chunk size; the default chunk leaves room for some history."""
    window = int(settings.window or model.config.max_frames)
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    chunk_size = settings.chunk_size
    if chunk_size is None:
        chunk_size = max(1, window - min(max(num_context, 1), window // 2))
    if not 1 <= chunk_size <= window:
        raise ValueError(f"chunk_size: must be in [1, window={window}], got {chunk_size}")
    return window, chunk_size


def chunk_sizes(num_frames: int, chunk_size: int) -> list[int]:
    """``num_frames`` split into chunks of ``chunk_size`` frames (the last one may be shorter)."""
    return [min(chunk_size, num_frames - done) for done in range(0, num_frames, chunk_size)]


def plan_chunks(num_context: int, num_frames: int, window: int, chunk_size: int | None,
                history_frames: int | None) -> list[tuple[int, int]]:
    """``(h, c)`` per chunk: frames generated and history frames seen (module doc, "Chunks").

    ``history_frames`` None: fixed chunks (``chunk_size`` given) with ``c = window - h``; else DFoT's rule
    ``c = min(L, frames so far)``, ``h = min(remaining, window - c, chunk_size)``."""
    if history_frames is None:
        return [(h, window - h) for h in chunk_sizes(num_frames, chunk_size)]
    limit = window - 1 if history_frames == -1 else history_frames
    if not num_context <= limit < window:
        raise ValueError(f"history_frames: must be in [num_context={num_context}, window={window}), got {limit}")
    plan, done, total = [], num_context, num_context + num_frames
    while done < total:
        c = min(limit, done)
        h = min(total - done, window - c, chunk_size or window)
        plan.append((h, c))
        done += h
    return plan


def _progress_bar(settings: RolloutSettings, chunks: list[int], progress: bool):
    """tqdm over denoising steps (a total only when every chunk has the same matrix)."""
    total = sum(get_scheduling_matrix(settings.schedule, settings.num_inference_steps, h, settings.slope).shape[0] - 1
                for h in set(chunks))
    return tqdm(total=total if len(set(chunks)) == 1 else None, disable=not progress, desc="rollout", unit="step")


def _start(model, settings: RolloutSettings, context, class_labels, actions, generator, num_frames):
    """The rollout's shared state and its chunk plan."""
    num_context = context.shape[1]
    window, chunk_size = _window_and_chunk(model, settings, num_context)
    if actions is not None and actions.shape[1] < num_context + num_frames:
        raise ValueError(f"actions: need {num_context + num_frames} frames of actions, got {actions.shape[1]}")
    steps = settings.num_inference_steps
    tau = level_times(steps, get_time_grid(settings.time_grid, steps)).to(context.device)
    path = get_path(settings.path)
    stabilizer = Stabilizer(path, settings.stabilization, settings.context_noise)
    predictor = Predictor(model, class_labels, actions, path, stabilizer, generator)
    run = _Rollout(model, settings, path, tau, predictor, generator, window, num_context)
    user_chunk = settings.chunk_size if settings.history_frames is not None else chunk_size
    return run, plan_chunks(num_context, num_frames, window, user_chunk, settings.history_frames)


def rollout(
    model,
    context: torch.Tensor | None,
    num_frames: int,
    settings: RolloutSettings | None = None,
    *,
    class_labels: torch.Tensor | None = None,
    actions: torch.Tensor | None = None,
    batch_size: int | None = None,
    generator=None,
    progress: bool = False,
    on_chunk_end=None,
    **options,
) -> torch.Tensor:
    """Generate ``num_frames`` frames after ``context`` ``[B, C, *frame]``; returns ``[B, C + num_frames, *frame]``.

    Chunk by chunk (Chen et al. 2024, Sec. 3.3, Alg. 2): each chunk sees the last clean frames as
    stabilised history and is denoised along the scheduling matrix. ``settings``: a
    ``RolloutSettings``; ``options`` (its field names) override single fields. ``actions``:
    ``[B, C + num_frames, A]`` for action-conditioned models. Everything random comes from ``generator``.
    ``on_chunk_end(chunk_index, frames [B, h, ...])`` after each chunk may return replacement frames, which are
    then shown stabilised afresh to the later chunks (the pipeline's ``callback_on_step_end``).
    """
    settings = with_options(settings or RolloutSettings(), options, "rollout")
    if num_frames < 1:
        raise ValueError(f"num_frames: must be >= 1, got {num_frames}")
    context = _check_context(model, context, batch_size)
    run, plan = _start(model, settings, context, class_labels, actions, generator, num_frames)
    frames = list(context.unbind(1))
    presented = list(run.stabilizer.static(context, generator).unbind(1)) if run.num_context else []
    run.bar = _progress_bar(settings, [h for h, _ in plan], progress)
    for chunk_index, (h, keep) in enumerate(plan):
        start = len(frames)
        # 1. history: the last `keep` clean frames, shown stabilised (encoded once if cached)
        uncond_history = _set_history(run, frames, presented, start, keep, chunk_index)
        # 2. denoise the chunk along the scheduling matrix (Alg. 2)
        x, shown = _denoise_chunk(run, context.shape[0], h, start, uncond_history)
        x, shown = _chunk_end(run, on_chunk_end, chunk_index, x, shown)
        # 3. the finished frames become clean context: kept as generated, shown stabilised
        frames.extend(x.unbind(1))
        presented.extend(shown)
        if settings.kv_cache == "incremental" and run.use_cache:
            run.predictor.append_to_cache(torch.stack(shown, 1), start, keep_frames=run.window)
    run.bar.close()
    return torch.stack(frames, 1)


def _chunk_end(run: _Rollout, on_chunk_end, chunk_index: int, x: torch.Tensor, shown: list):
    """``on_chunk_end`` may replace the finished chunk; replaced frames are stabilised afresh for later chunks."""
    replaced = on_chunk_end(chunk_index, x) if on_chunk_end is not None else None
    if replaced is None:
        return x, shown
    x = replaced.to(x.dtype)
    return x, list(run.stabilizer.static(x, run.generator).unbind(1))


def _set_history(run: _Rollout, frames: list, presented: list, start: int, keep: int, chunk_index: int):
    """Give the predictor the chunk's history; returns the history the unconditional branch of history
    guidance sees: fully noised frames (``noise``) or ``"drop"`` (Song et al. 2025, HG-v)."""
    hist_start = max(0, start - keep)
    hist = torch.stack(presented[hist_start:], 1) if start > hist_start else None
    clean = torch.stack(frames[hist_start:], 1) if hist is not None else None
    generated = torch.arange(hist_start, start, device=run.tau.device) >= run.num_context
    incremental = run.settings.kv_cache == "incremental" and chunk_index > 0 and run.use_cache
    if incremental:  # slide the window: keep only the frames this chunk may see
        for cache in run.predictor.caches:
            cache.crop(keep * run.model.tokens_per_frame) if keep > 0 else cache.reset()
    run.predictor.set_history(hist, clean, hist_start, generated, use_cache=run.use_cache, keep_cache=incremental)
    if run.guided and run.settings.history_guidance == "noise" and hist is not None:
        return _randn(hist.shape, run.generator, hist.device, hist.dtype)
    return "drop"


def _chunk_inputs(run: _Rollout, x, shown, cur, n):
    """Inputs ``[B, n, ...]`` and times ``[n]`` of the first ``n`` chunk frames: finished ones stabilised
    (fresh noise drawn here under fresh-noise modes), the others at their level ``tau[K[m]]``."""
    x_in = torch.stack([shown[i] if cur[i] == 0 else x[:, i] for i in range(n)], 1)
    done = cur[:n] == 0
    if run.stabilizer.fresh and bool(done.any()):
        x_in = torch.where(done.reshape(1, -1, *([1] * (x.dim() - 2))),
                           run.stabilizer.refresh(x_in, done, run.generator), x_in)
    t_in = torch.where(done, torch.full_like(run.tau[cur[:n]], run.settings.context_noise), run.tau[cur[:n]])
    return x_in, t_in


def _step_frame(run: _Rollout, x0_hat, eps_hat, t_from, t_to, dtype):
    """The DDIM step of one frame (``eta = 0``: the deterministic step, written as before session 6)."""
    path, eta = run.path, run.settings.eta
    if eta == 0:
        return path.alpha(t_to).to(dtype) * x0_hat + path.sigma(t_to).to(dtype) * eps_hat
    noise = _randn(x0_hat.shape, run.generator, x0_hat.device, dtype)
    return ddim_step(x0_hat, eps_hat, path, t_from, t_to, eta, noise)


def _denoise_chunk(run: _Rollout, batch: int, h: int, start: int, uncond_history):
    """Denoise ``h`` new frames along the scheduling matrix ``K[m, t]`` (Chen et al. 2024, Alg. 2).

    Returns the clean frames ``[B, h, *frame]`` and their static stabilised views (a list of ``h``)."""
    settings, tau = run.settings, run.tau
    matrix = get_scheduling_matrix(settings.schedule, settings.num_inference_steps, h, settings.slope).to(tau.device)
    dtype = _compute_dtype(run.model)
    x = _randn((batch, h, *run.model.frame_shape), run.generator, tau.device, dtype)
    shown = [None] * h  # stabilised versions of finished chunk frames
    path_name = settings.path if isinstance(settings.path, str) else run.path.name
    stepper = None if settings.scheduler is None else FrameSchedulers(settings.scheduler, run.path, path_name, tau, h)
    for m in range(matrix.shape[0] - 1):
        cur, nxt = matrix[m], matrix[m + 1]
        changed = (cur != nxt).nonzero().flatten()
        if changed.numel() == 0:
            continue
        # 1. inputs: frames up to the last changing one (a causal model's later frames cannot influence
        #    them; a non-causal model sees the whole chunk)
        n = int(changed.max()) + 1 if run.predictor.causal else h
        x_in, t_in = _chunk_inputs(run, x, shown, cur, n)
        # 2. x0 / eps predictions with history and gradient guidance
        x0_hat, eps_hat = denoise(run.predictor, settings, run.path, x_in, t_in, tau[nxt[:n]], start, uncond_history,
                                  changed, run.generator, cur[:n] != 0)
        # 3. DDIM step (or the swapped-in scheduler's) of every changing frame to its next level; a frame
        #    reaching level 0 is its x0 prediction (under DDIM), given its static stabilised view once
        for i in changed.tolist():
            if stepper is not None:
                x[:, i] = stepper.step(i, x0_hat[:, i], eps_hat[:, i], x[:, i], tau[cur[i]])
            else:
                x[:, i] = _step_frame(run, x0_hat[:, i], eps_hat[:, i], tau[cur[i]], tau[nxt[i]], dtype)
                x[:, i] = x0_hat[:, i] if nxt[i] == 0 else x[:, i]
            if nxt[i] == 0:
                shown[i] = run.stabilizer.static(x[:, i:i + 1], run.generator)[:, 0]
        run.bar.update()
    return x, shown
