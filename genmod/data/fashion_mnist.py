"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from its original gzipped IDX files (``"fashion_mnist"``).

Offline the files come from Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``, done by ``install.sh``); online, ``download=True`` fetches them through
torchvision. Nothing is downloaded unless asked.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (LeCun's MNIST file format: magic = 0, 0, type, ndim; then ndim big-endian int32 sizes).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped if the name ends in ``.gz``) into a numpy array."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read IDX file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX payload has {len(data) - header} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def torchvision_cache_root() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "torchvision")


def candidate_dirs(root: str | os.PathLike | None = None) -> list[str]:
    """Folders searched, in order: ``root``, ``$GENMOD_DATA_DIR``, the Debian location, torchvision's
    layout under ``~/.cache``. Each base is tried as-is and with ``fashion-mnist/`` and
    ``FashionMNIST/raw/`` appended."""
    bases = []
    if root is not None:
        bases.append(os.fspath(root))
    if os.environ.get("GENMOD_DATA_DIR"):
        bases.append(os.environ["GENMOD_DATA_DIR"])
    bases.append(DEBIAN_DIR)
    bases.append(torchvision_cache_root())
    dirs = []
    for base in bases:
        for sub in ("", "fashion-mnist", os.path.join("FashionMNIST", "raw")):
            d = os.path.join(base, sub) if sub else base
            if d not in dirs:
                dirs.append(d)
    return dirs


def find_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[str, str] | None:
    """Paths of the (images, labels) IDX files of ``split``, or None when no searched folder has both."""
    images_name, labels_name = FILES[split]
    for d in candidate_dirs(root):
        found = []
        for name in (images_name, labels_name):
            for fname in (name + ".gz", name):
                if os.path.isfile(os.path.join(d, fname)):
                    found.append(os.path.join(d, fname))
                    break
        if len(found) == 2:
            return found[0], found[1]
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST: 60k train / 10k test grey 28x28 images of 10 clothing classes.

    Returns ``{"image": (C, S, S) in [-1, 1], "label": int64, "caption": "a photo of a sneaker"}``
    with ``S = pad_to`` (default 32: a 2-pixel black border, the models' default size) or 28 with
    ``pad_to=None``; ``rgb=True`` replicates the grey channel to 3 channels.
    """

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        pad_to: int | None = 32,
        rgb: bool = False,
        download: bool = False,
        num_samples: int | None = None,
    ):
        if split not in FILES:
            raise ValueError(f"split={split!r} is not one of {sorted(FILES)}")
        if pad_to is not None and pad_to < 28:
            raise ValueError(f"pad_to={pad_to} must be >= 28 (or None for 28x28)")
        paths = find_fashion_mnist(split, root)
        if paths is None and download:
            paths = self._download(split, root)
        if paths is None:
            searched = ", ".join(candidate_dirs(root))
            raise FileNotFoundError(
                f"Fashion-MNIST {split} files not found (searched: {searched}); install them with "
                f"`apt-get install {APT_PACKAGE}`, pass root=DIR, set GENMOD_DATA_DIR, or pass download=True (needs internet)"
            )
        self.image_path, self.label_path = paths
        images, labels = read_idx(self.image_path), read_idx(self.label_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{self.image_path}: expected images of shape (N, 28, 28), got {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{self.label_path}: {labels.shape[0]} labels for {images.shape[0]} images")
        if num_samples is not None:
            images, labels = images[:num_samples], labels[:num_samples]
        self.split = split
        self.images = torch.from_numpy(images.copy())  # uint8 (N, 28, 28)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.pad = 0 if pad_to is None else pad_to - 28
        self.image_size = 28 + self.pad
        self.channels = 3 if rgb else 1
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.num_classes = len(FASHION_MNIST_CLASSES)

    @staticmethod
    def _download(split: str, root) -> tuple[str, str] | None:
        import torchvision

        target = os.fspath(root) if root is not None else torchvision_cache_root()
        try:
            torchvision.datasets.FashionMNIST(target, train=(split == "train"), download=True)
        except Exception as err:  # network errors come in many types
            raise RuntimeError(f"download of Fashion-MNIST into {target} failed: {err}") from None
        return find_fashion_mnist(split, target)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        img = self.images[index].float() / 127.5 - 1.0
        if self.pad:
            before = self.pad // 2
            img = torch.nn.functional.pad(img, (before, self.pad - before, before, self.pad - before), value=-1.0)
        img = img.unsqueeze(0).expand(self.channels, -1, -1).contiguous()
        label = int(self.labels[index])
        return {"image": img, "label": torch.tensor(label, dtype=torch.int64),
                "caption": caption_for(FASHION_MNIST_CLASSES[label])}


def caption_for(name: str) -> str:
    """``"a photo of a sneaker"`` / ``"a photo of an ankle boot"``."""
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"a photo of {article} {name}"


def write_idx(path: str | os.PathLike, array: np.ndarray) -> str:
    """Write ``array`` as an IDX file (gzipped if the name ends in ``.gz``); the inverse of ``read_idx``."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    header = bytes([0, 0, codes[dtype], array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = array.astype(np.dtype(_IDX_DTYPES[codes[dtype]])).tobytes()
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + payload)
    return path
