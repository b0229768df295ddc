"""Data order and seeding of the trainer: seeds, per-epoch batches, collate and the device move.

Global batch ``i`` of epoch ``e`` is a contiguous slice of a permutation seeded by ``(seed, e)``,
split across processes, so W processes x B samples see what 1 process x W*B would and a resumed
run skips exactly the consumed batches (see :mod:`genmod.train.trainer`).
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Sampler

from .config import ConfigError

__all__ = ["stable_seed", "EpochBatchSampler", "to_device", "default_collate_fn", "build_loader"]


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical on every machine and Python run."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class EpochBatchSampler(Sampler):
    """Per-process batches of a seeded per-epoch permutation.

    Global batch ``i`` of epoch ``e`` is ``perm_e[i*B*W : (i+1)*B*W]`` (B = per-process batch,
    W = processes); process ``r`` takes its ``r``-th slice of B. So W processes x B samples see
    exactly the samples that 1 process x W*B would. The last incomplete global batch is dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, num_processes: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, on_epoch=None):
        self.on_epoch = on_epoch  # called with the epoch by set_epoch (a dataset's seeded crops)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = batch_size * num_processes
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(f"--batch_size: the dataset has {num_samples} samples, fewer than one global batch "
                              f"({batch_size} x {num_processes} processes)")
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "epoch", self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        for index in range(self.start_batch, self.batches_per_epoch):
            start = index * self.global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


def build_loader(dataset, config, world_size: int, rank: int, pin_memory: bool):
    """``(position, loader, loader_generator)`` of a dataset; ``position.set_epoch(epoch, batch)``
    picks where the next ``iter(loader)`` starts and ``position.batches_per_epoch`` is per process.

    A map-style dataset gets an :class:`EpochBatchSampler` (told the epoch by ``dataset.set_epoch``
    when it has one); a streaming one (``IterableDataset``, e.g. ``genmod.data.WebDatasetStream``)
    is configured with the batch layout and is its own position (its module docstring: the order).
    """
    from torch.utils.data import DataLoader, IterableDataset

    generator = torch.Generator()  # an explicit generator keeps DataLoader's base-seed draw off the global RNG
    common = dict(num_workers=config.num_workers, collate_fn=default_collate_fn(), generator=generator,
                  pin_memory=pin_memory and config.num_workers > 0)
    if isinstance(dataset, IterableDataset):
        if not hasattr(dataset, "configure"):
            raise ConfigError(f"--dataset: {type(dataset).__name__} is an IterableDataset without configure(); "
                              "the trainer cannot place it across processes and resume it")
        position = dataset.configure(config.batch_size, world_size, rank, config.num_workers, seed=config.seed)
        return position, DataLoader(dataset, batch_size=config.batch_size, **common), generator
    position = EpochBatchSampler(len(dataset), config.batch_size, world_size, rank, seed=config.seed,
                                 on_epoch=getattr(dataset, "set_epoch", None))
    return position, DataLoader(dataset, batch_sampler=position, **common), generator


def to_device(batch, device):
    """Tensors of a batch (a tensor, a dict, or a list/tuple of tensors) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_collate_fn():
    """``genmod.data.collate`` (captions and other non-tensor fields), else torch's ``default_collate``."""
    try:
        from genmod.data import collate

        return collate
    except ImportError:
        from torch.utils.data import default_collate

        return default_collate
