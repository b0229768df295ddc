"""History guidance and gradient guidance inside a Diffusion Forcing denoising step.

**History guidance** (Song et al. 2025, "History-guided video diffusion", Sec. 4): the prediction is a
weighted sum of predictions under different views of the history, with weights summing to one. A view
gives every history frame a level: 0 shows it as stabilised (``genmod.diffusion_forcing.stabilization``),
``k > 0`` noises it afresh to level ``k`` (fresh noise at every step), 1 is fully noised ("no history",
DFoT's unconditional branch; history is noised, not dropped). With ``u`` = all history at 1:

* ``noise`` / ``drop`` (HG-v): ``u + w (c - u)`` with ``c`` the full history (genmod's original
  implementation: ``noise`` draws the noised history once per chunk, ``drop`` masks it out);
* ``fractional`` (HG-f): ``c + (w - 1) (c_k - u)``, ``c_k`` the whole history noised to
  ``history_freq_scale`` = k, which keeps only its low frequencies;
* ``temporal`` (HG-t): ``u + sum_i w_i (c_{S_i} - u)``, ``c_{S_i}`` seeing only the history frames in the
  index set ``S_i`` (``history_subsets``, Python-style indices into the history, out-of-range ones ignored),
  the others fully noised, with weights ``history_weights``.

Composing predictions equals DFoT's composing of the DDIM-updated states (the step is affine in the
prediction for a fixed ``x_t``, and the weights sum to one). With ``guidance_interval = (t_lo, t_hi)``
(Kynkaanniemi et al. 2024, as the other pipelines) a frame is guided only while its own level is inside the
interval; outside, it gets the full-history prediction, and a step with no frame inside runs no extra view.

**Gradient guidance** (DF planning, Sec. 3.4 / App. D): ``guidance_fn(x0_hat) -> loss`` moves the x0
prediction by ``-guidance_strength * f * grad``, ``f = 1`` (``guidance_scaling="constant"``) or
``f = sigma_t sigma_next / alpha_t`` (``"ddim"``, DF v1.5: it adds ``sigma_next * grad`` to the predicted
noise of a DDIM step). **Monte Carlo guidance** (DF paper, Sec. 3.4; the ``paper`` branch's
``ddim_repeats``): the loss is averaged over ``guidance_mc_samples`` x0 samples, sample ``r`` predicted from
``alpha_t x0_{r-1} + sigma_t z_r`` (a fresh re-noising of the previous one at the same levels), and its
gradient is taken through the network (``guidance_grad="x_t"``).
"""

from __future__ import annotations

import torch

from genmod.core.paths import broadcast_like
from genmod.diffusion_forcing.stabilization import draw
from genmod.samplers import combine_guidance

HISTORY_GUIDANCE = ("noise", "drop", "fractional", "temporal")
GUIDANCE_SCALING = ("constant", "ddim")


def history_conditions(kind: str, scale: float, num_history: int, freq_scale: float = 0.5,
                       subsets=None, weights=None) -> list[tuple[torch.Tensor, float]]:
    """The history views ``(levels [n] float64, weight)`` of history guidance ``kind`` (module doc);
    equal views are merged and zero weights dropped, so ``scale = 1`` leaves the full history only."""
    ones = (1.0,) * num_history
    merged: dict[tuple, float] = {ones: 1.0}

    def add(levels, weight):
        merged[tuple(levels)] = merged.get(tuple(levels), 0.0) + weight

    if kind in ("noise", "drop"):
        add((0.0,) * num_history, scale)
        add(ones, -scale)
    elif kind == "fractional":
        add((0.0,) * num_history, 1.0)
        add(ones, -1.0)
        add((float(freq_scale),) * num_history, scale - 1)
        add(ones, -(scale - 1))
    elif kind == "temporal":
        for subset, weight in zip(subsets, weights):
            chosen = {i % num_history for i in subset if -num_history <= i < num_history}
            add([0.0 if j in chosen else 1.0 for j in range(num_history)], float(weight))
            add(ones, -float(weight))
    else:
        raise ValueError(f"history_guidance: expected one of {', '.join(HISTORY_GUIDANCE)}, got {kind!r}")
    return [(torch.tensor(levels, dtype=torch.float64), w) for levels, w in merged.items() if w != 0]


def guided_prediction(predictor, settings, x_in, t_in, start, uncond_history):
    """The network prediction of the chunk frames ``[B, n, ...]`` at levels ``t_in [n]`` with history guidance,
    gated per frame by ``settings.guidance_interval`` (module doc)."""
    pred = predictor(x_in, t_in, start)
    inside = None
    if settings.guidance_interval is not None:
        inside = (t_in >= settings.guidance_interval[0]) & (t_in <= settings.guidance_interval[1])
        if not bool(inside.any()):
            return pred
    guided = _history_guided(predictor, settings, pred, x_in, t_in, start, uncond_history)
    if inside is None or bool(inside.all()):
        return guided
    return torch.where(inside.reshape(1, -1, *([1] * (pred.dim() - 2))).to(pred.device), guided, pred)


def _history_guided(predictor, settings, pred, x_in, t_in, start, uncond_history):
    """``pred`` combined with the other history views of ``settings.history_guidance`` (module doc)."""
    kind = settings.history_guidance
    if kind in ("fractional", "temporal"):
        if predictor.history[0] is None:
            return pred
        views = history_conditions(kind, settings.guidance_scale, predictor.history[0].shape[1],
                                   settings.history_freq_scale, settings.history_subsets, settings.history_weights)
        total = 0.0
        for levels, weight in views:
            if bool((levels == 0).all()):
                total = total + weight * pred
                continue
            with torch.no_grad():
                total = total + weight * predictor(x_in.detach(), t_in, start, history=predictor.noised_history(levels))
        return total
    if settings.guidance_scale != 1.0:
        with torch.no_grad():
            pred_u = predictor(x_in.detach(), t_in, start, history=uncond_history)
        pred = combine_guidance(pred, pred_u, settings.guidance_scale)
    return pred


def guidance_factor(path, t_in: torch.Tensor, t_next: torch.Tensor, scaling: str) -> torch.Tensor | None:
    """Per-frame factor ``[n]`` of the gradient step: None (constant) or ``sigma_t sigma_next / alpha_t``."""
    if scaling == "constant":
        return None
    return path.sigma(t_in) * path.sigma(t_next) / path.alpha(t_in).clamp(min=1e-12)


def monte_carlo_loss(loss, x0_hat, x_in, t_b, evaluate, guidance_fn, changed, samples: int, path, generator, noisy):
    """Mean guidance loss over ``samples`` chained x0 samples (module doc); ``loss`` is sample 0's, ``noisy``
    ``[n]`` marks the frames that are re-noised (the others keep their input)."""
    a, s = broadcast_like(path.alpha(t_b), x_in), broadcast_like(path.sigma(t_b), x_in)
    keep = (~noisy).reshape(1, -1, *([1] * (x_in.dim() - 2))).to(x_in.device)
    x0_r = x0_hat
    for _ in range(1, samples):
        z = draw(x_in.shape, generator, x_in.device, x_in.dtype)
        x_r = torch.where(keep, x_in, a * x0_r + s * z)
        x0_r = evaluate(x_r)
        loss = loss + guidance_fn(x0_r[:, changed]).sum()
    return loss / samples


def denoise(predictor, settings, path, x_in, t_in, t_next, start, uncond_history, changed, generator=None,
            noisy=None):
    """``(x0_hat, eps_hat)`` for the evaluated chunk frames, with history and gradient guidance (module doc).

    ``t_in``/``t_next`` ``[n]``: current and next times of the evaluated frames; ``noisy`` ``[n]``: frames
    not yet clean (re-noised by Monte Carlo guidance)."""
    guidance_fn, strength = settings.guidance_fn, settings.guidance_strength
    use_grad = guidance_fn is not None and strength != 0
    through_network = use_grad and settings.guidance_grad == "x_t"
    factor = guidance_factor(path, t_in, t_next, settings.guidance_scaling) if use_grad else None
    with torch.enable_grad() if through_network else torch.no_grad():
        if through_network:
            x_in = x_in.detach().requires_grad_(True)
        t_b = t_in[None].expand(x_in.shape[0], -1)
        to_x0 = lambda x: path.convert(guided_prediction(predictor, settings, x, t_in, start, uncond_history), x,
                                       t_b, src=settings.prediction, dst="x0")
        x0_hat = to_x0(x_in)
        if through_network:  # DF code: d loss / d x_t through the network
            loss = guidance_fn(x0_hat[:, changed]).sum()
            if settings.guidance_mc_samples > 1:
                loss = monte_carlo_loss(loss, x0_hat, x_in, t_b, to_x0, guidance_fn, changed,
                                        settings.guidance_mc_samples, path, generator, noisy)
            (grad,) = torch.autograd.grad(loss, x_in)
            step = strength * grad if factor is None else strength * broadcast_like(factor[None], grad) * grad
            x0_hat, x_in = x0_hat.detach() - step, x_in.detach()
    if use_grad and not through_network:  # d loss / d x0_hat at the prediction (no network backprop)
        with torch.enable_grad():
            x0_var = x0_hat.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(guidance_fn(x0_var[:, changed]).sum(), x0_var)
        x0_hat = x0_hat - (strength * grad if factor is None else strength * broadcast_like(factor[None], grad) * grad)
    if settings.clip_denoised is not None:
        x0_hat = x0_hat.clamp(-settings.clip_denoised, settings.clip_denoised)
    a, s = broadcast_like(path.alpha(t_b), x_in), broadcast_like(path.sigma(t_b), x_in)
    eps_hat = (x_in - a * x0_hat) / s.clamp(min=1e-8)
    return x0_hat, eps_hat
