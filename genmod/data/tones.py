"""Synthetic audio clips: pure tones, major/minor triads and formant vowels (``"tones"``).

Vowels are additive source-filter synthesis: a harmonic source with a -6 dB/octave tilt (amplitude
1/k) and 5 Hz vibrato, weighted by the magnitude response of a cascade of three second-order formant
resonators (Klatt, "Software for a cascade/parallel formant synthesizer", JASA 1980),
``|H(f)| = prod_i F_i^2 / sqrt((F_i^2 - f^2)^2 + (B_i f)^2)``, with the average adult-male formants
of Peterson & Barney (1952). Everything is deterministic from ``(seed, split, index)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .seeding import item_rng, split_id

CLASS_NAMES = ("tone", "major chord", "minor chord", "vowel a", "vowel e", "vowel i", "vowel o", "vowel u")
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

# (F1, F2, F3) in Hz, Peterson & Barney (1952) adult-male averages for /a/ (father), /e/ (bed),
# /i/ (beet), /o/ (bought), /u/ (boot); bandwidths are typical values.
FORMANTS = {
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (270.0, 2290.0, 3010.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (300.0, 870.0, 2240.0),
}
FORMANT_BANDWIDTHS = (80.0, 100.0, 120.0)
CHORD_INTERVALS = {"major chord": (0, 4, 7), "minor chord": (0, 3, 7)}


def midi_to_hz(note: float) -> float:
    """Equal temperament, A4 (MIDI 69) = 440 Hz."""
    return 440.0 * 2.0 ** ((note - 69) / 12)


def note_name(note: int) -> str:
    return f"{NOTE_NAMES[note % 12]}{note // 12 - 1}"


def formant_gain(freqs: np.ndarray, formants, bandwidths=FORMANT_BANDWIDTHS) -> np.ndarray:
    """Magnitude of a cascade of second-order resonators (unit gain at 0 Hz) at ``freqs``."""
    gain = np.ones_like(freqs, dtype=np.float64)
    for f_i, b_i in zip(formants, bandwidths):
        gain *= f_i**2 / np.sqrt((f_i**2 - freqs**2) ** 2 + (b_i * freqs) ** 2)
    return gain


def _envelope(num: int, sample_rate: int, attack: float = 0.02, release: float = 0.08) -> np.ndarray:
    """Raised-cosine attack and release so clips start and end at zero (no clicks)."""
    env = np.ones(num)
    a, r = min(num // 2, int(attack * sample_rate)), min(num // 2, int(release * sample_rate))
    if a:
        env[:a] = 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / a)
    if r:
        env[num - r :] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(r) + 1) / r)
    return env


class ToneDataset(Dataset):
    """1 s, 16 kHz mono clips of 8 classes (``CLASS_NAMES``) with captions such as
    ``"a pure tone, A4"``, ``"a C major chord"``, ``"the vowel a"``.

    Returns ``{"audio": (1, samples) in [-1, 1], "sample_rate": int, "label": int64, "caption": str}``.
    ``params(i)`` gives the fundamentals (Hz) and, for vowels, f0 and formants.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        sample_rate: int = 16000,
        duration: float = 1.0,
        seed: int = 0,
        cache: bool = True,
    ):
        split_id(split)
        if sample_rate < 8000:
            raise ValueError(f"sample_rate={sample_rate} must be >= 8000 (vowel formants reach 3 kHz)")
        if duration <= 0:
            raise ValueError(f"duration={duration} must be positive")
        self.split, self.seed, self.sample_rate, self.duration = split, int(seed), int(sample_rate), float(duration)
        self.num_samples = int(num_samples if num_samples is not None else (4000 if split == "train" else 800))
        if self.num_samples <= 0:
            raise ValueError(f"num_samples={num_samples} must be positive")
        self.num_frames = int(round(self.duration * self.sample_rate))
        self.class_names, self.num_classes, self.channels = list(CLASS_NAMES), len(CLASS_NAMES), 1
        self._params = [self._draw_params(i) for i in range(self.num_samples)]
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def _draw_params(self, index: int) -> dict:
        rng = item_rng(self.seed, self.split, index)
        label = int(rng.integers(len(CLASS_NAMES)))
        kind = CLASS_NAMES[label]
        gain = float(rng.uniform(0.3, 0.9))
        if kind == "tone":
            note = int(rng.integers(48, 85))
            return {"label": label, "kind": kind, "notes": [note], "fundamentals": [midi_to_hz(note)],
                    "gain": gain, "caption": f"a pure tone, {note_name(note)}"}
        if kind in CHORD_INTERVALS:
            root = int(rng.integers(48, 60))
            notes = [root + k for k in CHORD_INTERVALS[kind]]
            return {"label": label, "kind": kind, "notes": notes, "fundamentals": [midi_to_hz(n) for n in notes],
                    "gain": gain, "caption": f"a {NOTE_NAMES[root % 12]} {kind}"}
        vowel = kind.split()[1]
        f0 = float(rng.uniform(90.0, 250.0))
        return {"label": label, "kind": kind, "vowel": vowel, "f0": f0, "fundamentals": [f0],
                "formants": FORMANTS[vowel], "vibrato_phase": float(rng.uniform(0, 2 * np.pi)),
                "gain": gain, "caption": f"the vowel {vowel}"}

    def params(self, index: int) -> dict:
        return self._params[index]

    def synthesize(self, index: int) -> np.ndarray:
        """The clip of item ``index`` as float64 ``(samples,)``, peak = its gain."""
        p = self._params[index]
        sr, n = self.sample_rate, self.num_frames
        t = np.arange(n) / sr
        if p["kind"] == "tone":
            wave = np.sin(2 * np.pi * p["fundamentals"][0] * t)
        elif p["kind"] in CHORD_INTERVALS:
            # An organ-like timbre: four harmonics with amplitude 1/k^2 per chord note.
            wave = sum(np.sin(2 * np.pi * k * f * t) / k**2 for f in p["fundamentals"] for k in range(1, 5))
        else:
            f0_t = p["f0"] * (1 + 0.01 * np.sin(2 * np.pi * 5.0 * t + p["vibrato_phase"]))
            phase = 2 * np.pi * np.cumsum(f0_t) / sr
            harmonics = np.arange(1, int(min(5000.0, 0.45 * sr) // p["f0"]) + 1)
            amps = formant_gain(harmonics * p["f0"], p["formants"]) / harmonics
            # sin(k * phase) as Im(z^k) with z = exp(i * phase): one complex product per harmonic
            # instead of a sine (rounding grows like k * 1e-16, far below 16-bit audio).
            z = np.exp(1j * phase)
            power = np.ones_like(z)
            wave = np.zeros(n)
            for amp in amps:
                power *= z
                wave += amp * power.imag
        wave = wave * _envelope(n, sr)
        return p["gain"] * wave / np.abs(wave).max()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        audio = self._cache.get(index) if self._cache is not None else None
        if audio is None:
            audio = torch.from_numpy(self.synthesize(index)).float().unsqueeze(0)
            if self._cache is not None:
                self._cache[index] = audio
        p = self._params[index]
        return {
            "audio": audio,
            "sample_rate": self.sample_rate,
            "label": torch.tensor(p["label"], dtype=torch.int64),
            "caption": p["caption"],
        }
