"""Resizing, crops and flips of images at a training resolution, with seeded randomness.

Full-size photos are resized so the shorter side is ``image_size`` (bicubic, antialiased), then
cropped to ``image_size`` x ``image_size``: in the center, or (``random_crop``) at an offset drawn
from a per-item generator, and (``random_flip``) mirrored left-right with probability 1/2. The
generator is seeded by ``(seed, epoch, item key)`` (:func:`augment_rng`), never by a global RNG, so the
crops of a resumed run are those of the uninterrupted one, in any DataLoader worker. (Random crop
and flip are the standard augmentations of ADM / DiT training, Dhariwal & Nichol 2021 §B.)
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def augment_rng(seed: int, epoch: int, key) -> np.random.Generator:
    """A generator for one item's crop and flip, from ``(seed, epoch, key)`` (key: an index or a name)."""
    digest = hashlib.sha256(f"{int(seed)}/{int(epoch)}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def resize_shorter(img, image_size: int):
    """A PIL image with its shorter side resized to ``image_size`` (bicubic, antialiased)."""
    from PIL import Image

    w, h = img.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)


def crop_offsets(width: int, height: int, image_size: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """``(left, top)`` of an ``image_size`` square: centered, or uniform over all offsets with ``rng``."""
    if rng is None:
        return (width - image_size) // 2, (height - image_size) // 2
    return int(rng.integers(0, width - image_size + 1)), int(rng.integers(0, height - image_size + 1))


def to_tensor(img, channels: int) -> torch.Tensor:
    """A PIL image as uint8 ``(C, H, W)`` with ``channels`` (1 or 3) channels."""
    array = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def crop_and_flip(image: torch.Tensor, image_size: int, rng: np.random.Generator | None = None,
                  random_crop: bool = False, random_flip: bool = False) -> torch.Tensor:
    """An ``image_size`` square of a ``(C, H, W)`` image whose shorter side is ``image_size``.

    The crop is centered unless ``random_crop``; ``random_flip`` mirrors it with probability 1/2.
    Both draws come from ``rng`` (crop offsets first, then the flip), which they need."""
    if (random_crop or random_flip) and rng is None:
        raise ValueError("crop_and_flip: random_crop / random_flip need an rng (augment_rng(seed, epoch, key))")
    height, width = image.shape[-2:]
    if min(height, width) != image_size:
        raise ValueError(f"crop_and_flip: shorter side {min(height, width)} is not image_size={image_size}")
    left, top = crop_offsets(width, height, image_size, rng if random_crop else None)
    out = image[..., top:top + image_size, left:left + image_size]
    if random_flip and rng.random() < 0.5:
        out = out.flip(-1)
    return out.contiguous()
