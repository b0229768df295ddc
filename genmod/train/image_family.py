"""Shared data plumbing of image generator families: pixels or a tokenizer's latents.

A generator sees "a tensor of latents plus a decode function" (docs/DESIGN.md §4): with
``config.tokenizer`` set, images are encoded by a saved ``tokenizers_vq`` tokenizer on the fly (or read
from a ``genmod tokenize`` cache, whose items carry ``latents``) and samples are decoded back. With
``config.latent_sample`` and a tokenizer that has a posterior (KL-VAE, sigma-VAE, diffusers AutoencoderKL),
training draws a posterior sample per step on the trainer's generator, as the reference trainings of DiT / SiT
(``vae.encode(x).latent_dist.sample()``), MAR and CausalFusion do; a cache keeps what it stored.
"""

from __future__ import annotations

import torch

from .family import Family


class ImageFamily(Family):
    """A :class:`Family` over square ``(C, H, W)`` images or latents; subclasses add model, loss, sampler."""

    def __init__(self, config):
        super().__init__(config)
        self._dataset = None
        self.tokenizer = None
        if getattr(config, "tokenizer", None):
            from genmod.tokenizers_vq.models import load_tokenizer

            self.tokenizer = load_tokenizer(config.tokenizer).eval().requires_grad_(False)

    def build_dataset(self):
        if self._dataset is None:
            self._dataset = super().build_dataset()
        return self._dataset

    def data_shape(self) -> tuple[int, int, int, list[str]]:
        """``(channels, size, num_classes, class_names)`` of what the generator models."""
        dataset = self.build_dataset()
        first = dataset[0]
        x = first["latents"] if "latents" in first else first["image"]
        if self.tokenizer is not None and "latents" not in first:
            with torch.no_grad():
                x = self.tokenizer.encode(x[None])[0]
        if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"dataset {self.config.dataset!r}: {self.name} needs square (C, H, W) images, "
                             f"got {tuple(x.shape)}")
        return x.shape[0], x.shape[-1], getattr(dataset, "num_classes", 0), list(getattr(dataset, "class_names", []))

    def clean_data(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The batch's clean generator inputs: cached latents, encoded images (a posterior sample drawn on
        ``generator`` when ``config.latent_sample``), or pixels."""
        if "latents" in batch:
            return batch["latents"]
        x = batch["image"]
        if self.tokenizer is not None:
            self.tokenizer.to(x.device)
            with torch.no_grad():
                if self.samples_latents and generator is not None:
                    return self.tokenizer.encode(x, sample=True, generator=generator)
                x = self.tokenizer.encode(x)
        return x

    @property
    def samples_latents(self) -> bool:
        """Whether training encodes posterior samples: ``config.latent_sample`` and a tokenizer with a posterior."""
        return bool(getattr(self.config, "latent_sample", False)) and hasattr(self.tokenizer, "posterior_std")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from generated latents (identity in pixel space)."""
        if self.tokenizer is None:
            return x
        self.tokenizer.to(x.device)
        decoded = self.tokenizer.decode(x)
        return decoded.sample if hasattr(decoded, "sample") else decoded
