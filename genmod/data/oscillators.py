"""Noisy damped oscillators: a sequence dataset with a known clean continuation (``"oscillators"``).

Each dimension ``d`` of item ``i`` is the under-damped solution of ``x'' + 2 gamma x' + omega_0^2 x = 0``,

    x_d(t) = A_d exp(-gamma_d t) cos(2 pi f_d t + phi_d),      f_d = sqrt(omega_0^2 - gamma_d^2) / (2 pi),

sampled at ``t_k = k * dt`` and observed with i.i.d. Gaussian noise of std ``noise_std``. The clean
function is exposed (``clean``) so a model's continuation can be compared with the truth at any time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .seeding import item_rng, split_id

# Frequency bins (Hz) that define the class label: the bin of dimension 0's frequency.
FREQUENCY_BINS = ((0.5, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, 2.5))


@dataclass
class OscillatorParams:
    """Per-dimension amplitude, damping (1/s), frequency (Hz) and phase (rad), each shape ``(D,)``."""

    amplitude: np.ndarray
    damping: np.ndarray
    frequency: np.ndarray
    phase: np.ndarray


def damped_oscillation(params: OscillatorParams, times) -> np.ndarray:
    """The clean trajectory ``(len(times), D)`` at arbitrary (e.g. future) times in seconds."""
    t = np.asarray(times, dtype=np.float64)[:, None]
    return params.amplitude * np.exp(-params.damping * t) * np.cos(2 * np.pi * params.frequency * t + params.phase)


class DampedOscillatorDataset(Dataset):
    """Noisy damped oscillators: ``{"sequence": (T, D) float32, "label": frequency bin of dim 0}``.

    Frequencies are uniform in [0.5, 2.5) Hz, damping in [0, 0.6] 1/s, amplitude in [0.5, 1], phase
    in [0, 2 pi); ``dt = 0.05`` s. ``clean(i, times)`` gives the noise-free value at any times and
    ``times(num_steps)`` the sampling grid, so continuations past ``num_steps`` can be judged.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        num_steps: int = 64,
        dim: int = 1,
        dt: float = 0.05,
        noise_std: float = 0.05,
        seed: int = 0,
    ):
        split_id(split)
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        if dim < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        if dt <= 0:
            raise ValueError(f"dt={dt} must be positive")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must be >= 0")
        self.split, self.seed = split, int(seed)
        self.num_samples = int(num_samples if num_samples is not None else (10000 if split == "train" else 2000))
        if self.num_samples <= 0:
            raise ValueError(f"num_samples={num_samples} must be positive")
        self.num_steps, self.dim, self.dt, self.noise_std = int(num_steps), int(dim), float(dt), float(noise_std)
        self.class_names = [f"{lo:g}-{hi:g} Hz" for lo, hi in FREQUENCY_BINS]
        self.num_classes = len(FREQUENCY_BINS)
        self._params = [self._draw_params(i) for i in range(self.num_samples)]
        grid = self.times(self.num_steps)
        sequences = np.empty((self.num_samples, self.num_steps, self.dim), dtype=np.float32)
        for i, p in enumerate(self._params):
            noise = item_rng(self.seed, split, i, stream=1).standard_normal((self.num_steps, self.dim))
            sequences[i] = damped_oscillation(p, grid) + self.noise_std * noise
        self._sequences = torch.from_numpy(sequences)

    def _draw_params(self, index: int) -> OscillatorParams:
        rng = item_rng(self.seed, self.split, index)
        d = self.dim
        return OscillatorParams(
            amplitude=rng.uniform(0.5, 1.0, d),
            damping=rng.uniform(0.0, 0.6, d),
            frequency=rng.uniform(FREQUENCY_BINS[0][0], FREQUENCY_BINS[-1][1], d),
            phase=rng.uniform(0.0, 2 * np.pi, d),
        )

    def times(self, num_steps: int) -> np.ndarray:
        """Sampling times ``k * dt`` for ``k < num_steps`` (seconds)."""
        return np.arange(num_steps) * self.dt

    def params(self, index: int) -> OscillatorParams:
        return self._params[index]

    def clean(self, index: int, times=None) -> np.ndarray:
        """Noise-free trajectory of item ``index`` at ``times`` (default: its own grid), ``(len, D)``."""
        return damped_oscillation(self._params[index], self.times(self.num_steps) if times is None else times)

    def label(self, index: int) -> int:
        f = self._params[index].frequency[0]
        return next(k for k, (lo, hi) in enumerate(FREQUENCY_BINS) if lo <= f < hi)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return {"sequence": self._sequences[index], "label": torch.tensor(self.label(index), dtype=torch.int64)}
