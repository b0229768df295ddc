"""Streaming sharded tar datasets (the webdataset format) across ranks and DataLoader workers with
an exact mid-epoch resume (``WebDatasetStream``, ``"webdataset:/data/train-{000000..000099}.tar"``).

Tar reading, brace expansion and the shuffle buffer are the ``webdataset`` library's
(https://github.com/webdataset/webdataset, ``tarfile_samples``, ``expand_urls``, ``shuffle``); the split
across ranks and workers is written here because it must be a function of the seed and the epoch
only (webdataset's ``split_by_node`` / ``split_by_worker`` read the process group and give each
stream whole shards, so streams differ in length and a resume cannot be exact).

The order of epoch ``e`` (seed ``s``), for ``R`` ranks x ``W`` workers = ``S`` streams and batch ``B``:

1. the shards are permuted by ``(s, e)`` and read as one sequence of items (counts from ``dataset.json``);
2. stream ``r * W + w`` takes the ``w``-th of its rank's ``W`` contiguous, equal ranges of
   ``L = floor(N / S / B) * B`` items (fewer than ``S * B`` items of an epoch are left out; a range may
   start or end inside a shard, the items before it are read and skipped undecoded);
3. a shuffle buffer seeded by ``(s, e, stream)`` mixes each stream; crops/flips are seeded by
   ``(s, e, item key)``;
4. a DataLoader over ``W`` workers takes batches from the workers in turn, so rank ``r``'s batch ``k``
   is batch ``k // W`` of its worker ``k % W``.

So the batches are a function of (seed, epoch, step) for a fixed (ranks, workers, batch size), and
the trainer's checkpointed (epoch, batch) is an exact position: :meth:`set_epoch` ``(e, k)`` makes
worker ``i`` play stream ``(i + k) % W`` (the DataLoader restarts at worker 0) and skip the batches
that stream already gave.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .crops import augment_rng, crop_and_flip
from .folders import UnreadableFileError
from .image_folder import load_image
from .shard_writer import INFO_FILE


def _seed(*parts) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ImportError("webdataset datasets need the webdataset package: pip install 'genmod[webdataset]'") from None
    return webdataset


def read_shard_list(pattern: str) -> tuple[list[str], list[int], dict]:
    """The shard paths of ``pattern`` (braces expanded), their item counts and ``dataset.json``."""
    urls = _webdataset().shardlists.expand_urls(pattern)
    info_path = os.path.join(os.path.dirname(urls[0]), INFO_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"webdataset:{pattern}: no {INFO_FILE} beside the shards (write them with genmod make-shards)")
    with open(info_path) as f:
        info = json.load(f)
    counts = {shard["file"]: int(shard["count"]) for shard in info.get("shards", [])}
    for url in urls:
        if not os.path.isfile(url):
            raise FileNotFoundError(f"webdataset:{pattern}: shard {url} does not exist")
        if os.path.basename(url) not in counts:
            raise ValueError(f"{info_path}: shard {os.path.basename(url)!r} is not listed (its item count is unknown)")
    return urls, [counts[os.path.basename(url)] for url in urls], info


def decode_npy(value: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(value), allow_pickle=False).copy())


class WebDatasetStream(IterableDataset):
    """Items of webdataset tar shards as the package's dicts, in the seeded order of the module docstring.

    ``pattern``: shard paths with braces (``/data/train-{000000..000099}.tar``); ``dataset.json`` beside
    them gives the classes and item counts. Images come out as float ``(C, H, W)`` in ``[-1, 1]`` at
    ``image_size`` (resized, center- or ``random_crop``-ped, ``random_flip``-ped), ``cls`` as ``label``,
    ``txt`` as ``caption``, ``<key>.npy`` as tensors (``latents``, ``audio``), ``json`` as ``sample_rate``.
    Call :meth:`configure` with the batch layout and :meth:`set_epoch` before iterating.
    """

    def __init__(self, pattern: str, split: str | None = None, image_size: int | None = None,
                 channels: int | None = None, random_crop: bool = False, random_flip: bool = False,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 256, num_samples: int | None = None):
        if num_samples is not None:
            raise ValueError("webdataset: num_samples (--dataset_size) is not supported; choose shards with the pattern")
        self.pattern, self.split = pattern, split  # the shards are the split
        self.urls, self.counts, info = read_shard_list(pattern)
        self.class_names = list(info.get("class_names", []))
        self.num_classes = int(info.get("num_classes", len(self.class_names)))
        self.channels = channels or info.get("channels")
        self.image_size = image_size or info.get("image_size")
        if "image_size" in info and self.image_size is None:
            raise ValueError(f"webdataset:{pattern}: the shards hold the original images; pass --resolution (image_size)")
        if random_crop and self.image_size is None:
            raise ValueError(f"webdataset:{pattern}: random_crop needs image_size (--resolution)")
        self.sample_rate = info.get("sample_rate")
        self.random_crop, self.random_flip, self.seed = random_crop, random_flip, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.epoch, self.start_batch = 0, 0
        self.configure(batch_size=1)

    # ------------------------------------------------------------------------------------------
    # layout and position

    def configure(self, batch_size: int, world_size: int = 1, rank: int = 0, num_workers: int = 0,
                  seed: int | None = None) -> "WebDatasetStream":
        """Fix the layout: ``batch_size`` per rank, ``world_size`` ranks, this ``rank``, ``num_workers``
        DataLoader workers (0: the main process). Returns the dataset (it is also the trainer's sampler)."""
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.num_workers, self.workers = num_workers, max(1, num_workers)
        self.seed = self.seed if seed is None else seed
        streams = world_size * self.workers
        self.items_per_stream = sum(self.counts) // streams // batch_size * batch_size
        if self.items_per_stream == 0:
            raise ValueError(f"--batch_size: webdataset:{self.pattern} has {sum(self.counts)} items, fewer than one "
                             f"batch of {batch_size} for each of {streams} streams (ranks x workers)")
        self.batches_per_epoch = self.workers * self.items_per_stream // batch_size
        return self

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from this rank's batch ``start_batch`` on (0: the whole epoch)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        """Items this rank takes per epoch."""
        return self.batches_per_epoch * self.batch_size

    # ------------------------------------------------------------------------------------------
    # the order

    def shard_order(self, epoch: int) -> list[int]:
        """Shard indices in the order epoch ``epoch`` reads them."""
        if not self.shuffle:
            return list(range(len(self.urls)))
        generator = torch.Generator().manual_seed(_seed(self.seed, "shards", epoch))
        return torch.randperm(len(self.urls), generator=generator).tolist()

    def stream_ranges(self, epoch: int, stream: int) -> list[tuple[int, int, int]]:
        """``(shard, first, stop)`` item ranges of stream ``stream`` (``rank * workers + role``) in ``epoch``."""
        start, stop = stream * self.items_per_stream, (stream + 1) * self.items_per_stream
        ranges, offset = [], 0
        for shard in self.shard_order(epoch):
            count = self.counts[shard]
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                ranges.append((shard, lo - offset, hi - offset))
            offset += count
        return ranges

    def raw_stream(self, epoch: int, stream: int):
        """The undecoded samples (dicts of bytes) of one stream, shuffled by its seeded buffer."""
        wds = _webdataset()

        def read():
            for shard, first, stop in self.stream_ranges(epoch, stream):
                samples = wds.tarfile_samples(iter([{"url": self.urls[shard]}]))
                yield from itertools.islice(samples, first, stop)

        if not self.shuffle:
            return read()
        shuffle = wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer,
                              seed=_seed(self.seed, "buffer", epoch, stream))
        return shuffle(read())

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.workers:
            raise RuntimeError(f"webdataset:{self.pattern}: configured for {self.num_workers} DataLoader workers, "
                               f"iterated by {workers}")
        role = (worker + self.start_batch) % workers
        served = max(0, -(-(self.start_batch - role) // workers))  # batches this role gave before start_batch
        samples = self.raw_stream(self.epoch, self.rank * workers + role)
        for sample in itertools.islice(samples, served * self.batch_size, None):
            yield self.decode(sample, self.epoch)

    def __getitem__(self, index: int) -> dict:
        """Item ``index`` in written order (reads the shards up to it; for inspection, not training)."""
        wds = _webdataset()
        samples = wds.tarfile_samples(iter({"url": url} for url in self.urls))
        for sample in itertools.islice(samples, index, None):
            return self.decode(sample, self.epoch)
        raise IndexError(f"webdataset:{self.pattern}: index {index} out of range ({sum(self.counts)} items)")

    # ------------------------------------------------------------------------------------------
    # decoding

    def decode(self, sample: dict, epoch: int) -> dict:
        """One webdataset sample as the package's dict (see the class docstring)."""
        item = {}
        for field, value in sample.items():
            if field.startswith("__"):
                continue
            if field.startswith("image."):
                item["image"] = self.decode_image(value, sample["__key__"], epoch)
            elif field == "cls":
                item["label"] = torch.tensor(int(value), dtype=torch.int64)
            elif field == "txt":
                item["caption"] = value.decode("utf-8")
            elif field == "json":
                item.update({k: v for k, v in json.loads(value).items() if k == "sample_rate"})
            elif field.endswith(".npy"):
                item[field[:-4]] = decode_npy(value)
        return item

    def decode_image(self, data: bytes, key: str, epoch: int) -> torch.Tensor:
        """Image bytes as float ``(C, H, W)`` in ``[-1, 1]``: resized, cropped and flipped."""
        channels = self.channels or 3
        try:
            image = load_image(io.BytesIO(data), self.image_size, channels, crop=not self.random_crop)
        except UnreadableFileError as err:
            raise UnreadableFileError(f"webdataset:{self.pattern}: item {key}: {err}") from None
        if self.random_crop or self.random_flip:
            size = self.image_size if self.random_crop else min(image.shape[-2:])
            image = crop_and_flip(image, size, augment_rng(self.seed, epoch, key), self.random_crop, self.random_flip)
        return image.float() / 127.5 - 1.0
