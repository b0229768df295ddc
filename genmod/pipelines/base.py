"""Shared pipeline plumbing: loading genmod pipelines offline in a fresh process.

diffusers 0.42 never imports a library just because ``model_index.json`` names it (a 2026 security
hardening), so ``DiffusionPipeline.from_pretrained`` cannot find genmod's component classes unless
their modules are already imported. ``GenmodPipeline.from_pretrained`` imports the ``genmod.*`` modules the index
names (our own package only) first.
"""

from __future__ import annotations

import importlib
import json
import numbers
import os
import sys

import numpy as np

import torch
from diffusers import DiffusionPipeline

from genmod.core.files import (CorruptFileError, check_no_missing_weights, check_weights_folder, load_model_folder,
                               read_json_object)

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


# libraries a model_index.json may name besides genmod's own (diffusers' schedulers / autoencoders)
OTHER_LIBRARIES = ("diffusers", "transformers")


def _import_named_components(path: str | os.PathLike) -> dict:
    index_file = os.path.join(os.fspath(path), "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"{path}: not a pipeline folder (no model_index.json)")
    index = read_json_object(index_file)
    for name, value in _components(index):
        try:
            _import_component_module(value[0])
        except ImportError:
            raise CorruptFileError(f"{index_file}: component {name!r} names module {value[0]!r}, which does not "
                                   "exist in this genmod") from None
    return index


def _components(index: dict) -> list[tuple[str, list]]:
    """``(name, [library, class])`` of each component a ``model_index.json`` names (absent ones left out)."""
    return [(name, value) for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
            and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], str)]


def check_pipeline_folder(path: str | os.PathLike) -> dict:
    """The ``model_index.json`` of a pipeline folder whose structure is sound: a known pipeline class, and
    for each component a library genmod loads, a class it has, a folder with a JSON config and (models)
    complete ``.safetensors`` weights. Raises a one-line error naming the first bad file."""
    from genmod.pipelines import PIPELINE_MODULES

    path = os.fspath(path)
    index_file = os.path.join(path, "model_index.json")
    exported = isinstance(read_json_object(index_file).get("_class_name"), list)  # genmod export-diffusers output
    index = read_json_object(index_file) if exported else _import_named_components(path)
    if exported:
        _check_code_file(path, index_file, "_class_name", index["_class_name"][0])
    elif str(index.get("_class_name")) not in PIPELINE_MODULES:
        raise CorruptFileError(f"{index_file}: unknown pipeline class {index.get('_class_name')!r}")
    for name, (library, class_name) in _components(index):
        if exported and library.startswith(EXPORTED_PREFIX):  # its code ships in the folder; never imported here
            _check_code_file(os.path.join(path, name), index_file, name, library)
            library, class_name = None, None
        _check_component(path, index_file, name, library, class_name)
    return index


EXPORTED_PREFIX = "gm_"  # module files written by genmod export-diffusers


def _check_code_file(folder: str, index_file: str, name: str, module) -> None:
    if not isinstance(module, str) or not os.path.isfile(os.path.join(folder, f"{module}.py")):
        raise CorruptFileError(f"{index_file}: {name!r} names code {module!r}, which is not in {folder}")


def _check_component(path: str, index_file: str, name: str, library, class_name) -> None:
    """A component's library and class (``library=None``: code shipped in the folder) and its files."""
    if library is not None:
        _check_component_class(index_file, name, library, class_name)
    folder = os.path.join(path, name)
    if not os.path.isdir(folder):
        raise CorruptFileError(f"{folder}: missing (model_index.json names component {name!r})")
    if os.path.isfile(os.path.join(folder, "scheduler_config.json")):
        read_json_object(os.path.join(folder, "scheduler_config.json"))
        return
    read_json_object(os.path.join(folder, "config.json"))
    if not check_weights_folder(folder):
        raise CorruptFileError(f"{folder}: no .safetensors weights")


def _check_component_class(index_file: str, name: str, library: str, class_name: str) -> None:
    if not library.startswith(TRUSTED_PREFIXES + tuple(LEGACY_PREFIXES)) and library not in OTHER_LIBRARIES:
        raise CorruptFileError(f"{index_file}: component {name!r} names library {library!r}, which genmod does not load")
    try:
        module = sys.modules.get(library) or importlib.import_module(library)
        found = getattr(module, class_name, None)
    except ImportError:
        found = None
    if not isinstance(found, type):
        raise CorruptFileError(f"{index_file}: component {name!r} names class {class_name!r}, which {library} lacks")


def _check_no_missing_weights(pipe, path: str) -> None:
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            check_no_missing_weights(component, os.path.join(path, name))


class GenmodPipeline(DiffusionPipeline):
    """Base class of genmod pipelines: offline ``from_pretrained`` of genmod components."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            if os.path.isabs(path) or path.startswith(".") or path.count("/") > 1:  # a local path, not a hub id
                raise FileNotFoundError(f"{path}: no such pipeline folder")
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_pipeline_folder(path)
        kwargs.setdefault("use_safetensors", True)  # never fall back to unpickling
        load = super().from_pretrained  # errors past the structure check (a config value, a shape) name the folder
        pipe = load_model_folder(path, lambda: load(pretrained_model_name_or_path, **kwargs), config="model_index.json",
                                 weights=False)
        _check_no_missing_weights(pipe, path)
        return pipe

    def __setattr__(self, name, value):
        """``pipe.scheduler = X`` also fills an optional component that was None (diffusers keeps such a slot
        at ``(None, None)`` in ``model_index.json``, so the swapped-in component would not be saved)."""
        if (value is not None and name in getattr(self, "_optional_components", ()) and
                name in self.__dict__ and self.__dict__[name] is None):
            from diffusers.pipelines.pipeline_utils import _fetch_class_library_tuple

            super().__setattr__(name, value)
            self.register_to_config(**{name: _fetch_class_library_tuple(value)})
            return
        super().__setattr__(name, value)

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

    def parse_class_labels(self, class_labels, device, allow_null: bool = False,
                           num_images_per_label: int = 1) -> torch.Tensor:
        """The one label parser of every genmod pipeline: ids and/or names, one, a list, nested lists
        (``[[1], [1]]``, as DiTPipeline takes them), a tensor or an array -> ids ``[B]`` in
        ``[0, num_classes)`` (``allow_null``: ``num_classes`` too), each repeated ``num_images_per_label`` times."""
        num_classes = self.transformer.config.num_classes
        if not isinstance(num_images_per_label, numbers.Integral) or num_images_per_label < 1:
            raise ValueError(f"num_images_per_label: must be an int >= 1, got {num_images_per_label!r}")
        flat = _flatten_labels(class_labels)
        bad = [c for c in flat if not isinstance(c, (str, numbers.Integral)) or isinstance(c, bool)]
        if not flat or bad:
            raise ValueError(f"class_labels: expected class ids or names, got {class_labels!r}")
        names = [c for c in flat if isinstance(c, str)]
        name_ids = iter(self.get_label_ids(names) if names else [])
        ids = [next(name_ids) if isinstance(c, str) else int(c) for c in flat]
        top = num_classes + 1 if allow_null else num_classes
        if min(ids) < 0 or max(ids) >= top:
            raise ValueError(f"class_labels: ids must be in [0, {top}), got {ids}")
        return torch.tensor(ids, dtype=torch.long, device=device).repeat_interleave(num_images_per_label)

    def class_label_ids(self, class_labels, device, num_images_per_label: int = 1) -> torch.Tensor | None:
        """``class_labels`` (see ``parse_class_labels``) as ids ``[B]``; None for unconditional models."""
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            if num_classes:
                raise ValueError("class_labels: this model is class-conditional; pass class ids or names")
            return None
        if not num_classes:
            raise ValueError("class_labels: this model is unconditional (num_classes=0)")
        return self.parse_class_labels(class_labels, device, num_images_per_label=num_images_per_label)

    def set_attention_slice(self, slice_size):
        """``enable_attention_slicing``: genmod models attend with SDPA (already memory-efficient), so
        slicing would be silently ignored; say so instead (``disable_attention_slicing`` is a no-op)."""
        if slice_size is not None:
            raise NotImplementedError("enable_attention_slicing: genmod models have no sliced attention; they use "
                                      "scaled_dot_product_attention (pick a kernel with model.set_attention_backend)")

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] from the generator's output: the tokenizer ``vae`` decodes latents, if any.

        A genmod tokenizer undoes its ``scaling_factor`` / ``shift_factor`` in ``decode`` itself; a diffusers
        autoencoder (``AutoencoderKL``, ...) does not, so its factors are undone here, as diffusers' pipelines do:
        ``latents / scaling_factor + shift_factor``."""
        vae = getattr(self, "vae", None)
        if vae is None:
            return latents
        if type(vae).__module__.startswith("diffusers."):
            scaling = getattr(vae.config, "scaling_factor", None) or 1.0
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = latents / scaling + shift
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



def _flatten_labels(class_labels) -> list:
    """One label, or (nested) lists / tuples / tensors / arrays of them, as a flat list."""
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        return class_labels.reshape(-1).tolist()
    if isinstance(class_labels, (list, tuple)):
        return [label for item in class_labels for label in _flatten_labels(item)]
    return [class_labels]
