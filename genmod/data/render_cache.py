"""Rendered items kept as uint8: the float <-> uint8 conversions and a cache that renders items in
chunks on first access, on one CPU thread (used by the procedural shape datasets).

Storing uint8 hides the last-bit float differences between CPUs, so every machine returns the
same items.
"""

from __future__ import annotations

import contextlib

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` floats to uint8 (clamped, rounded half up)."""
    return (x.clamp(0, 1) * 255.0 + 0.5).floor().to(torch.uint8)


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 to floats in ``[-1, 1]``."""
    return x.float() / 127.5 - 1.0


@contextlib.contextmanager
def single_thread():
    """Render on one intra-op thread: the tensors are small, so extra threads only add
    synchronisation, and on a shared CPU they spin (measured 4-40x slower on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ChunkCache:
    """Renders items in chunks on first access and keeps them (uint8) in memory."""

    chunk_size = 512

    def __init__(self, num_items: int, render_fn):
        self.num_items = num_items
        self.render_fn = render_fn
        self.chunks: dict[int, torch.Tensor] = {}

    def get(self, index: int) -> torch.Tensor:
        k = index // self.chunk_size
        if k not in self.chunks:
            start = k * self.chunk_size
            with single_thread():
                self.chunks[k] = self.render_fn(range(start, min(start + self.chunk_size, self.num_items)))
        return self.chunks[k][index - k * self.chunk_size]

    def all(self, progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm

        starts = range(0, self.num_items, self.chunk_size)
        for start in tqdm(starts, desc="rendering", disable=not progress):
            self.get(start)
        return torch.cat([self.chunks[k] for k in sorted(self.chunks)])
