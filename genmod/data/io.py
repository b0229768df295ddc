"""Small writers for results people look at: PNG grids, WAV files and GIF clips.

Images and videos are float tensors in ``[-1, 1]`` (the package's data range, DESIGN.md §2) unless
``value_range`` says otherwise.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from genmod.core.files import atomic_path


def _to_unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    low, high = value_range
    if high <= low:
        raise ValueError(f"value_range={value_range} must be (low, high) with low < high")
    return ((x.detach().float().cpu() - low) / (high - low)).clamp(0, 1)


def make_image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Tile ``(N, C, H, W)`` images into one ``(3, H', W')`` uint8 grid (``nrow`` images per row,
    default about square)."""
    import torchvision

    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = torchvision.utils.make_grid(_to_unit(images, value_range), nrow=nrow, padding=padding, pad_value=1.0)
    return (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2,
                    value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 1) -> str:
    """Write ``(N, C, H, W)`` images as one PNG grid; ``scale`` enlarges it (nearest) for viewing.
    Returns the path."""
    from PIL import Image

    grid = make_image_grid(images, nrow, padding, value_range)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = os.fspath(path)
    with atomic_path(path) as tmp:  # a half-written file never replaces the old one
        img.save(tmp)
    return path


def save_wav(path: str | os.PathLike, audio: torch.Tensor | np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> str:
    """Write ``(channels, samples)`` or ``(samples,)`` audio in [-1, 1] as a WAV (16-bit PCM by
    default). Values outside [-1, 1] are clipped. Returns the path."""
    import soundfile as sf

    data = audio.detach().float().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio, np.float32)
    if data.ndim == 2:
        data = data.T  # soundfile wants (samples, channels)
    elif data.ndim != 1:
        raise ValueError(f"audio must be (channels, samples) or (samples,), got shape {data.shape}")
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate={sample_rate} must be positive")
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        sf.write(tmp, np.clip(data, -1.0, 1.0), int(sample_rate), subtype=subtype)
    return path


def save_gif(path: str | os.PathLike, video: torch.Tensor, fps: float = 8.0, nrow: int | None = None,
             value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 2, loop: int = 0) -> str:
    """Write a ``(T, C, H, W)`` clip, or ``(N, T, C, H, W)`` clips tiled into a grid per frame, as an
    animated GIF (``scale`` enlarges it, nearest). Returns the path."""
    from PIL import Image

    if video.ndim == 4:
        video = video.unsqueeze(0)
    if video.ndim != 5:
        raise ValueError(f"video must be (T, C, H, W) or (N, T, C, H, W), got shape {tuple(video.shape)}")
    if fps <= 0:
        raise ValueError(f"fps={fps} must be positive")
    frames = []
    for t in range(video.shape[1]):
        grid = make_image_grid(video[:, t], nrow=nrow, value_range=value_range)
        img = Image.fromarray(grid.permute(1, 2, 0).numpy())
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        frames.append(img)
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=loop)
    return path
