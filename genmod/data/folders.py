"""User data: a folder of images, a folder of audio files, and torchvision datasets by name.

Unreadable or corrupt files are named with their path. ``on_error="raise"`` stops with a one-line
error; ``on_error="skip"`` leaves them out and logs how many were skipped (logger ``genmod.data``);
the skipped ``(path, reason)`` pairs are kept in ``dataset.skipped``.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger("genmod.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")
ON_ERROR = ("skip", "raise")
PROGRESS_MIN_FILES = 500  # show a progress bar when preloading at least this many files


class UnreadableFileError(ValueError):
    """A data file could not be decoded; the message starts with its path."""


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")


def _readable_name(folder: str) -> str:
    return folder.replace("_", " ").replace("-", " ").strip()


def _scan(root: Path, extensions: tuple[str, ...]) -> tuple[list[Path], list[int], list[str]]:
    """Files under ``root``: class subfolders give labels (sorted names); with no subfolder holding
    data files, the files directly in ``root`` form a single class named after ``root``."""
    def files_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_dirs = [d for d in class_dirs if files_in(d)]
    if not class_dirs:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        return files, [0] * len(files), [_readable_name(root.name) or "data"]
    files, labels = [], []
    for k, d in enumerate(class_dirs):
        found = files_in(d)
        files += found
        labels += [k] * len(found)
    return files, labels, [d.name for d in class_dirs]


def _resolve_split_root(root: str | os.PathLike, split: str | None) -> Path:
    """``root/split`` when it exists (e.g. ``train/``, ``test/``), else ``root`` itself."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} does not exist")
    if split and (path / split).is_dir():
        return path / split
    return path


def _evenly_spaced(items: list, num: int | None, name: str = "num_samples") -> list:
    """``num`` items spread evenly over ``items`` (sorted by class, so every class keeps its share)."""
    if num is None or num >= len(items):
        return items
    if num <= 0:
        raise ValueError(f"{name}={num} must be positive")
    picks = np.linspace(0, len(items) - 1, num).round().astype(int)
    return [items[k] for k in picks]


def _progress(items, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=len(items) < PROGRESS_MIN_FILES)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, image_size: int | None, channels: int) -> torch.Tensor:
    """Decode an image to uint8 ``(C, S, S)``: shorter side resized to ``image_size`` (bicubic,
    antialiased) then center-cropped; ``image_size=None`` keeps the original size."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if image_size is not None:
                w, h = img.size
                scale = image_size / min(w, h)
                new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
                img = img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
                left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
                img = img.crop((left, top, left + image_size, top + image_size))
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise UnreadableFileError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Images in class subfolders (``root/cat/001.png`` -> label of "cat", caption "a photo of a cat").

    With ``root/train`` and ``root/test`` present, ``split`` picks one. Images are resized (shorter
    side) and center-cropped to ``image_size``; ``preload=True`` decodes everything once (errors are
    found up front), ``preload=False`` only checks that each file opens and decodes on access.
    ``num_samples`` keeps that many files spread evenly over the class-sorted list.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        image_size: int | None = 32,
        channels: int = 3,
        on_error: str = "raise",
        preload: bool = True,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        num_samples: int | None = None,
    ):
        from PIL import Image

        _check_on_error(on_error)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 or 3")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size={image_size} must be positive")
        self.root = _resolve_split_root(root, split)
        files, labels, self.class_names = _scan(self.root, tuple(e.lower() for e in extensions))
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(extensions)}) under {self.root}")
        files, labels = map(list, zip(*_evenly_spaced(list(zip(files, labels)), num_samples)))
        self.num_classes, self.channels, self.on_error = len(self.class_names), channels, on_error
        self.image_size = image_size
        self.skipped: list[tuple[str, str]] = []
        self.files: list[str] = []
        self.labels: list[int] = []
        images = []
        for path, label in zip(_progress(files, "reading images"), labels):
            try:
                if preload:
                    images.append(load_image(path, image_size, channels))
                else:
                    with Image.open(path) as img:
                        img.verify()
            except Exception as err:  # noqa: BLE001 - every decoder failure means "unreadable file"
                message = str(err) if isinstance(err, UnreadableFileError) else f"{path}: unreadable image ({type(err).__name__}: {err})"
                if on_error == "raise":
                    raise UnreadableFileError(message) from None
                self.skipped.append((str(path), message))
                logger.debug("skipping %s", message)
                continue
            self.files.append(str(path))
            self.labels.append(label)
        if self.skipped:
            logger.warning("skipped %d unreadable image file(s) under %s (first: %s)",
                           len(self.skipped), self.root, self.skipped[0][0])
        if not self.files:
            raise FileNotFoundError(f"no readable image files under {self.root} ({len(self.skipped)} skipped)")
        if preload and image_size is None and len({tuple(x.shape) for x in images}) > 1:
            raise ValueError(f"images under {self.root} differ in size; pass image_size=N to resize them")
        self._images = images if preload else None
        if self.image_size is None:
            self.image_size = int((images[0] if preload else load_image(self.files[0], None, channels)).shape[-1])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        img = self._images[index] if self._images is not None else load_image(self.files[index], self.image_size, self.channels)
        label = self.labels[index]
        return {
            "image": img.float() / 127.5 - 1.0,
            "label": torch.tensor(label, dtype=torch.int64),
            "caption": f"a photo of a {_readable_name(self.class_names[label])}",
        }


class TorchvisionDataset(Dataset):
    """A ``torchvision.datasets`` class by name (``"torchvision:CIFAR10"``) returning package dicts.

    Downloads only with ``download=True``; otherwise a missing dataset is a clear error. ``split``
    maps to ``train=`` or ``split=`` depending on the class. Images become ``(C, H, W)`` in [-1, 1],
    optionally resized (shorter side + center crop) to ``image_size`` and converted to ``channels``;
    ``num_samples`` keeps that many items spread evenly over the dataset.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        root: str | os.PathLike | None = None,
        download: bool = False,
        image_size: int | None = None,
        channels: int | None = None,
        num_samples: int | None = None,
        **kwargs,
    ):
        import torchvision

        cls = getattr(torchvision.datasets, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, Dataset)):
            raise ValueError(f"torchvision.datasets has no dataset named {name!r} (e.g. CIFAR10, MNIST, SVHN)")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels={channels} must be 1, 3 or None")
        self.root = os.fspath(root) if root is not None else os.path.join(os.path.expanduser("~"), ".cache", "torchvision")
        sig = inspect.signature(cls).parameters
        if "train" in sig:
            kwargs["train"] = split == "train"
        elif "split" in sig:
            kwargs["split"] = split
        if "root" in sig:
            kwargs["root"] = self.root
        if "download" in sig:
            kwargs["download"] = download
        try:
            self.dataset = cls(**kwargs)
        except RuntimeError as err:
            if download:
                raise RuntimeError(f"torchvision:{name}: download into {self.root} failed: {err}") from None
            raise FileNotFoundError(
                f"torchvision:{name} ({split}) not found under {self.root}; pass root=DIR or download=True (needs internet)"
            ) from None
        self.name, self.split = name, split
        self.image_size, self._channels = image_size, channels
        self.class_names = list(getattr(self.dataset, "classes", []) or [])
        self.num_classes = len(self.class_names)
        self.indices = _evenly_spaced(list(range(len(self.dataset))), num_samples)
        first = self._image(0)
        self.channels, self.image_size = int(first.shape[0]), int(first.shape[-1])

    def _image(self, index: int) -> torch.Tensor:
        from PIL import Image

        img = self.dataset[self.indices[index]][0]
        if not isinstance(img, Image.Image):
            raise TypeError(f"torchvision:{self.name} returns {type(img).__name__} images; expected PIL images")
        channels = self._channels or (1 if img.mode in ("L", "1", "I", "F") else 3)
        img = img.convert("RGB" if channels == 3 else "L")
        if self.image_size is not None and img.size != (self.image_size, self.image_size):
            w, h = img.size
            scale = self.image_size / min(w, h)
            new_w, new_h = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
            img = img.resize((new_w, new_h), Image.BICUBIC)
            left, top = (new_w - self.image_size) // 2, (new_h - self.image_size) // 2
            img = img.crop((left, top, left + self.image_size, top + self.image_size))
        array = np.asarray(img, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        target = self.dataset[self.indices[index]][1]
        label = int(target) if isinstance(target, (int, np.integer)) or (torch.is_tensor(target) and target.numel() == 1) else -1
        caption = f"a photo of a {self.class_names[label]}" if 0 <= label < self.num_classes else ""
        return {"image": self._image(index), "label": torch.tensor(label, dtype=torch.int64), "caption": caption}


# ----------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------


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
        import soundfile as sf

        _check_on_error(on_error)
        if crop not in ("start", "center"):
            raise ValueError(f"crop={crop!r} must be 'start' or 'center'")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate={sample_rate} must be positive")
        if duration is not None and duration <= 0:
            raise ValueError(f"duration={duration} must be positive or None")
        if channels < 1:
            raise ValueError(f"channels={channels} must be >= 1")
        self.root = _resolve_split_root(root, split)
        self.sample_rate, self.duration, self.channels, self.crop, self.on_error = sample_rate, duration, channels, crop, on_error
        self.num_samples_per_clip = None if duration is None else int(round(duration * sample_rate))
        if transcripts is None:
            transcripts = next((self.root / n for n in self.TRANSCRIPT_NAMES if (self.root / n).is_file()), None)
        self.transcripts_path = None if transcripts is None else Path(transcripts)
        texts: dict[str, dict] = {}
        if self.transcripts_path is not None:
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
        else:
            files, labels, self.class_names = _scan(self.root, tuple(e.lower() for e in extensions))
            if class_names is not None:
                self.class_names = list(class_names)
            captions = [_readable_name(self.class_names[k]) for k in labels]
        if not files:
            raise FileNotFoundError(f"no audio files ({', '.join(extensions)}) under {self.root}")
        files, labels, captions = map(list, zip(*_evenly_spaced(list(zip(files, labels, captions)), num_samples)))
        self.num_classes = len(self.class_names)
        self.skipped: list[tuple[str, str]] = []
        self.files, self.labels, self.captions = [], [], []
        clips = []
        for path, label, caption in zip(_progress(files, "reading audio"), labels, captions):
            try:
                if not Path(path).is_file():
                    raise UnreadableFileError(f"{path}: listed in {self.transcripts_path} but missing")
                if preload:
                    clips.append(self._load(path))
                else:
                    sf.info(os.fspath(path))
            except (UnreadableFileError, RuntimeError, OSError, ValueError) as err:
                message = str(err) if isinstance(err, UnreadableFileError) else f"{path}: unreadable audio ({err})"
                if on_error == "raise":
                    raise UnreadableFileError(message) from None
                self.skipped.append((str(path), message))
                logger.debug("skipping %s", message)
                continue
            self.files.append(str(path))
            self.labels.append(int(label))
            self.captions.append(caption)
        if self.skipped:
            logger.warning("skipped %d unreadable audio file(s) under %s (first: %s)",
                           len(self.skipped), self.root, self.skipped[0][0])
        if not self.files:
            raise FileNotFoundError(f"no readable audio files under {self.root} ({len(self.skipped)} skipped)")
        self._clips = clips if preload else None

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
