"""Write any dataset of the package's dicts as webdataset tar shards (``genmod make-shards``).

Layout of a shard folder::

    train-000000.tar ... train-%06d.tar   # shard_size items each (the last may hold fewer)
    dataset.json                          # num_classes, class_names, image_size, channels, sample_rate,
                                          # and every shard's file name and item count

Inside a tar, item ``k`` (numbered over all shards) is a group of files ``%08d.<field>``
(the webdataset convention, https://github.com/webdataset/webdataset): ``image.png`` (a lossless
uint8 PNG of the ``[-1, 1]`` image) or the untouched source file (``image.jpg`` ..., when no
resolution was given: the reader then resizes and crops it), ``cls`` (the label), ``txt`` (the
caption), ``json`` (``sample_rate``), and ``<key>.npy`` for every other tensor (``latents``,
``indices``, ``audio``: float32 / int64 saved exactly, without pickle). The item counts in
``dataset.json`` let :class:`~genmod.data.webdataset.WebDatasetStream` split an epoch evenly over
ranks and workers without opening the shards.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch

from genmod.core.files import atomic_dir

from .folders import progress, readable_name

INFO_FILE = "dataset.json"
SHARD_PATTERN = "train-%06d.tar"


def _npy_bytes(value: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value.detach().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def _png_bytes(image: torch.Tensor) -> bytes:
    """A ``(C, H, W)`` float image in ``[-1, 1]`` as PNG bytes (uint8, exact for images read from uint8)."""
    from PIL import Image

    array = ((image.detach().cpu().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_item(item: dict, key: str, source_file: str | None = None) -> dict:
    """One dataset dict as the files of a webdataset sample (``{"__key__": key, "cls": b"3", ...}``);
    ``source_file`` stores that file's bytes as the image instead of a PNG of ``item["image"]``."""
    sample = {"__key__": key}
    for field, value in item.items():
        if field == "image" and source_file is not None:
            with open(source_file, "rb") as f:
                sample["image" + os.path.splitext(source_file)[1].lower()] = f.read()
        elif field == "image":
            sample["image.png"] = _png_bytes(value)
        elif field == "label":
            sample["cls"] = str(int(value)).encode()
        elif field == "caption":
            sample["txt"] = str(value).encode()
        elif field == "sample_rate":
            sample["json"] = json.dumps({"sample_rate": int(value)}).encode()
        elif torch.is_tensor(value):
            sample[f"{field}.npy"] = _npy_bytes(value)
        else:
            raise ValueError(f"write_shards: item field {field!r} of type {type(value).__name__} has no shard encoding")
    return sample


def dataset_info(dataset, first: dict) -> dict:
    """What the reader needs besides the items: classes, and the image size / channels or sample rate."""
    info = {"format": "genmod-webdataset", "version": 1, "num_classes": int(getattr(dataset, "num_classes", 0)),
            "class_names": list(getattr(dataset, "class_names", []))}
    if torch.is_tensor(first.get("image")):
        info.update(channels=int(first["image"].shape[0]), image_size=int(first["image"].shape[-1]))
    if "sample_rate" in first:
        info["sample_rate"] = int(first["sample_rate"])
    return info


def write_shards(dataset, out_dir: str, shard_size: int, source_files: list[str] | None = None,
                 extra_info: dict | None = None) -> str:
    """Write ``dataset`` (any sequence of dicts) as ``out_dir/train-%06d.tar`` shards of ``shard_size``
    items plus ``dataset.json``; returns the JSON's path. ``source_files[k]`` (optional) is stored as
    item ``k``'s image instead of a PNG of its pixels."""
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"--shard-size: must be >= 1, got {shard_size}")
    if len(dataset) == 0:
        raise ValueError("write_shards: the dataset is empty")
    os.makedirs(out_dir, exist_ok=True)
    info = dataset_info(dataset, dataset[0])
    counts: list[int] = []
    with wds.ShardWriter(os.path.join(out_dir, SHARD_PATTERN), maxcount=shard_size, verbose=0, encoder=False) as sink:
        for index in progress(range(len(dataset)), "writing shards"):
            source = source_files[index] if source_files is not None else None
            sink.write(encode_item(dataset[index], f"{index:08d}", source))
            if index % shard_size == 0:
                counts.append(0)
            counts[-1] += 1
    info["shards"] = [{"file": SHARD_PATTERN % k, "count": c} for k, c in enumerate(counts)]
    info["num_samples"] = sum(counts)
    info.update(extra_info or {})
    path = os.path.join(out_dir, INFO_FILE)
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    return path


def _folder_dataset(src: str, resolution: int | None, args):
    """The image or audio folder under ``src`` (images when it holds any image file)."""
    from pathlib import Path

    from .audio_folder import AudioFolderDataset
    from .image_folder import IMAGE_EXTENSIONS, ImageFolderDataset

    if not Path(src).is_dir():
        raise FileNotFoundError(f"SRC_FOLDER {src} is not a folder")
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(src).rglob("*")):
        return ImageFolderDataset(src, split=args.split, image_size=resolution, channels=args.channels,
                                  preload=False, on_error=args.on_error)
    return AudioFolderDataset(src, split=args.split, sample_rate=args.sample_rate, duration=args.duration,
                              preload=False, on_error=args.on_error)


class SourceImages:
    """An image folder's items without decoding: ``image`` is None (the file's bytes are stored)."""

    def __init__(self, folder):
        self.folder, self.files = folder, list(folder.files)
        self.num_classes, self.class_names = folder.num_classes, folder.class_names

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        label = self.folder.labels[index]
        return {"image": None, "label": torch.tensor(label), "caption": f"a photo of a {readable_name(self.class_names[label])}"}


def _check_arguments(args) -> None:
    """One-line errors before any file is read: ranges, and an ``OUT`` that is new (or empty) and not inside ``SRC``."""
    from genmod.core.arguments import check_count, check_finite
    from genmod.core.files import check_output_path

    from .image_folder import MAX_IMAGE_SIZE

    check_count("--shard-size", args.shard_size)
    check_count("--resolution", args.resolution, 1, MAX_IMAGE_SIZE)
    check_count("--sample-rate", args.sample_rate, 1, 384000)
    check_finite("--duration", args.duration)
    check_output_path(args.out, folder=True)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"OUT: {args.out} already exists and is not empty; choose a new folder")
    src, out = os.path.realpath(args.src), os.path.realpath(args.out)
    if out == src or out.startswith(src + os.sep):
        raise ValueError(f"OUT: {args.out} lies inside SRC_FOLDER {args.src}; write the shards elsewhere")


def main(argv: list[str]) -> int:
    """``genmod make-shards SRC_FOLDER OUT --shard-size N [--resolution R]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="genmod make-shards",
                                     description="write an image or audio folder as webdataset tar shards")
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=None,
                        help="store PNGs resized and center-cropped to R (default: the original image files)")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    parser.add_argument("--split", default="train")
    parser.add_argument("--sample-rate", "--sample_rate", dest="sample_rate", type=int, default=16000)
    parser.add_argument("--duration", type=float, default=1.0, help="audio clip seconds (<= 0: keep each length)")
    parser.add_argument("--on-error", "--on_error", dest="on_error", default="raise", choices=["raise", "skip"])
    args = parser.parse_args(argv)
    _check_arguments(args)
    args.duration = args.duration if args.duration > 0 else None
    dataset = _folder_dataset(args.src, args.resolution, args)
    extra = {}
    if hasattr(dataset, "image_size") and args.resolution is None:  # the original files, resized when read
        dataset, extra = SourceImages(dataset), {"channels": args.channels, "image_size": None}
    if os.path.isdir(args.out):
        os.rmdir(args.out)  # empty (checked): the shards appear in it all at once
    with atomic_dir(args.out) as staging:  # a cut run leaves no half set of shards
        write_shards(dataset, staging, args.shard_size, getattr(dataset, "files", None) if extra else None, extra)
    path = os.path.join(args.out, INFO_FILE)
    with open(path) as f:
        info = json.load(f)
    print(f"wrote {info['num_samples']} items in {len(info['shards'])} shards, {path}")
    return 0
