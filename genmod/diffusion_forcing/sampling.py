"""Diffusion Forcing rollouts: scheduling matrices, stabilised clean context, KV cache, sliding window, guidance.

``rollout`` generates ``num_frames`` frames after ``context`` in chunks (Chen et al. 2024, Sec. 3.3,
Alg. 2). Each chunk of ``h`` frames sees the last ``window - h`` clean frames as history and is
denoised along a scheduling matrix ``K[m, t]`` (``genmod.diffusion_forcing.schedules``): at step
``m`` every frame whose level changes takes one deterministic DDIM step (Song et al. 2021, eq. 12,
eta = 0) from ``t = tau[K[m]]`` to ``tau[K[m + 1]]`` on the package path,
``x_to = alpha(t_to) x0_hat + sigma(t_to) eps_hat`` (for the linear path this is the Euler step of
the flow ODE).

* **Stabilisation** (Sec. 3.3, "stabilizing autoregressive generation"): clean frames (context and
  finished frames) are shown to the model as slightly noisy, ``alpha(t_c) x + sigma(t_c) z`` at level
  ``t_c = context_noise`` with ``z`` drawn once per frame; the frames themselves are never changed.
* **KV cache**: the history is clean and fixed during a chunk, so its keys/values are computed once
  per chunk (``kv_cache="reencode"``, exactly the uncached result) or once per frame and kept
  (``"incremental"``; identical while the rollout fits in the window, then a Transformer-XL-style
  recurrence); ``None`` recomputes history and chunk at every step (the reference).
* **Sliding window**: a chunk never sees more than ``window`` frames (default the training length),
  so rollouts can be far longer than training clips; temporal positions are rotary (relative).
* **History guidance** (Song et al. 2025, HG-v): ``pred = u + w (c - u)`` where ``c`` sees the history
  and ``u`` sees it fully noised (``history_guidance="noise"``, the DFoT choice) or not at all
  (``"drop"``: attention to history masked; needs a model trained with ``history_drop_prob > 0``).
  ``w = guidance_scale``; 1 is off (docs/DESIGN.md §1).
* **Gradient guidance** (DF planning, Sec. 3.4 / App. D): ``guidance_fn(x0_hat [B, n, ...]) -> loss``
  per sample (lower is better) moves the x0 prediction of the frames being updated by
  ``-guidance_strength * grad loss`` before the DDIM step (which re-derives eps from it). The gradient is
  taken at ``x0_hat`` (``guidance_grad="x0"``, reconstruction-guidance style, no backprop through the
  network) or with respect to ``x_t`` through the network (``"x_t"``, as the DF code does; then it is
  classifier guidance ``eps' = eps + guidance_strength (alpha / sigma) grad loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from genmod.core.paths import AffinePath, broadcast_like, get_path
from genmod.core.settings import with_options
from genmod.diffusion_forcing.schedules import get_scheduling_matrix, level_times
from genmod.samplers import combine_guidance, get_time_grid

KV_CACHE_MODES = (None, "reencode", "incremental")
PREDICTIONS = ("velocity", "x0", "epsilon")


def _randn(shape: Sequence[int], generator, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise; ``generator`` may be a list of one per sample (diffusers convention)."""
    gen_device = generator[0].device if isinstance(generator, list) else (generator.device if generator is not None else device)
    noise = randn_tensor(tuple(shape), generator=generator, device=torch.device(gen_device), dtype=dtype)
    return noise.to(device)


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
        guidance_scale, history_guidance: history guidance weight w (1 = off) and the unconditional kind.
        guidance_fn, guidance_strength, guidance_grad: gradient guidance on the x0 prediction (Sec. 3.4).
        clip_denoised: clamp the x0 prediction to ``[-c, c]`` (pixels: 1).
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
    guidance_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    guidance_strength: float = 0.0
    guidance_grad: str = "x0"
    clip_denoised: float | None = None

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache: expected one of {KV_CACHE_MODES}, got {self.kv_cache!r}")
        if self.guidance_grad not in ("x0", "x_t"):
            raise ValueError(f"guidance_grad: expected 'x0' or 'x_t', got {self.guidance_grad!r}")
        if self.history_guidance not in ("noise", "drop"):
            raise ValueError(f"history_guidance: expected 'noise' or 'drop', got {self.history_guidance!r}")
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


def present_clean(path: AffinePath, frames: torch.Tensor, context_noise: float, generator) -> torch.Tensor:
    """Stabilisation: clean frames as the model sees them, ``alpha(t_c) x + sigma(t_c) z`` (z fresh)."""
    if context_noise <= 0:
        return frames
    z = _randn(frames.shape, generator, frames.device, frames.dtype)
    t = torch.tensor(float(context_noise), dtype=torch.float64)
    return float(path.alpha(t)) * frames + float(path.sigma(t)) * z


class _Predictor:
    """Runs the network on ``history + chunk`` (or the chunk with a cached history) and returns
    predictions of the chunk frames in the model's prediction type."""

    def __init__(self, model, labels, actions, context_noise: float):
        self.model, self.labels, self.actions, self.context_noise = model, labels, actions, context_noise
        self.caches = None
        self.history = None  # (presented frames [B, n, ...], first frame index)

    def set_history(self, presented: torch.Tensor | None, start: int, use_cache: bool, keep_cache: bool = False):
        """History for the next chunk; ``use_cache`` encodes it once now (``keep_cache``: extend the old cache)."""
        self.history = (presented, start) if presented is not None and presented.shape[1] else (None, start)
        if not use_cache:
            self.caches = None
            return
        if not keep_cache or self.caches is None:
            self.caches = self.model.make_kv_caches()
            if self.history[0] is not None:
                self._forward(self.history[0], self._ctx_levels(self.history[0]), start, self.caches, update_cache=True)

    def append_to_cache(self, presented: torch.Tensor, start: int, keep_frames: int):
        """Incremental cache: add finished frames, then keep only the last ``keep_frames`` frames."""
        self._forward(presented, self._ctx_levels(presented), start, self.caches, update_cache=True)
        per = self.model.tokens_per_frame
        for cache in self.caches:
            cache.crop(keep_frames * per) if keep_frames > 0 else cache.reset()

    def _ctx_levels(self, frames):
        return torch.full(frames.shape[:2], 1000.0 * self.context_noise, device=frames.device)

    def _actions(self, start: int, count: int):
        return None if self.actions is None else self.actions[:, start:start + count]

    def _forward(self, x, timestep, start, caches, update_cache=False, history_cut=None):
        return self.model(x, timestep, self.labels, actions=self._actions(start, x.shape[1]), frame_offset=start,
                          kv_caches=caches, update_cache=update_cache, history_cut=history_cut).sample

    def __call__(self, x: torch.Tensor, t: torch.Tensor, start: int, history: str = "keep") -> torch.Tensor:
        """Prediction for chunk frames ``x`` ``[B, n, ...]`` at times ``t`` ``[n]`` starting at frame ``start``.

        ``history``: ``keep`` (cached or explicit), ``drop`` (masked out) or a tensor of replacement
        history frames (fully noised) shown at ``t = 1``.
        """
        batch = x.shape[0]
        levels = (1000.0 * t.float()).to(x.device).expand(batch, -1)
        hist, hist_start = self.history
        if isinstance(history, torch.Tensor):
            full_x = torch.cat([history, x], 1)
            full_t = torch.cat([torch.full(history.shape[:2], 1000.0, device=x.device), levels], 1)
            return self._forward(full_x, full_t, hist_start, None)[:, history.shape[1]:]
        if history == "drop":
            return self._forward(x, levels, start, None)
        if self.caches is not None or hist is None:
            return self._forward(x, levels, start, self.caches)
        full_x = torch.cat([hist, x], 1)
        full_t = torch.cat([self._ctx_levels(hist), levels], 1)
        return self._forward(full_x, full_t, hist_start, None)[:, hist.shape[1]:]


@dataclass
class _Rollout:
    """What every chunk of one rollout shares: the model, settings, path, level times and randomness."""

    model: object
    settings: RolloutSettings
    path: AffinePath
    tau: torch.Tensor  # [S + 1] times of the levels 0..S
    predictor: _Predictor
    generator: object
    window: int
    bar: object = None

    @property
    def guided(self) -> bool:
        return self.settings.guidance_scale != 1.0


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


def _progress_bar(settings: RolloutSettings, chunks: list[int], progress: bool):
    """tqdm over denoising steps (a total only when every chunk has the same matrix)."""
    total = sum(get_scheduling_matrix(settings.schedule, settings.num_inference_steps, h, settings.slope).shape[0] - 1
                for h in set(chunks))
    return tqdm(total=total if len(set(chunks)) == 1 else None, disable=not progress, desc="rollout", unit="step")


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

    Chunk by chunk (Chen et al. 2024, Sec. 3.3, Alg. 2): each chunk sees the last ``window - h`` clean
    frames as stabilised history and is denoised along the scheduling matrix. ``settings``: a
    ``RolloutSettings``; ``options`` (its field names) override single fields. ``actions``:
    ``[B, C + num_frames, A]`` for action-conditioned models. Everything random comes from ``generator``.
    ``on_chunk_end(chunk_index, frames [B, h, ...])`` after each chunk may return replacement frames, which are
    then shown stabilised afresh to the later chunks (the pipeline's ``callback_on_step_end``).
    """
    settings = with_options(settings or RolloutSettings(), options, "rollout")
    if num_frames < 1:
        raise ValueError(f"num_frames: must be >= 1, got {num_frames}")
    context = _check_context(model, context, batch_size)
    num_context = context.shape[1]
    window, chunk_size = _window_and_chunk(model, settings, num_context)
    if actions is not None and actions.shape[1] < num_context + num_frames:
        raise ValueError(f"actions: need {num_context + num_frames} frames of actions, got {actions.shape[1]}")
    steps = settings.num_inference_steps
    tau = level_times(steps, get_time_grid(settings.time_grid, steps)).to(context.device)
    run = _Rollout(model, settings, get_path(settings.path), tau,
                   _Predictor(model, class_labels, actions, settings.context_noise), generator, window)
    frames = list(context.unbind(1))
    presented = list(present_clean(run.path, context, settings.context_noise, generator).unbind(1)) if num_context else []
    chunks = chunk_sizes(num_frames, chunk_size)
    run.bar = _progress_bar(settings, chunks, progress)
    for chunk_index, h in enumerate(chunks):
        start = len(frames)
        # 1. history: the last `window - h` clean frames, shown stabilised (encoded once if cached)
        uncond_history = _set_history(run, presented, start, h, chunk_index)
        # 2. denoise the chunk along the scheduling matrix (Alg. 2)
        x, shown = _denoise_chunk(run, context.shape[0], h, start, uncond_history)
        x, shown = _chunk_end(run, on_chunk_end, chunk_index, x, shown)
        # 3. the finished frames become clean context: kept as generated, shown stabilised
        frames.extend(x.unbind(1))
        presented.extend(shown)
        if settings.kv_cache == "incremental":
            run.predictor.append_to_cache(torch.stack(shown, 1), start, keep_frames=window)
    run.bar.close()
    return torch.stack(frames, 1)


def _chunk_end(run: _Rollout, on_chunk_end, chunk_index: int, x: torch.Tensor, shown: list):
    """``on_chunk_end`` may replace the finished chunk; replaced frames are stabilised afresh for later chunks."""
    replaced = on_chunk_end(chunk_index, x) if on_chunk_end is not None else None
    if replaced is None:
        return x, shown
    x = replaced.to(x.dtype)
    return x, list(present_clean(run.path, x, run.settings.context_noise, run.generator).unbind(1))


def _set_history(run: _Rollout, presented: list, start: int, h: int, chunk_index: int):
    """Give the predictor the chunk's history; returns the history the unconditional branch of history
    guidance sees: fully noised frames (``noise``) or ``"drop"`` (Song et al. 2025, HG-v)."""
    keep = run.window - h
    hist_start = max(0, start - keep)
    hist = torch.stack(presented[hist_start:], 1) if start > hist_start else None
    kv_cache = run.settings.kv_cache
    incremental = kv_cache == "incremental" and chunk_index > 0
    if incremental:  # slide the window: keep only the frames this chunk may see
        for cache in run.predictor.caches:
            cache.crop(keep * run.model.tokens_per_frame) if keep > 0 else cache.reset()
    run.predictor.set_history(hist, hist_start, use_cache=kv_cache is not None, keep_cache=incremental)
    if run.guided and run.settings.history_guidance == "noise" and hist is not None:
        return _randn(hist.shape, run.generator, hist.device, hist.dtype)
    return "drop"


def _denoise_chunk(run: _Rollout, batch: int, h: int, start: int, uncond_history):
    """Denoise ``h`` new frames along the scheduling matrix ``K[m, t]`` (Chen et al. 2024, Alg. 2).

    Returns the clean frames ``[B, h, *frame]`` and their stabilised versions (a list of ``h``)."""
    settings, path, tau = run.settings, run.path, run.tau
    matrix = get_scheduling_matrix(settings.schedule, settings.num_inference_steps, h, settings.slope).to(tau.device)
    dtype = _compute_dtype(run.model)
    x = _randn((batch, h, *run.model.frame_shape), run.generator, tau.device, dtype)
    shown = [None] * h  # stabilised versions of finished chunk frames
    for m in range(matrix.shape[0] - 1):
        cur, nxt = matrix[m], matrix[m + 1]
        changed = (cur != nxt).nonzero().flatten()
        if changed.numel() == 0:
            continue
        # 1. inputs: frames up to the last changing one (later frames cannot influence them, causal);
        #    finished frames are shown stabilised at t_c, the others at their level tau[K[m]]
        n = int(changed.max()) + 1
        x_in = torch.stack([shown[i] if cur[i] == 0 else x[:, i] for i in range(n)], 1)
        t_in = torch.where(cur[:n] == 0, torch.full_like(tau[cur[:n]], settings.context_noise), tau[cur[:n]])
        # 2. x0 / eps predictions with history and gradient guidance
        x0_hat, eps_hat = _denoise(run.predictor, settings, path, x_in, t_in, start, uncond_history, changed)
        # 3. DDIM step (eta = 0) of every changing frame to its next level; a frame reaching level 0 is
        #    its x0 prediction, stabilised once for later steps
        for i in changed.tolist():
            t_to = tau[nxt[i]]
            x[:, i] = path.alpha(t_to).to(dtype) * x0_hat[:, i] + path.sigma(t_to).to(dtype) * eps_hat[:, i]
            if nxt[i] == 0:
                x[:, i] = x0_hat[:, i]
                shown[i] = present_clean(path, x[:, i:i + 1], settings.context_noise, run.generator)[:, 0]
        run.bar.update()
    return x, shown


def _guided_prediction(predictor, settings: RolloutSettings, x_in, t_in, start, uncond_history):
    """The network prediction of the chunk frames, with history guidance ``u + w (c - u)``."""
    pred = predictor(x_in, t_in, start)
    if settings.guidance_scale != 1.0:
        with torch.no_grad():
            pred_u = predictor(x_in.detach(), t_in, start, history=uncond_history)
        pred = combine_guidance(pred, pred_u, settings.guidance_scale)
    return pred


def _denoise(predictor, settings: RolloutSettings, path, x_in, t_in, start, uncond_history, changed):
    """``(x0_hat, eps_hat)`` for the evaluated chunk frames, with history and gradient guidance (Sec. 3.4)."""
    guidance_fn, strength = settings.guidance_fn, settings.guidance_strength
    use_grad = guidance_fn is not None and strength != 0
    through_network = use_grad and settings.guidance_grad == "x_t"
    with torch.enable_grad() if through_network else torch.no_grad():
        if through_network:
            x_in = x_in.detach().requires_grad_(True)
        pred = _guided_prediction(predictor, settings, x_in, t_in, start, uncond_history)
        t_b = t_in[None].expand(x_in.shape[0], -1)
        x0_hat = path.convert(pred, x_in, t_b, src=settings.prediction, dst="x0")
        if through_network:  # DF code: d loss / d x_t through the network
            (grad,) = torch.autograd.grad(guidance_fn(x0_hat[:, changed]).sum(), x_in)
            x0_hat, x_in = x0_hat.detach() - strength * grad, x_in.detach()
    if use_grad and not through_network:  # d loss / d x0_hat at the prediction (no network backprop)
        with torch.enable_grad():
            x0_var = x0_hat.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(guidance_fn(x0_var[:, changed]).sum(), x0_var)
        x0_hat = x0_hat - strength * grad
    if settings.clip_denoised is not None:
        x0_hat = x0_hat.clamp(-settings.clip_denoised, settings.clip_denoised)
    a, s = broadcast_like(path.alpha(t_b), x_in), broadcast_like(path.sigma(t_b), x_in)
    eps_hat = (x_in - a * x0_hat) / s.clamp(min=1e-8)
    return x0_hat, eps_hat
