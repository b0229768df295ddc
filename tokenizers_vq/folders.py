"""Where a saved tokenizer lives: a model folder (``config.json``) or a training run holding ``final_model/``."""
from __future__ import annotations

import os
from typing import Optional

from genmod.core.files import read_json_object

__all__ = ["resolve_tokenizer_dir", "tokenizer_and_dataset"]


def resolve_tokenizer_dir(path: str) -> tuple[str, Optional[dict]]:
    """A tokenizer folder (config.json) or a run folder holding ``final_model/``; plus its run's config."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"TOKENIZER_DIR: {path!r} is not a folder")
    model_dir = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "final_model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"TOKENIZER_DIR: no config.json in {path!r} or its final_model/")
    run_config = None
    for candidate in (os.path.join(model_dir, "..", "train_config.json"), os.path.join(path, "train_config.json")):
        if os.path.isfile(candidate):
            run_config = read_json_object(candidate)
            break
    return model_dir, run_config


def tokenizer_and_dataset(path: str, dataset: Optional[str] = None) -> tuple[str, str]:
    """``(model folder, dataset name)`` of a saved tokenizer; the dataset defaults to its run's ``train_config.json``."""
    model_dir, run_config = resolve_tokenizer_dir(path)
    dataset = dataset or (run_config or {}).get("dataset")
    if dataset is None:
        raise ValueError("--dataset is required (no train_config.json next to the tokenizer)")
    return model_dir, dataset
