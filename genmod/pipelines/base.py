"""Shared pipeline plumbing: loading genmod pipelines offline in a fresh process.

diffusers 0.42 never imports a library just because ``model_index.json`` names it (a 2026 security
hardening), so ``DiffusionPipeline.from_pretrained`` cannot find genmod's component classes unless
their modules are already imported. ``GenmodPipeline.from_pretrained`` imports the ``genmod.*`` modules the index
names (our own package only) first.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch
from diffusers import DiffusionPipeline

TRUSTED_PREFIXES = ("genmod.",)
# Before the namespace move these packages installed at the top level; folders saved then name e.g.
# "tokenizers_vq.models.kl_vae". They load under their installed names.
LEGACY_PREFIXES = {"tokenizers_vq.": "genmod.tokenizers_vq.", "samplers.": "genmod.samplers.", "evals.": "genmod.evals."}


def _import_component_module(name: str) -> None:
    """Import one of our modules named in a ``model_index.json`` (a legacy name is aliased to the installed one)."""
    for old, new in LEGACY_PREFIXES.items():
        if name.startswith(old):
            sys.modules.setdefault(name, importlib.import_module(new + name[len(old):]))
            return
    if name.startswith(TRUSTED_PREFIXES):
        importlib.import_module(name)


def _import_named_components(path: str | os.PathLike) -> dict:
    index_file = os.path.join(os.fspath(path), "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"{path}: not a pipeline folder (no model_index.json)")
    try:
        with open(index_file) as f:
            index = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_file}: invalid JSON ({err})") from None
    for value in index.values():
        if isinstance(value, list) and value and isinstance(value[0], str):
            _import_component_module(value[0])
    return index


class GenmodPipeline(DiffusionPipeline):
    """Base class of genmod pipelines: offline ``from_pretrained`` of genmod components."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if os.path.isdir(os.fspath(pretrained_model_name_or_path)):
            _import_named_components(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @staticmethod
    def _generator_for(generator, batch_size: int):
        """Accept one generator, a list of one per sample, or None (diffusers convention)."""
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {batch_size}")
        return generator

    def get_label_ids(self, labels: str | list[str]) -> list[int]:
        """Map class names (the ``id2label`` values saved in the pipeline config) to ids."""
        label2id = {name: int(i) for i, name in self.config.id2label.items()}
        labels = [labels] if isinstance(labels, str) else labels
        missing = [name for name in labels if name not in label2id]
        if missing:
            raise ValueError(f"class_labels: unknown class name(s) {missing}; known: {sorted(label2id)}")
        return [label2id[name] for name in labels]

    def class_label_ids(self, class_labels, device) -> torch.Tensor | None:
        """``class_labels`` (ids or names, one or a list) as an id tensor ``[B]`` checked against the model."""
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            if num_classes:
                raise ValueError("class_labels: this model is class-conditional; pass class ids or names")
            return None
        if not num_classes:
            raise ValueError("class_labels: this model is unconditional (num_classes=0)")
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        if isinstance(class_labels, (list, tuple)) and class_labels and isinstance(class_labels[0], str):
            class_labels = self.get_label_ids(list(class_labels))
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels: ids must be in [0, {num_classes}), got {labels.tolist()}")
        return labels

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] from the generator's output: the tokenizer ``vae`` decodes latents, if any."""
        vae = getattr(self, "vae", None)
        if vae is None:
            return latents
        decoded = vae.decode(latents.to(vae.dtype))
        return decoded.sample if hasattr(decoded, "sample") else decoded

    @staticmethod
    def images_to_output(images: torch.Tensor, output_type: str):
        """Map decoder output in [-1, 1] (B, C, H, W) to 'pt' ([0,1] NCHW), 'np' (NHWC float) or 'pil'."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type: expected one of pil/np/pt/latent, got {output_type!r}")
        if output_type == "latent":
            return images
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return DiffusionPipeline.numpy_to_pil(array)

