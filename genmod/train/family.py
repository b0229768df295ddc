"""The Family contract (docs/DESIGN.md §3) and the registry the CLI uses.

A family contributes a model, a loss and a sampler; the one trainer runs the loop::

    class MyFamily(Family):
        name = "my"
        config_class = MyConfig

        def build_model(self): return MyModel(...)
        def loss(self, model, batch, generator):
            x0 = batch["image"]
            noise = torch.randn(x0.shape, generator=generator, device=generator.device)
            ...
            return {"loss": loss, "mse_low_t": ...}
        def sample(self, model, num, generator): return images_in_minus1_1

    register_family("my", MyFamily)

Rules the trainer relies on:

* All training randomness (noise, t, label dropout) is drawn from ``generator``. It lives on the
  training device (draw with ``device=generator.device``) and is seeded from
  ``(seed, micro_step, rank)``, which is what makes a resumed run equal the uninterrupted one.
* ``model`` in ``loss`` may be wrapped (DDP); call ``model(...)`` for the forward pass and use
  :func:`unwrap_model` to reach attributes such as ``config``.
* ``loss`` returns a dict with a scalar ``"loss"``; other scalar entries are logged.
* ``sample`` returns previews in [-1, 1] (images ``(B, C, H, W)``); a family whose samples are not
  images defines ``save_preview(samples, path_without_suffix)`` and writes what it likes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import ConfigError, TrainConfig

__all__ = ["Family", "register_family", "get_family", "registered_families", "unwrap_model",
           "RegisteredFamily"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class Family:
    """Base class (and protocol) of a generator family; subclasses override the methods below."""

    name: str = "family"
    config_class: type = TrainConfig

    def __init__(self, config: TrainConfig):
        self.config = config

    def build_model(self) -> torch.nn.Module:
        """A fresh ``diffusers.ModelMixin + ConfigMixin`` model (fp32, on CPU)."""
        raise NotImplementedError(f"{type(self).__name__}.build_model")

    def loss(self, model: torch.nn.Module, batch: dict, generator: torch.Generator) -> dict:
        """``{"loss": scalar tensor, **other scalars to log}`` for one micro-batch."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def sample(self, model: torch.nn.Module, num: int, generator: torch.Generator) -> Optional[torch.Tensor]:
        """``num`` previews in [-1, 1]; return None to skip previews."""
        return None

    # -- optional hooks for families with state of their own (e.g. a GAN discriminator) ---------
    def set_step(self, step: int) -> None:
        """Told the optimizer step after every step and on resume (e.g. to start a GAN at a step)."""

    def state_dict(self) -> dict:
        """Family-owned training state (tensors, numbers) saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Restore what :meth:`state_dict` returned, on resume."""

    def callbacks(self) -> list[Callable]:
        """Per-step functions ``fn(trainer, step, metrics)`` the trainer runs beside its own (none by default)."""
        return []

    # -- after training ---------------------------------------------------------------------------
    def evaluate(self, summary) -> Optional[dict]:
        """Metrics of the trained result (the ``TrainSummary`` names its files), or None to skip.

        Run by ``run_family`` on the main process after training; pictures go to :meth:`eval_dir`,
        the returned numbers to ``OUTPUT/eval/metrics.json``. Families size it with ``eval_samples``.
        """
        return None

    def eval_dir(self) -> str:
        """``OUTPUT/eval``, where :meth:`evaluate` writes."""
        return os.path.join(self.config.output_dir, "eval")

    def build_pipeline(self, model: torch.nn.Module):
        """A ``DiffusionPipeline`` around the trained model for export, or None."""
        return None

    def build_dataset(self):
        """The training dataset; by default ``genmod.data.get_dataset(config.dataset, ...)``."""
        from genmod.data import get_dataset

        kwargs = self.dataset_kwargs()
        if getattr(self.config, "dataset_size", None) is not None:
            kwargs["num_samples"] = self.config.dataset_size
        kwargs.update(image_options(self.config))
        try:
            return get_dataset(self.config.dataset, split=self.config.dataset_split, **kwargs)
        except TypeError as err:
            if not image_options(self.config) or "unexpected keyword" not in str(err):
                raise
            raise ValueError(f"--dataset {self.config.dataset}: takes no --resolution / --random_crop / "
                             f"--random_flip ({err})") from None

    def dataset_kwargs(self) -> dict:
        """Extra keyword arguments for the dataset class in :meth:`build_dataset` (none by default)."""
        return {}


def image_options(config) -> dict:
    """Dataset keywords of ``--resolution``, ``--random_crop``, ``--random_flip`` (only those set)."""
    options = {}
    if getattr(config, "resolution", None) is not None:
        options["image_size"] = config.resolution
    for name in ("random_crop", "random_flip"):
        if getattr(config, name, False):
            options[name], options["seed"] = True, config.seed
    return options


@dataclass
class RegisteredFamily:
    """A registry entry: ``entry(config)`` builds the family; ``entry.config_class`` parses flags."""

    name: str
    factory: Callable[[TrainConfig], Family]
    config_class: type

    def __call__(self, config: TrainConfig) -> Family:
        return self.factory(config)


_REGISTRY: dict[str, RegisteredFamily] = {}


def register_family(name: str, factory: Callable[[TrainConfig], Family], config_class: type | None = None) -> None:
    """Register ``factory`` (usually the Family subclass) under ``name`` for ``genmod train NAME``."""
    config_class = config_class or getattr(factory, "config_class", None)
    if config_class is None:
        raise TypeError(f"register_family({name!r}): pass config_class= or give the factory a config_class attribute")
    _REGISTRY[name] = RegisteredFamily(name, factory, config_class)


def get_family(name: str) -> RegisteredFamily:
    """The registered family ``name``; a ConfigError lists the known names otherwise."""
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise ConfigError(f"unknown family {name!r} (known: {known})")
    return _REGISTRY[name]


def registered_families() -> list[str]:
    return sorted(_REGISTRY)
