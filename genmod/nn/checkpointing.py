"""Gradient checkpointing of one block, with the block's ``torch.Generator`` draws replayed.

A model that supports diffusers' ``enable_gradient_checkpointing()`` sets ``_supports_gradient_checkpointing
= True`` and ``self.gradient_checkpointing = False`` (diffusers flips that attribute) and runs its
blocks through :func:`checkpoint_block`. ``torch.utils.checkpoint`` (non-reentrant, as diffusers'
default) keeps only the block's inputs and recomputes it in the backward pass; it restores the global
CPU/CUDA RNG for the recomputation but knows nothing of an explicit ``torch.Generator``. Our families
draw drop-path from the trainer's generator (docs/DESIGN.md §3), so a plain recomputation would draw
*new* masks and the gradients would belong to another network. :func:`checkpoint_block` rewinds the
generator to its state before the block for the recomputation and puts it back afterwards, so the
draws of the forward pass, the recomputation and everything after the block are those of a run
without checkpointing.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_block"]


def checkpoint_block(enabled: bool, fn: Callable, *args, generator: Optional[torch.Generator] = None):
    """``fn(*args)``, checkpointed when ``enabled`` and autograd records (training).

    ``generator``: the ``torch.Generator`` that ``fn`` draws from (drop-path), or None. Keyword
    arguments of the block go in with ``functools.partial``; tensors reached through it get gradients
    too (non-reentrant checkpointing).
    """
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    if generator is not None:
        fn = _replay_generator(fn, generator)
    return checkpoint(fn, *args, use_reentrant=False)


def _replay_generator(fn: Callable, generator: torch.Generator) -> Callable:
    """``fn`` whose every call starts from the generator state of the first call; calls after the first
    (the backward-pass recomputation) leave the generator where they found it."""
    start = generator.get_state()
    calls = []

    def run(*args):
        before, replay = generator.get_state(), bool(calls)
        calls.append(1)
        generator.set_state(start)
        try:
            return fn(*args)
        finally:  # also when torch stops a recomputation early (it raises once it has what it needs)
            if replay:
                generator.set_state(before)

    return run
