"""A ``torchvision.datasets`` class by name as a dataset (``TorchvisionDataset``,
``"torchvision:CIFAR10"``), returning the package's dicts (DESIGN.md §2).
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .folders import evenly_spaced
from .image_folder import resize_and_crop


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
        self.indices = evenly_spaced(list(range(len(self.dataset))), num_samples)
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
            img = resize_and_crop(img, self.image_size)
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
