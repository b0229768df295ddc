"""genmod pipelines (diffusers ``DiffusionPipeline`` subclasses) and offline loading.

Load a saved pipeline with ``genmod.pipelines.load_pipeline(dir)`` or with its class, e.g.
``FlowMatchingPipeline.from_pretrained(dir)``; both work in a fresh process without network.
Pipeline classes are imported lazily from their family's module (named in ``genmod.families``).
"""

import importlib

from genmod.families import pipeline_modules
from genmod.pipelines.base import GenmodPipeline, _import_named_components

# class name -> module defining it (one file per family), from the family table
PIPELINE_MODULES = pipeline_modules()

__all__ = ["GenmodPipeline", "load_pipeline", *PIPELINE_MODULES]


def __getattr__(name):
    if name in PIPELINE_MODULES:
        return getattr(importlib.import_module(PIPELINE_MODULES[name]), name)
    raise AttributeError(f"module 'genmod.pipelines' has no attribute {name!r}")


def load_pipeline(path, **kwargs):
    """Load any genmod pipeline folder by the class named in its ``model_index.json``."""
    index = _import_named_components(path)
    class_name = str(index.get("_class_name"))
    if class_name not in PIPELINE_MODULES:
        raise ValueError(f"{path}/model_index.json: unknown pipeline class {class_name!r}")
    return __getattr__(class_name).from_pretrained(path, **kwargs)
