"""A spoken-digits corpus synthesised locally with espeak-ng, and its dataset (``"speech_digits"``).

``genmod make-speech-digits --out DIR --num N --seed S`` writes ``DIR/clips/00000.wav ...`` (16 kHz
mono, 16-bit) and ``DIR/metadata.json``: one record per clip with its text ("seven", "three one
four"), digits, voice, speed (words/min), pitch (0-99), split and length. The choice of texts,
voices, speeds and pitches is deterministic from the seed; the waveforms are deterministic for a
given espeak-ng version (recorded in the metadata). It is synthetic speech: a narrow distribution,
fine for pipeline tests and relative comparisons (an SC09-like stand-in), not for claims about
real-speech quality.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .audio_folder import fix_length, load_audio

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voices (language + variant); several accents, male and female variants.
VOICES = (
    "en-us", "en-us+f2", "en-us+m3", "en-us+f4", "en-gb", "en-gb+m7", "en-gb+f3",
    "en-gb-scotland", "en-gb-scotland+f5", "en-029+m2", "en-gb-x-rp+m5", "en-us+klatt",
)
SPEED_RANGE = (130, 190)  # words per minute
PITCH_RANGE = (25, 75)  # espeak-ng pitch adjustment, 0-99
SINGLE_DIGIT_FRACTION = 0.6
MAX_SEQUENCE_LENGTH = 4
SILENCE_THRESHOLD = 0.01  # trim leading/trailing samples quieter than this, keeping EDGE_PAD_S
EDGE_PAD_S = 0.05
METADATA = "metadata.json"


def espeak_binary() -> str:
    """Path of espeak-ng, or a clear error saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError("espeak-ng not found on PATH; install it with `apt-get install espeak-ng` (install.sh does it)")
    return path


def espeak_version(binary: str | None = None) -> str:
    out = subprocess.run([binary or espeak_binary(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def plan_corpus(num: int, seed: int, test_fraction: float = 0.1) -> list[dict]:
    """The text, voice, speed, pitch and split of every clip, from the seed alone."""
    rng = np.random.default_rng([int(seed), 7919])
    records = []
    for i in range(num):
        if rng.random() < SINGLE_DIGIT_FRACTION:
            digits = [int(rng.integers(10))]
        else:
            digits = [int(d) for d in rng.integers(10, size=int(rng.integers(2, MAX_SEQUENCE_LENGTH + 1)))]
        records.append({
            "file": f"clips/{i:05d}.wav",
            "text": " ".join(DIGIT_WORDS[d] for d in digits),
            "digits": digits,
            "label": digits[0] if len(digits) == 1 else -1,
            "voice": VOICES[int(rng.integers(len(VOICES)))],
            "speed": int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
            "pitch": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
            "split": "test" if rng.random() < test_fraction else "train",
        })
    return records


def synthesize(text: str, voice: str, speed: int, pitch: int, sample_rate: int = 16000, binary: str | None = None) -> np.ndarray:
    """Speak ``text`` with espeak-ng (WAV on stdout), trim silence, resample to ``sample_rate``;
    float32 mono ``(samples,)``."""
    import soundfile as sf
    import torchaudio

    cmd = [binary or espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    data, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    wave = data.mean(axis=1)
    loud = np.nonzero(np.abs(wave) > SILENCE_THRESHOLD)[0]
    if len(loud):
        pad = int(EDGE_PAD_S * rate)
        wave = wave[max(0, loud[0] - pad) : loud[-1] + pad + 1]
    if rate != sample_rate:
        wave = torchaudio.functional.resample(torch.from_numpy(wave).unsqueeze(0), rate, sample_rate)[0].numpy()
    return np.clip(wave, -1.0, 1.0)


MAX_CLIPS = 1_000_000  # --num cap: the corpus plan is built in memory before espeak-ng runs


def generate_speech_digits(out: str | os.PathLike, num: int = 2000, seed: int = 0, sample_rate: int = 16000,
                           test_fraction: float = 0.1, workers: int = 2, progress: bool = True) -> Path:
    """Write ``num`` clips and ``metadata.json`` into ``out``; returns the metadata path."""
    import soundfile as sf
    from tqdm.auto import tqdm

    if num <= 0:
        raise ValueError(f"--num {num} must be positive")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1)")
    binary = espeak_binary()
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    records = plan_corpus(num, seed, test_fraction)

    def make(record: dict) -> int:
        wave = synthesize(record["text"], record["voice"], record["speed"], record["pitch"], sample_rate, binary)
        sf.write(out / record["file"], wave, sample_rate, subtype="PCM_16")
        return len(wave)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each job waits on an espeak-ng process
        lengths = list(tqdm(pool.map(make, records), total=num, desc="speech digits", disable=not progress))
    for record, n in zip(records, lengths):
        record["num_samples"] = int(n)
    meta = {"sample_rate": sample_rate, "seed": seed, "espeak_ng": espeak_version(binary),
            "class_names": list(DIGIT_WORDS), "items": records}
    path = out / METADATA
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)  # metadata appears only once every clip is written
    return path


def default_root() -> Path:
    base = os.environ.get("GENMOD_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "genmod")
    return Path(base) / "speech_digits"


class SpeechDigitsDataset(Dataset):
    """The espeak-ng spoken-digits corpus: ``{"audio": (1, samples), "sample_rate", "label", "caption"}``.

    ``label`` is the digit for single-digit clips and -1 for sequences (``single_digits_only=True``
    keeps only the former); ``caption`` is the spoken text. Clips are zero-padded / cropped to
    ``duration`` seconds (``None`` keeps each length); ``drop_longer=True`` drops the clips longer than
    ``duration`` instead of cropping them, so every kept clip still says all of its caption (what
    text-to-speech training needs). ``root`` defaults to
    ``$GENMOD_DATA_DIR/speech_digits`` or ``~/.cache/genmod/speech_digits``; ``generate=True``
    creates a missing corpus there (``num``/``seed``). ``num_samples`` keeps the first clips.
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, duration: float | None = 2.0,
                 single_digits_only: bool = False, generate: bool = False, num: int = 2000, seed: int = 0,
                 num_samples: int | None = None, drop_longer: bool = False):
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} must be 'train' or 'test'")
        if duration is not None and duration <= 0:
            raise ValueError(f"duration={duration} must be positive or None")
        self.root = Path(root).expanduser() if root is not None else default_root()
        meta_path = self.root / METADATA
        if not meta_path.is_file():
            if not generate:
                raise FileNotFoundError(f"no speech-digits corpus at {self.root} ({METADATA} missing); "
                                        f"create it with `genmod make-speech-digits --out {self.root}`")
            generate_speech_digits(self.root, num=num, seed=seed)
        try:
            meta = json.loads(meta_path.read_text())
            self.sample_rate = int(meta["sample_rate"])
            items = [r for r in meta["items"] if r["split"] == split]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path}: not a speech-digits metadata file ({type(err).__name__}: {err})") from None
        if single_digits_only:
            items = [r for r in items if r["label"] >= 0]
        if drop_longer:
            if duration is None:
                raise ValueError("drop_longer=True needs a duration")
            items = [r for r in items if r["num_samples"] <= duration * self.sample_rate]
        if num_samples is not None:
            if num_samples <= 0:
                raise ValueError(f"num_samples={num_samples} must be positive")
            items = items[:num_samples]
        if not items:
            raise ValueError(f"{meta_path}: no {split} clips")
        self.items, self.split, self.duration = items, split, duration
        self.class_names, self.num_classes, self.channels = list(DIGIT_WORDS), len(DIGIT_WORDS), 1
        self._num = None if duration is None else int(round(duration * self.sample_rate))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        rec = self.items[index]
        audio, _ = load_audio(self.root / rec["file"], self.sample_rate, 1)
        if self._num is not None:
            audio = fix_length(audio, self._num)
        return {"audio": audio, "sample_rate": self.sample_rate,
                "label": torch.tensor(rec["label"], dtype=torch.int64), "caption": rec["text"]}


def main(argv: list[str] | None = None) -> int:
    """``genmod make-speech-digits --out DIR --num N --seed S``."""
    parser = argparse.ArgumentParser(prog="genmod make-speech-digits",
                                     description="Generate the spoken-digits corpus with espeak-ng (16 kHz mono WAVs + metadata.json).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=2000, help="number of clips (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for texts, voices, speeds and pitches")
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--test-fraction", type=float, default=0.1, help="fraction of clips marked split=test")
    parser.add_argument("--workers", type=int, default=2, help="espeak-ng processes at once")
    args = parser.parse_args(argv)
    from genmod.core.arguments import check_count, check_finite
    from genmod.core.files import check_output_path

    check_count("--num", args.num, 1, MAX_CLIPS)
    check_count("--sample-rate", args.sample_rate, 1000, 384000)
    check_finite("--test-fraction", args.test_fraction, 0.0)
    check_count("--workers", args.workers, 1, 64)
    check_output_path(args.out, folder=True)
    path = generate_speech_digits(args.out, args.num, args.seed, args.sample_rate, args.test_fraction, args.workers)
    print(f"wrote {args.num} clips and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
