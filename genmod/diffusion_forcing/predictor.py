"""The network call of a Diffusion Forcing rollout: history + chunk frames in, chunk predictions out.

``Predictor`` holds the chunk's history (the clean frames, their stabilised views and which of them were
generated), encodes it once into a KV cache when that is exact (causal model, history fixed during the
chunk), and maps package times to what the network's embedder sees with ``path.network_timestep``
(``1000 t`` on continuous paths, the DDPM step ``n`` on discrete ones, never below 0: a clean frame on a
discrete path is fed as step 0, as DFoT clamps its level -1).
"""

from __future__ import annotations

import torch

from genmod.core.paths import AffinePath
from genmod.diffusion_forcing.stabilization import Stabilizer, draw


def network_levels(path: AffinePath, t: torch.Tensor) -> torch.Tensor:
    """What the embedder sees for package times ``t`` (``path.network_timestep``, clamped at 0)."""
    return path.network_timestep(t).clamp(min=0)


class Predictor:
    """Runs the model on ``history + chunk`` (or the chunk with a cached history) and returns predictions
    of the chunk frames in the model's prediction type."""

    def __init__(self, model, labels, actions, path: AffinePath, stabilizer: Stabilizer, generator):
        self.model, self.labels, self.actions, self.path = model, labels, actions, path
        self.stabilizer, self.generator = stabilizer, generator
        self.caches = None
        self.history = None  # (static views [B, n, ...], clean frames [B, n, ...], first index, generated [n])

    @property
    def causal(self) -> bool:
        return bool(getattr(self.model.config, "causal", True))

    def set_history(self, static, clean, start: int, generated, use_cache: bool, keep_cache: bool = False):
        """History for the next chunk; ``use_cache`` encodes it once now (``keep_cache``: extend the old cache)."""
        has = static is not None and static.shape[1] > 0
        self.history = (static, clean, start, generated) if has else (None, None, start, None)
        if not use_cache:
            self.caches = None
            return
        if not keep_cache or self.caches is None:
            self.caches = self.model.make_kv_caches()
            if has:
                self._forward(static, self._ctx_levels(static, generated), start, self.caches, update_cache=True)

    def append_to_cache(self, static: torch.Tensor, start: int, keep_frames: int):
        """Incremental cache: add finished frames, then keep only the last ``keep_frames`` frames."""
        generated = torch.ones(static.shape[1], dtype=torch.bool, device=static.device)
        self._forward(static, self._ctx_levels(static, generated), start, self.caches, update_cache=True)
        per = self.model.tokens_per_frame
        for cache in self.caches:
            cache.crop(keep_frames * per) if keep_frames > 0 else cache.reset()

    def _ctx_levels(self, frames, generated, times=None):
        times = self.stabilizer.times(generated) if times is None else times
        return network_levels(self.path, times).float().to(frames.device).expand(frames.shape[0], -1)

    def _actions(self, start: int, count: int):
        return None if self.actions is None else self.actions[:, start:start + count]

    def _forward(self, x, timestep, start, caches, update_cache=False, history_cut=None):
        return self.model(x, timestep, self.labels, actions=self._actions(start, x.shape[1]), frame_offset=start,
                          kv_caches=caches, update_cache=update_cache, history_cut=history_cut).sample

    def presented_history(self):
        """``(frames, times)`` of the history as the model sees it now (fresh stabilisation noise drawn here)."""
        static, _, _, generated = self.history
        return self.stabilizer.refresh(static, generated, self.generator), self.stabilizer.times(generated)

    def noised_history(self, levels: torch.Tensor):
        """``(frames, times)`` of the history with frame ``j`` noised afresh to ``levels[j] > 0`` and the
        frames at level 0 as presented (a partial history condition of history guidance)."""
        shown, times = self.presented_history()
        _, clean, _, _ = self.history
        levels = levels.to(device=clean.device, dtype=torch.float64)
        a = self.path.alpha(levels).to(clean.dtype).reshape(1, -1, *([1] * (clean.dim() - 2)))
        s = self.path.sigma(levels).to(clean.dtype).reshape(a.shape)
        noised = a * clean + s * draw(clean.shape, self.generator, clean.device, clean.dtype)
        use = (levels > 0).reshape(a.shape)
        return torch.where(use, noised, shown), torch.where(levels > 0, levels, times.to(levels.device))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, start: int, history="keep") -> torch.Tensor:
        """Prediction for chunk frames ``x`` ``[B, n, ...]`` at times ``t`` ``[n]`` starting at frame ``start``.

        ``history``: ``keep`` (cached or explicit), ``drop`` (masked out), a tensor of replacement history
        frames shown at ``t = 1``, or ``(frames, times)`` replacement frames with their own times.
        """
        batch = x.shape[0]
        levels = network_levels(self.path, t.float()).to(x.device).expand(batch, -1)
        static, _, hist_start, _ = self.history
        if isinstance(history, torch.Tensor):
            history = (history, torch.ones(history.shape[1], dtype=torch.float64))
        if isinstance(history, tuple):
            frames, times = history
            full_x = torch.cat([frames, x], 1)
            full_t = torch.cat([self._ctx_levels(frames, None, times), levels], 1)
            return self._forward(full_x, full_t, hist_start, None)[:, frames.shape[1]:]
        if history == "drop":
            return self._forward(x, levels, start, None)
        if self.caches is not None or static is None:
            return self._forward(x, levels, start, self.caches)
        return self(x, t, start, history=self.presented_history())
