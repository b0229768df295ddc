"""Datasets returning the package's dicts (DESIGN.md §2) and the ``get_dataset`` registry.

Built-in, offline and deterministic: ``shapes``, ``moving_shapes``, ``oscillators``, ``tones``.
Real data: ``fashion_mnist`` (Debian ``dataset-fashion-mnist`` files), ``speech_digits`` (espeak-ng
corpus made by ``genmod make-speech-digits``). User data: ``image_folder:/path``,
``audio_folder:/path``, ``torchvision:NAME``, ``webdataset:/shards/train-{000000..000099}.tar`` (tar
shards streamed across ranks and workers, ``streaming.py``; written by ``genmod make-shards``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from .audio_folder import AudioFolderDataset
from .fashion_mnist import FashionMNIST, read_idx, write_idx
from .folders import UnreadableFileError
from .image_folder import ImageFolderDataset
from .io import make_image_grid, save_gif, save_image_grid, save_wav
from .moving_shapes import MovingShapesDataset
from .oscillators import DampedOscillatorDataset
from .shapes import ShapesDataset
from .speech_digits import SpeechDigitsDataset
from .streaming import WebDatasetStream
from .tones import ToneDataset
from .torchvision_datasets import TorchvisionDataset

DATASETS: dict[str, Callable[..., Dataset]] = {
    "shapes": ShapesDataset,
    "moving_shapes": MovingShapesDataset,
    "oscillators": DampedOscillatorDataset,
    "tones": ToneDataset,
    "fashion_mnist": FashionMNIST,
    "speech_digits": SpeechDigitsDataset,
}
# "prefix:argument" names: the argument (a path or a torchvision class) is the first positional.
PREFIXED: dict[str, Callable[..., Dataset]] = {
    "image_folder": ImageFolderDataset,
    "audio_folder": AudioFolderDataset,
    "torchvision": TorchvisionDataset,
    "webdataset": WebDatasetStream,
}


def register_dataset(name: str, factory: Callable[..., Dataset]) -> None:
    """Make ``get_dataset(name, split=..., **kw)`` call ``factory(split=split, **kw)``."""
    if ":" in name:
        raise ValueError(f"dataset name {name!r} must not contain ':'")
    DATASETS[name] = factory


def known_datasets() -> list[str]:
    return sorted(DATASETS) + [f"{p}:..." for p in sorted(PREFIXED)]


def get_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    """Build a dataset by name: ``"shapes"``, ``"fashion_mnist"``, ``"image_folder:/data/pets"``,
    ``"audio_folder:/data/speech"``, ``"torchvision:CIFAR10"``, ...; ``kwargs`` go to its class."""
    check_dataset_name(name)
    prefix, sep, argument = name.partition(":")
    if sep:
        return PREFIXED[prefix](argument, split=split, **kwargs)
    return DATASETS[name](split=split, **kwargs)


def check_dataset_name(name) -> None:
    """A one-line ``ValueError`` unless ``name`` is a known dataset (a prefixed one with its argument)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    prefix, sep, argument = name.partition(":")
    if sep:
        if prefix not in PREFIXED:
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known_datasets())}")
        if not argument:
            raise ValueError(f"dataset {name!r} needs an argument after ':' (a path or a torchvision name)")
    elif name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known_datasets())}")


def collate(items: list[dict]) -> dict:
    """Batch a list of dataset dicts: tensors are stacked (a shape mismatch names the key), ints
    become an int64 tensor (``sample_rate`` stays one int when all agree), strings become lists."""
    if not items:
        raise ValueError("collate got an empty batch")
    keys = items[0].keys()
    batch = {}
    for key in keys:
        values = [item[key] for item in items]
        first = values[0]
        if torch.is_tensor(first):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"collate: key {key!r} has different shapes in one batch: {sorted(shapes)}")
            batch[key] = torch.stack(values)
        elif isinstance(first, str):
            batch[key] = list(values)
        elif key == "sample_rate":
            if len(set(values)) > 1:
                raise ValueError(f"collate: clips with different sample rates in one batch: {sorted(set(values))}")
            batch[key] = first
        elif isinstance(first, (bool, int)):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = list(values)
    return batch


__all__ = [
    "AudioFolderDataset", "DampedOscillatorDataset", "FashionMNIST", "ImageFolderDataset", "MovingShapesDataset",
    "ShapesDataset", "SpeechDigitsDataset", "ToneDataset", "TorchvisionDataset", "UnreadableFileError", "WebDatasetStream",
    "check_dataset_name", "collate", "get_dataset", "known_datasets", "make_image_grid", "read_idx", "register_dataset", "save_gif",
    "save_image_grid", "save_wav", "write_idx",
]
