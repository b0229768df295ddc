"""A folder of images as a dataset (``ImageFolderDataset``, ``"image_folder:/path"``): class
subfolders give labels and captions, images are resized (shorter side) and center-cropped, or
(``random_crop`` / ``random_flip``) cropped and flipped by a generator seeded per item and epoch
(``crops.py``), so a resumed run sees the crops of the uninterrupted one.

Reading, ``root/split`` folders and ``on_error`` are shared with the audio folders (``folders.py``).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from .crops import augment_rng, crop_and_flip, resize_shorter, to_tensor
from .folders import (UnreadableFileError, check_on_error, evenly_spaced, progress, readable_name,
                      resolve_split_root, scan_class_folders, skip_or_raise, warn_skipped)

MAX_IMAGE_SIZE = 8192  # --resolution cap: an 8192^2 RGB image is 200 MB; larger sides are a typo, not a dataset
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def resize_and_crop(img, image_size: int):
    """A PIL image with its shorter side resized to ``image_size`` (bicubic, antialiased), then
    center-cropped to ``image_size`` x ``image_size``."""
    from PIL import Image

    img = resize_shorter(img, image_size)
    new_w, new_h = img.size
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def load_image(path, image_size: int | None, channels: int, crop: bool = True) -> torch.Tensor:
    """Decode an image (a path or a binary file object) to uint8 ``(C, S, S)``: shorter side resized to
    ``image_size`` (bicubic, antialiased) then center-cropped (``crop=False``: not cropped);
    ``image_size=None`` keeps the original size."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if image_size is not None:
                img = resize_and_crop(img, image_size) if crop else resize_shorter(img, image_size)
            return to_tensor(img, channels)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        where = path if isinstance(path, (str, os.PathLike)) else "image bytes"
        raise UnreadableFileError(f"{where}: unreadable image ({type(err).__name__}: {err})") from None


def verify_image(path: str | os.PathLike) -> None:
    """Check that ``path`` opens as an image and its data decodes (PIL ``verify``), without keeping it."""
    from PIL import Image

    with Image.open(path) as img:
        img.verify()


def _check_arguments(on_error: str, channels: int, image_size: int | None, random_crop: bool = False) -> None:
    check_on_error(on_error)
    if random_crop and image_size is None:
        raise ValueError("random_crop=True needs image_size (--resolution)")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 or 3")
    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} must be in [1, {MAX_IMAGE_SIZE}]")


def _unreadable_message(path, err: Exception) -> str:
    if isinstance(err, UnreadableFileError):
        return str(err)
    return f"{path}: unreadable image ({type(err).__name__}: {err})"


class ImageFolderDataset(Dataset):
    """Images in class subfolders (``root/cat/001.png`` -> label of "cat", caption "a photo of a cat").

    With ``root/train`` and ``root/test`` present, ``split`` picks one. Images are resized (shorter
    side) and center-cropped to ``image_size`` (``random_crop`` / ``random_flip``: cropped and flipped
    per item by ``augment_rng(seed, epoch, index)``; ``set_epoch`` picks the epoch); ``preload=True`` decodes everything once (errors are
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
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ):
        _check_arguments(on_error, channels, image_size, random_crop)
        self.random_crop, self.random_flip, self.seed, self.epoch = random_crop, random_flip, seed, 0
        self.root = resolve_split_root(root, split)
        files, labels = self._list_files(extensions, num_samples)
        self.num_classes, self.channels, self.on_error = len(self.class_names), channels, on_error
        self.image_size = image_size
        images = self._read_files(files, labels, preload)
        self._images = self._same_size(images) if preload else None
        if self.image_size is None:
            self.image_size = self._native_size()

    def _list_files(self, extensions: tuple[str, ...], num_samples: int | None) -> tuple[list, list[int]]:
        """Image files and labels under ``self.root`` (sets ``class_names``), ``num_samples`` of them."""
        files, labels, self.class_names = scan_class_folders(self.root, tuple(e.lower() for e in extensions))
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(extensions)}) under {self.root}")
        files, labels = map(list, zip(*evenly_spaced(list(zip(files, labels)), num_samples)))
        return files, labels

    def _read_files(self, files: list, labels: list[int], preload: bool) -> list[torch.Tensor]:
        """Decode (``preload``) or verify every file; readable ones fill ``files`` / ``labels``, the
        others ``skipped`` (or raise). Returns the decoded images (empty without ``preload``)."""
        self.skipped: list[tuple[str, str]] = []
        self.files: list[str] = []
        self.labels: list[int] = []
        images = []
        for path, label in zip(progress(files, "reading images"), labels):
            try:
                if preload:
                    images.append(load_image(path, self.image_size, self.channels, crop=not self.random_crop))
                else:
                    verify_image(path)
            except Exception as err:  # noqa: BLE001 - every decoder failure means "unreadable file"
                skip_or_raise(self.skipped, path, _unreadable_message(path, err), self.on_error)
                continue
            self.files.append(str(path))
            self.labels.append(label)
        warn_skipped(self.skipped, self.root, "image")
        if not self.files:
            raise FileNotFoundError(f"no readable image files under {self.root} ({len(self.skipped)} skipped)")
        return images

    def _same_size(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """``images`` unchanged; without ``image_size`` they must already share one size."""
        if self.image_size is None and len({tuple(x.shape) for x in images}) > 1:
            raise ValueError(f"images under {self.root} differ in size; pass image_size=N to resize them")
        return images

    def _native_size(self) -> int:
        """The side of the first image as stored (used when ``image_size=None``)."""
        first = self._images[0] if self._images is not None else load_image(self.files[0], None, self.channels)
        return int(first.shape[-1])

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose random crops / flips ``__getitem__`` draws (the trainer sets it)."""
        self.epoch = int(epoch)

    def _augment(self, img: torch.Tensor, index: int) -> torch.Tensor:
        if not (self.random_crop or self.random_flip):
            return img
        rng = augment_rng(self.seed, self.epoch, f"{index:08d}")  # the key make-shards gives item index
        size = self.image_size if self.random_crop else min(img.shape[-2:])
        return crop_and_flip(img, size, rng, self.random_crop, self.random_flip)

    def __getitem__(self, index: int) -> dict:
        img = self._images[index] if self._images is not None else load_image(
            self.files[index], self.image_size, self.channels, crop=not self.random_crop)
        img = self._augment(img, index)
        label = self.labels[index]
        return {
            "image": img.float() / 127.5 - 1.0,
            "label": torch.tensor(label, dtype=torch.int64),
            "caption": f"a photo of a {readable_name(self.class_names[label])}",
        }
