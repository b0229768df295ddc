"""Per-item seeding shared by the procedural datasets."""

from __future__ import annotations

import numpy as np

SPLIT_IDS = {"train": 0, "test": 1, "val": 2}


def split_id(split: str) -> int:
    if split not in SPLIT_IDS:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLIT_IDS)}")
    return SPLIT_IDS[split]


def item_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """A PCG64 generator for one item: identical on every machine and independent of dataset size."""
    return np.random.default_rng([int(seed), split_id(split), int(index), int(stream)])
