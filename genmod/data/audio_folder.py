"""A folder of audio files as a dataset (``AudioFolderDataset``, ``"audio_folder:/path"``), its
transcripts file (``read_transcripts``), and the decoding used by every audio dataset
(``load_audio``, ``fix_length``).

Reading, ``root/split`` folders and ``on_error`` are shared with the image folders (``folders.py``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .folders import (UnreadableFileError, check_on_error, evenly_spaced, progress, readable_name,
                      resolve_split_root, scan_class_folders, skip_or_raise, warn_skipped)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")


def load_audio(path: str | os.PathLike, sample_rate: int | None = None, channels: int = 1) -> tuple[torch.Tensor, int]:
    """Decode WAV/FLAC/OGG with soundfile to float ``(channels, samples)``; mono files are repeated
    to ``channels``, multi-channel ones averaged to mono; resampled with
    ``torchaudio.functional.resample`` when ``sample_rate`` differs. Returns ``(audio, rate)``."""
    import soundfile as sf

    try:
        data, rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, EOFError) as err:  # LibsndfileError is a RuntimeError
        raise UnreadableFileError(f"{path}: unreadable audio ({type(err).__name__}: {err})") from None
    if data.shape[0] == 0:
        raise UnreadableFileError(f"{path}: audio file has no samples")
    audio = torch.from_numpy(data.T.copy())
    if channels == 1 and audio.shape[0] > 1:
        audio = audio.mean(dim=0, keepdim=True)
    elif audio.shape[0] == 1 and channels > 1:
        audio = audio.expand(channels, -1).contiguous()
    elif audio.shape[0] != channels:
        raise UnreadableFileError(f"{path}: has {audio.shape[0]} channels, cannot make {channels}")
    if sample_rate is not None and rate != sample_rate:
        import torchaudio

        audio = torchaudio.functional.resample(audio, rate, sample_rate)
        rate = sample_rate
    return audio, int(rate)


def fix_length(audio: torch.Tensor, num_samples: int, crop: str = "start") -> torch.Tensor:
    """Crop (from the start or the center) or zero-pad at the end to exactly ``num_samples``."""
    n = audio.shape[-1]
    if n > num_samples:
        start = 0 if crop == "start" else (n - num_samples) // 2
        return audio[..., start : start + num_samples]
    if n < num_samples:
        return torch.nn.functional.pad(audio, (0, num_samples - n))
    return audio


def read_transcripts(path: str | os.PathLike) -> dict[str, dict]:
    """Transcripts/labels per file from a CSV (header with ``file``/``path``/``filename`` and
    ``text``/``transcript``/``caption``, optional ``label``) or JSON (``{file: text}``, a list of
    records, or ``{"items": [records]}``). Returns ``{relative file: {"text": str, "label": int?}}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"transcripts file {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if isinstance(data, dict) and "items" in data:
            data = data["items"]
        if isinstance(data, dict):
            records = [{"file": k, "text": v} for k, v in data.items()]
        elif isinstance(data, list):
            records = data
        else:
            raise ValueError(f"{path}: expected an object or a list of records")
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"{path}: transcripts must be .csv, .tsv or .json")
    out = {}
    for k, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {k} is not an object")
        name = rec.get("file") or rec.get("path") or rec.get("filename")
        text = rec.get("text", rec.get("transcript", rec.get("caption")))
        if not name or text is None:
            raise ValueError(f"{path}: record {k} needs a file/path field and a text/transcript/caption field")
        entry = {"text": str(text)}
        if rec.get("label") not in (None, ""):
            try:
                entry["label"] = int(rec["label"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: record {k} has a non-integer label {rec['label']!r}") from None
        out[str(name)] = entry
    return out


def _check_arguments(on_error: str, crop: str, sample_rate: int, duration: float | None, channels: int) -> None:
    check_on_error(on_error)
    if crop not in ("start", "center"):
        raise ValueError(f"crop={crop!r} must be 'start' or 'center'")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate} must be positive")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration={duration} must be positive or None")
    if channels < 1:
        raise ValueError(f"channels={channels} must be >= 1")


def _unreadable_message(path, err: Exception) -> str:
    return str(err) if isinstance(err, UnreadableFileError) else f"{path}: unreadable audio ({err})"


class AudioFolderDataset(Dataset):
    """Audio files (WAV/FLAC/OGG via soundfile) as fixed-length clips at ``sample_rate``.

    Labels come from class subfolders, or from a ``label`` column of the transcripts file (then
    ``class_names`` may be given); captions are the transcripts (``transcripts=`` path, or a
    ``metadata.json`` / ``transcripts.csv`` / ``transcripts.json`` found in ``root``) or the folder
    name. With transcripts, only the files they list are used. Clips are cropped (``crop="start"``
    or ``"center"``) or zero-padded to ``duration`` seconds (``None`` keeps each length).
    ``num_samples`` keeps that many files spread evenly over the list.
    """

    TRANSCRIPT_NAMES = ("metadata.json", "transcripts.csv", "transcripts.json", "metadata.csv")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        sample_rate: int = 16000,
        duration: float | None = 1.0,
        channels: int = 1,
        transcripts: str | os.PathLike | None = None,
        class_names: list[str] | None = None,
        crop: str = "start",
        on_error: str = "raise",
        preload: bool = True,
        extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
        num_samples: int | None = None,
    ):
        _check_arguments(on_error, crop, sample_rate, duration, channels)
        self.root = resolve_split_root(root, split)
        self.sample_rate, self.duration, self.channels, self.crop, self.on_error = sample_rate, duration, channels, crop, on_error
        self.num_samples_per_clip = None if duration is None else int(round(duration * sample_rate))
        self.transcripts_path = self._find_transcripts(transcripts)
        if self.transcripts_path is not None:
            files, labels, captions = self._list_transcribed(class_names)
        else:
            files, labels, captions = self._list_folders(class_names, extensions)
        if not files:
            raise FileNotFoundError(f"no audio files ({', '.join(extensions)}) under {self.root}")
        files, labels, captions = map(list, zip(*evenly_spaced(list(zip(files, labels, captions)), num_samples)))
        self.num_classes = len(self.class_names)
        clips = self._read_files(files, labels, captions, preload)
        self._clips = clips if preload else None

    def _find_transcripts(self, transcripts: str | os.PathLike | None) -> Path | None:
        """The given transcripts file, else the first of ``TRANSCRIPT_NAMES`` in ``self.root``, else None."""
        if transcripts is None:
            transcripts = next((self.root / n for n in self.TRANSCRIPT_NAMES if (self.root / n).is_file()), None)
        return None if transcripts is None else Path(transcripts)

    def _list_transcribed(self, class_names: list[str] | None) -> tuple[list, list[int], list[str]]:
        """Files, labels (-1 without one) and captions listed in the transcripts file (sets ``class_names``)."""
        texts = read_transcripts(self.transcripts_path)
        base = self.transcripts_path.parent
        files = [base / name for name in texts]
        keys = list(texts)
        has_labels = any("label" in e for e in texts.values())
        labels = [texts[k].get("label", -1) for k in keys]
        if class_names is not None:
            self.class_names = list(class_names)
        elif has_labels:
            self.class_names = [str(k) for k in range(max(labels) + 1)]
        else:
            self.class_names = []
        captions = [texts[k]["text"] for k in keys]
        return files, labels, captions

    def _list_folders(self, class_names: list[str] | None, extensions: tuple[str, ...]) -> tuple[list, list[int], list[str]]:
        """Files and labels from class subfolders, captioned by the class name (sets ``class_names``)."""
        files, labels, self.class_names = scan_class_folders(self.root, tuple(e.lower() for e in extensions))
        if class_names is not None:
            self.class_names = list(class_names)
        captions = [readable_name(self.class_names[k]) for k in labels]
        return files, labels, captions

    def _read_files(self, files: list, labels: list[int], captions: list[str], preload: bool) -> list[torch.Tensor]:
        """Decode (``preload``) or probe every file; readable ones fill ``files`` / ``labels`` /
        ``captions``, the others ``skipped`` (or raise). Returns the clips (empty without ``preload``)."""
        import soundfile as sf

        self.skipped: list[tuple[str, str]] = []
        self.files, self.labels, self.captions = [], [], []
        clips = []
        for path, label, caption in zip(progress(files, "reading audio"), labels, captions):
            try:
                if not Path(path).is_file():
                    raise UnreadableFileError(f"{path}: listed in {self.transcripts_path} but missing")
                if preload:
                    clips.append(self._load(path))
                else:
                    sf.info(os.fspath(path))
            except (UnreadableFileError, RuntimeError, OSError, ValueError) as err:
                skip_or_raise(self.skipped, path, _unreadable_message(path, err), self.on_error)
                continue
            self.files.append(str(path))
            self.labels.append(int(label))
            self.captions.append(caption)
        warn_skipped(self.skipped, self.root, "audio")
        if not self.files:
            raise FileNotFoundError(f"no readable audio files under {self.root} ({len(self.skipped)} skipped)")
        return clips

    def _load(self, path) -> torch.Tensor:
        audio, _ = load_audio(path, self.sample_rate, self.channels)
        if self.num_samples_per_clip is not None:
            audio = fix_length(audio, self.num_samples_per_clip, self.crop)
        return audio.clamp(-1.0, 1.0)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        audio = self._clips[index] if self._clips is not None else self._load(self.files[index])
        return {
            "audio": audio,
            "sample_rate": self.sample_rate,
            "label": torch.tensor(self.labels[index], dtype=torch.int64),
            "caption": self.captions[index],
        }
