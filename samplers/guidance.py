"""Classifier-free guidance (Ho & Salimans 2022) with an optional guidance interval.

``pred = pred_uncond + w (pred_cond - pred_uncond)``; ``w = 1`` is no guidance, ``w = 0`` is the
unconditional model (docs/DESIGN.md §1). With ``guidance_interval = (t_lo, t_hi)`` guidance applies only
where ``t_lo <= t <= t_hi`` and the plain conditional prediction is used elsewhere (Kynkäänniemi et al.
2024, "Applying guidance in a limited interval", Sec. 3). Conditional and null inputs run in ONE batched
forward; when no element of the batch is guided, only the conditional half is run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from genmod.core.paths import broadcast_like


def combine_guidance(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale,
                     channels: int | None = None) -> torch.Tensor:
    """The one classifier-free guidance combine of the package: ``u + w (c - u)`` (Ho & Salimans 2022, eq. 6).

    ``guidance_scale`` is a number or a tensor that broadcasts from the left (``[B]`` per sample,
    ``[B, T]`` per token); ``w = 1`` returns ``pred_cond``. Works for velocities, x0 / eps and logits.
    ``channels=k`` guides only the first k channels (dim 1) and keeps the conditional prediction on the
    others: the released DiT / SiT samplers guide 3 of 4 latent channels (SiT ``forward_with_cfg``).
    """
    if not torch.is_tensor(guidance_scale):
        guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    else:
        guided = pred_uncond + broadcast_like(guidance_scale, pred_cond) * (pred_cond - pred_uncond)
    if channels is None or channels >= pred_cond.shape[1]:
        return guided
    return torch.cat([guided[:, :channels], pred_cond[:, channels:]], dim=1)


def _concat(cond: Any, null: Any):
    """Concatenate conditions along the batch dim (tensors, or dicts / tuples / lists of tensors)."""
    if torch.is_tensor(cond):
        if not torch.is_tensor(null) or null.shape[1:] != cond.shape[1:]:
            raise ValueError(f"null_cond: must be a tensor shaped like cond {tuple(cond.shape)}")
        return torch.cat([cond, null.expand_as(cond) if null.shape[0] == 1 else null])
    if isinstance(cond, dict):
        if not isinstance(null, dict) or set(null) != set(cond):
            raise ValueError(f"null_cond: must be a dict with the keys of cond {sorted(cond)}")
        return {key: _concat(cond[key], null[key]) for key in cond}
    if isinstance(cond, (tuple, list)):
        if not isinstance(null, (tuple, list)) or len(null) != len(cond):
            raise ValueError("null_cond: must be a sequence as long as cond")
        return type(cond)(_concat(c, n) for c, n in zip(cond, null))
    raise ValueError(f"cond: expected a tensor, dict, tuple or list of tensors, got {type(cond).__name__}")


def classifier_free_guidance(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    cond: Any,
    null_cond: Any,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    channels: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``fn(x, t)`` computing ``u + w (c - u)`` from one batched ``model_fn(x, t, cond)`` call.

    Args:
        model_fn: ``(x [B, ...], t [B] or [B, T], cond) -> prediction`` (velocity, x0, eps or logits).
        cond / null_cond: conditioning of the batch and its null (e.g. labels and the null class); a
            null with batch size 1 is broadcast.
        guidance_scale: ``w``; 1 turns guidance off (only the conditional half is run).
        guidance_interval: ``(t_lo, t_hi)``; outside it ``w = 1``.
        channels: guide only the first k channels (see :func:`combine_guidance`); None = all.
    """
    if guidance_interval is not None:
        t_lo, t_hi = guidance_interval
        if not 0 <= t_lo <= t_hi <= 1:
            raise ValueError(f"guidance_interval: need 0 <= t_lo <= t_hi <= 1, got {guidance_interval}")
    both = _concat(cond, null_cond)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return model_fn(x, t, cond)
        w = torch.full_like(t, float(guidance_scale), dtype=torch.float32 if not t.is_floating_point() else t.dtype)
        if guidance_interval is not None:
            inside = (t >= guidance_interval[0]) & (t <= guidance_interval[1])
            if not inside.any():
                return model_fn(x, t, cond)
            w = torch.where(inside, w, torch.ones_like(w))
        batch = x.shape[0]
        pred = model_fn(torch.cat([x, x]), torch.cat([t, t]), both)
        pred_cond, pred_uncond = pred[:batch], pred[batch:]
        return combine_guidance(pred_cond, pred_uncond, w, channels=channels)

    return guided
