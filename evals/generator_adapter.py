"""Turn any genmod sampler into torch-fidelity input, and samples into files and back.

A *sampler* is ``fn(num, labels, generator) -> images`` with images ``(num, C, H, W)`` in ``[-1, 1]``
(``labels`` is an int64 tensor of class ids, or None for unconditional models). From one:

* :func:`generate_samples` draws ``N`` seeded, class-balanced samples in batches with a progress bar
  and returns them as uint8 (the input convention of torch-fidelity's extractors);
* :class:`SampleDataset` serves uint8 samples to ``calculate_metrics`` (grey expanded to RGB on demand);
* :class:`SamplerModel` is a ``GenerativeModelBase`` for ``calculate_metrics(input1=model, ...)``;
* :func:`pipeline_sampler` adapts a genmod / diffusers pipeline to the sampler signature;
* :func:`save_png_folder` / :func:`load_png_folder` and :func:`save_npz` / :func:`load_npz`
  (ADM evaluation-suite format: ``arr_0`` uint8 NHWC, ``arr_1`` labels) write and read samples.

torch-fidelity 0.4.0 and numpy 2: its conditional-generator branch calls
``rng.randint(..., dtype=np.int)`` (``np.int`` was removed in numpy 1.24), so a ``GenerativeModelBase``
with ``num_classes > 0`` crashes. :class:`SamplerModel` reports ``num_classes = 0`` and draws its
labels itself; :func:`numpy2_compat` patches ``np.int`` for other people's conditional models.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch_fidelity import GenerativeModelBase
from tqdm.auto import tqdm

Sampler = Callable[[int, Optional[torch.Tensor], torch.Generator], torch.Tensor]


@contextlib.contextmanager
def numpy2_compat():
    """Restore ``np.int`` (an alias of ``int``) inside the block if numpy removed it."""
    missing = "int" not in np.__dict__
    if missing:
        np.int = int
    try:
        yield
    finally:
        if missing:
            del np.int


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float images -> uint8 in ``[0, 255]`` (round to nearest, as when saving a PNG)."""
    if not torch.is_floating_point(images):
        raise ValueError(f"images: expected float images in [-1, 1], got dtype {images.dtype}")
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float ``[-1, 1]``."""
    return images.float() / 127.5 - 1


def balanced_labels(num: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` class ids, each class ``num // num_classes`` or one more times, in seeded random order."""
    labels = torch.arange(num) % num_classes
    return labels[torch.randperm(num, generator=generator)]


def generate_samples(sampler: Sampler, num: int, *, num_classes: int = 0, labels: torch.Tensor | None = None,
                     seed: int = 0, batch_size: int = 64, desc: str = "sampling") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw ``num`` samples as uint8 ``(num, C, H, W)`` plus their labels (None if unconditional).

    Deterministic in ``seed``: labels are drawn first from one ``torch.Generator(seed)``, and every
    batch then gets its own generator seeded ``(seed, batch index)``, so results do not depend on
    what the sampler consumes from its generator.
    """
    if num <= 0:
        raise ValueError(f"num: expected a positive number of samples, got {num}")
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive batch size, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    if labels is None and num_classes > 0:
        labels = balanced_labels(num, num_classes, generator)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) != num:
            raise ValueError(f"labels: got {len(labels)} labels for {num} samples")
    chunks = []
    with tqdm(total=num, desc=desc, unit="img", leave=False) as bar:
        for index, start in enumerate(range(0, num, batch_size)):
            count = min(batch_size, num - start)
            batch_generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            batch_labels = None if labels is None else labels[start:start + count]
            images = sampler(count, batch_labels, batch_generator)
            if images.ndim != 4 or images.shape[0] != count:
                raise ValueError(f"sampler: expected ({count}, C, H, W) images, got shape {tuple(images.shape)}")
            chunks.append(to_uint8(images))
            bar.update(count)
    return torch.cat(chunks), labels


class SampleDataset(torch.utils.data.Dataset):
    """uint8 samples ``(N, C, H, W)`` as a torch-fidelity input (each item one uint8 tensor).

    ``rgb=True`` repeats grey images to 3 channels, as InceptionV3 expects.
    """

    def __init__(self, images: torch.Tensor, rgb: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images: expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.rgb = images, rgb

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if self.rgb and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image.contiguous()


class SamplerModel(GenerativeModelBase):
    """A sampler as a torch-fidelity ``GenerativeModelBase`` (pass ``input1_model_num_samples=N``).

    torch-fidelity feeds noise of shape ``(B, z_size)``; the sampler makes its own noise, so the
    noise only sets the batch size. Labels (class-balanced per batch) and noise come from an
    internal generator seeded with ``seed``. ``num_classes`` reported to torch-fidelity is 0 on
    purpose: its conditional branch crashes on numpy 2 (module docstring).
    """

    def __init__(self, sampler: Sampler, num_classes: int = 0, seed: int = 0, rgb: bool = True):
        super().__init__()
        self.sampler, self.label_classes, self.rgb = sampler, num_classes, rgb
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn_labels: list[torch.Tensor] = []

    @property
    def z_size(self):
        return 1

    @property
    def z_type(self):
        return "normal"

    @property
    def num_classes(self):
        return 0

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        count = noise.shape[0]
        labels = None
        if self.label_classes > 0:
            labels = balanced_labels(count, self.label_classes, self.generator)
            self.drawn_labels.append(labels)
        images = to_uint8(self.sampler(count, labels, self.generator))
        if self.rgb and images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return images.to(noise.device)


def pipeline_sampler(pipeline, num_inference_steps: int | None = 20, guidance_scale: float | None = 1.0,
                     **call_kwargs) -> Sampler:
    """Adapt a pipeline with ``__call__(class_labels=..., batch_size=..., generator=..., output_type='pt')``
    returning images in ``[0, 1]`` to the sampler signature (``[-1, 1]`` out). ``None`` for
    ``num_inference_steps`` / ``guidance_scale`` leaves the pipeline's own default (VAR: its scale count
    and saved guidance)."""
    settings = {k: v for k, v in (("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale))
                if v is not None}

    def sample(num: int, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        kwargs = dict(generator=generator, output_type="pt", **call_kwargs)
        if "num_inference_steps" in settings:
            kwargs["num_inference_steps"] = settings["num_inference_steps"]
        if labels is not None:
            kwargs["class_labels"] = labels.tolist()
            if "guidance_scale" in settings:
                kwargs["guidance_scale"] = settings["guidance_scale"]
        else:
            kwargs.update(batch_size=num)
        with torch.no_grad():
            out = pipeline(**kwargs)
        images = out.images if hasattr(out, "images") else out[0]
        return torch.as_tensor(images).float().cpu() * 2 - 1

    return sample


# ------------------------------------------------------------------------------------------------
# files


def save_png_folder(images: torch.Tensor, folder: str | os.PathLike, prefix: str = "") -> list[str]:
    """Write uint8 ``(N, C, H, W)`` images as ``folder/{prefix}{i:06d}.png``; returns the paths."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected uint8 (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        path = os.path.join(folder, f"{prefix}{index:06d}.png")
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
        paths.append(path)
    return paths


def _read_image(path: str, channels: int | None) -> np.ndarray:
    """One image as a uint8 array; an unreadable file is a one-line ``ValueError`` naming it."""
    try:
        with Image.open(path) as image:
            mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if image.mode in ("L", "I;16", "1") else "RGB")
            return np.asarray(image.convert(mode))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {detail})") from None


def load_png_folder(folder: str | os.PathLike, channels: int | None = None) -> torch.Tensor:
    """Read every ``.png/.jpg/.jpeg`` in ``folder`` (sorted by name) as uint8 ``(N, C, H, W)``.

    ``channels`` 1 or 3 converts (L / RGB); None keeps grey files grey and everything else RGB.
    """
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder}: not a folder of images")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    if not names:
        raise FileNotFoundError(f"{folder}: no .png/.jpg/.jpeg images found")
    arrays = []
    for name in names:
        array = _read_image(os.path.join(folder, name), channels)
        arrays.append(array[..., None] if array.ndim == 2 else array)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images have different sizes {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def save_npz(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """ADM evaluation-suite format: ``arr_0`` uint8 NHWC (and ``arr_1`` int64 labels)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images: expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["arr_1"] = torch.as_tensor(labels).long().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **arrays)


def load_npz(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an ADM-style ``.npz``: uint8 ``(N, C, H, W)`` images and labels (None if absent)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path}: field arr_0 (uint8 NHWC images) is missing")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz of images ({type(err).__name__}: {str(err)[:120]})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 NHWC with 1 or 3 channels, got {images.dtype} with shape {images.shape}")
    if labels is not None and (labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{path}: arr_1 must hold one integer label per image, got {labels.dtype} {labels.shape}")
    labels = torch.from_numpy(labels).long() if labels is not None else None
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels
