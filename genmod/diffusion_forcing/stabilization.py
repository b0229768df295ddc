"""How clean frames are shown to a Diffusion Forcing model during a rollout ("stabilisation", Chen et al.
2024, Sec. 3.3): the model is told a clean frame is slightly noisy, at level ``t_c`` (``context_noise``),
so that its own small errors in generated frames do not compound. The official code bases disagree on
what the frame looks like, so each is a named mode (``x`` a clean frame, ``alpha, sigma`` at ``t_c``):

* ``"v1.5"`` (default; buoyancy99/diffusion-forcing main, its DDIM sampler): every clean frame, ground
  truth or generated, is shown as ``alpha x`` with **no noise**, at level ``t_c``.
* ``"v1.5_ddpm"`` (the same code's DDPM sampler): every clean frame is re-noised,
  ``alpha x + sigma z`` with **fresh** ``z`` at every denoising step.
* ``"dfot"`` (DFoT's ``stabilized_*`` history guidance, Song et al. 2025): **generated** frames get
  ``alpha x + sigma z`` with fresh ``z`` every step; ground-truth context is shown clean at level 0.
* ``"fixed_noise"`` (genmod up to session 5): every clean frame is ``alpha x + sigma z`` with ``z`` drawn
  once per frame and kept for the whole rollout.

The frames themselves are never changed, only the model's view of them. Modes with fresh noise change
the history at every step, so a rollout under them recomputes it (the KV cache is not used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genmod.core.paths import AffinePath

STABILIZATION_MODES = ("v1.5", "v1.5_ddpm", "dfot", "fixed_noise")


def draw(shape, generator, device, dtype) -> torch.Tensor:
    """Gaussian noise; ``generator`` may be a list of one per sample (diffusers convention)."""
    from diffusers.utils.torch_utils import randn_tensor

    gen_device = generator[0].device if isinstance(generator, list) else (generator.device if generator is not None else device)
    return randn_tensor(tuple(shape), generator=generator, device=torch.device(gen_device), dtype=dtype).to(device)


def present_clean(path: AffinePath, frames: torch.Tensor, context_noise: float, generator) -> torch.Tensor:
    """``alpha(t_c) x + sigma(t_c) z`` with ``z`` drawn now (``frames`` unchanged when ``t_c <= 0``)."""
    if context_noise <= 0:
        return frames
    z = draw(frames.shape, generator, frames.device, frames.dtype)
    t = torch.tensor(float(context_noise), dtype=torch.float64)
    return float(path.alpha(t)) * frames + float(path.sigma(t)) * z


@dataclass(frozen=True)
class Stabilizer:
    """One stabilisation mode at level ``level`` (``t_c``) on ``path`` (module doc).

    A frame goes through ``static`` once, when it becomes clean (context at the start, a generated frame
    when it reaches level 0); before every network call ``refresh`` maps the static views of the visible
    clean frames to what the model sees, and ``times`` gives their levels.
    """

    path: AffinePath
    mode: str = "v1.5"
    level: float = 0.02

    def __post_init__(self):
        if self.mode not in STABILIZATION_MODES:
            raise ValueError(f"stabilization: expected one of {', '.join(STABILIZATION_MODES)}, got {self.mode!r}")

    @property
    def fresh(self) -> bool:
        """True when the view changes at every step (fresh noise)."""
        return self.mode in ("v1.5_ddpm", "dfot") and self.level > 0

    def _coefficients(self) -> tuple[float, float]:
        t = torch.tensor(float(self.level), dtype=torch.float64)
        return float(self.path.alpha(t)), float(self.path.sigma(t))

    def static(self, frames: torch.Tensor, generator) -> torch.Tensor:
        """The per-frame part, done once: ``fixed_noise`` draws its ``z`` here, ``v1.5`` scales by alpha."""
        if self.mode == "fixed_noise":
            return present_clean(self.path, frames, self.level, generator)
        if self.mode == "v1.5" and self.level > 0:
            return self._coefficients()[0] * frames
        return frames

    def refresh(self, frames: torch.Tensor, generated: torch.Tensor, generator) -> torch.Tensor:
        """The per-step view of static views ``frames`` ``[B, n, ...]``; ``generated`` ``[n]`` bool marks
        frames the model made (the others are ground truth)."""
        if not self.fresh or frames.shape[1] == 0:
            return frames
        alpha, sigma = self._coefficients()
        noised = alpha * frames + sigma * draw(frames.shape, generator, frames.device, frames.dtype)
        if self.mode == "v1.5_ddpm":
            return noised
        keep = generated.to(frames.device).reshape(1, -1, *([1] * (frames.dim() - 2)))
        return torch.where(keep, noised, frames)

    def times(self, generated: torch.Tensor) -> torch.Tensor:
        """Levels ``[n]`` (float64) the model is told for clean frames: ``t_c``, or 0 for ``dfot`` ground truth."""
        level = torch.full(generated.shape, float(self.level), dtype=torch.float64, device=generated.device)
        if self.mode == "dfot":
            return torch.where(generated, level, torch.zeros_like(level))
        return level
