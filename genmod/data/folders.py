"""Reading user data folders, shared by ``image_folder.py`` and ``audio_folder.py`` (and the even
subsampling by ``torchvision_datasets.py``): class subfolders, ``root/split`` folders, and what
happens to unreadable files.

Unreadable or corrupt files are named with their path. ``on_error="raise"`` stops with a one-line
error; ``on_error="skip"`` leaves them out and logs how many were skipped (logger ``genmod.data``);
the skipped ``(path, reason)`` pairs are kept in ``dataset.skipped``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger("genmod.data")

ON_ERROR = ("skip", "raise")
PROGRESS_MIN_FILES = 500  # show a progress bar when preloading at least this many files


class UnreadableFileError(ValueError):
    """A data file could not be decoded; the message starts with its path."""


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")


def readable_name(folder: str) -> str:
    """A folder name as words (``"golden_retriever"`` -> ``"golden retriever"``)."""
    return folder.replace("_", " ").replace("-", " ").strip()


def scan_class_folders(root: Path, extensions: tuple[str, ...]) -> tuple[list[Path], list[int], list[str]]:
    """Files under ``root``: class subfolders give labels (sorted names); with no subfolder holding
    data files, the files directly in ``root`` form a single class named after ``root``."""
    def files_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_dirs = [d for d in class_dirs if files_in(d)]
    if not class_dirs:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        return files, [0] * len(files), [readable_name(root.name) or "data"]
    files, labels = [], []
    for k, d in enumerate(class_dirs):
        found = files_in(d)
        files += found
        labels += [k] * len(found)
    return files, labels, [d.name for d in class_dirs]


def resolve_split_root(root: str | os.PathLike, split: str | None) -> Path:
    """``root/split`` when it exists (e.g. ``train/``, ``test/``), else ``root`` itself."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} does not exist")
    if split and (path / split).is_dir():
        return path / split
    return path


def evenly_spaced(items: list, num: int | None, name: str = "num_samples") -> list:
    """``num`` items spread evenly over ``items`` (sorted by class, so every class keeps its share)."""
    if num is None or num >= len(items):
        return items
    if num <= 0:
        raise ValueError(f"{name}={num} must be positive")
    picks = np.linspace(0, len(items) - 1, num).round().astype(int)
    return [items[k] for k in picks]


def progress(items, desc: str):
    """A progress bar over ``items`` when there are at least ``PROGRESS_MIN_FILES`` of them."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=len(items) < PROGRESS_MIN_FILES)


def skip_or_raise(skipped: list[tuple[str, str]], path, message: str, on_error: str) -> None:
    """Handle one unreadable file: raise ``UnreadableFileError(message)`` or record it in ``skipped``."""
    if on_error == "raise":
        raise UnreadableFileError(message) from None
    skipped.append((str(path), message))
    logger.debug("skipping %s", message)


def warn_skipped(skipped: list[tuple[str, str]], root: Path, kind: str) -> None:
    """One warning naming how many ``kind`` files under ``root`` were skipped, and the first."""
    if skipped:
        logger.warning("skipped %d unreadable %s file(s) under %s (first: %s)", len(skipped), kind, root, skipped[0][0])
