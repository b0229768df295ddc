"""The trainer's speed switches: ``--gradient_checkpointing`` and ``--compile``.

* ``--gradient_checkpointing`` calls diffusers' ``ModelMixin.enable_gradient_checkpointing()`` on the
  family's model before it is wrapped: each transformer block keeps only its inputs in the forward pass
  and is recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant; Chen et al. 2016,
  "Training Deep Nets with Sublinear Memory Cost"). Same numbers, less activation memory, ~1/3 more
  compute. Randomness inside a block (drop-path drawn from the trainer's generator) is replayed
  by :func:`genmod.nn.checkpoint_block`, so the recomputation sees the same draws.
* ``--compile`` wraps the prepared (DDP) model in ``torch.compile`` (TorchInductor by default;
  https://pytorch.org/docs/stable/generated/torch.compile.html). Saving, EMA, previews and export reach
  the plain module through :func:`~genmod.train.family.unwrap_model` (``_orig_mod``).
"""

from __future__ import annotations

import importlib

import torch

from .config import ConfigError

__all__ = ["enable_gradient_checkpointing", "compile_model"]


def enable_gradient_checkpointing(model: torch.nn.Module, family_name: str) -> None:
    """Turn on gradient checkpointing of ``model``; a model that cannot is a one-line ``ConfigError``."""
    if not getattr(model, "_supports_gradient_checkpointing", False) or not hasattr(model, "enable_gradient_checkpointing"):
        raise ConfigError(f"--gradient_checkpointing: the {family_name} family's model {type(model).__name__} does "
                          "not support gradient checkpointing")
    model.enable_gradient_checkpointing()


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``; a one-line ``ConfigError`` where this torch build cannot compile."""
    if not hasattr(torch, "compile"):
        raise ConfigError(f"--compile: torch {torch.__version__} has no torch.compile (needs torch >= 2.0)")
    try:
        importlib.import_module("torch._dynamo")  # not built on some platforms
    except Exception as err:  # pragma: no cover - depends on the torch build
        raise ConfigError(f"--compile: torch.compile is unavailable here ({type(err).__name__}: {err})") from None
    return torch.compile(model)
