"""``genmod tokenize`` backend: encode a dataset once into cached latents / indices, read them back.

Layout of a cache folder::

    index.json                  # tokenizer path + config, shapes, shards, labels, captions
    shard-00000.safetensors     # "latents" (N, ...) float32 (normalised, as tokenizer.encode)
                                # "indices" (N, ...) int64 (discrete tokenizers), "labels" (N,) int64

Generators train on :class:`CachedLatentDataset` without re-encoding; its items are dicts
``{"latents", "indices" (if stored), "label", "caption"}``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .models.common import batch_input

INDEX_FILE = "index.json"


@torch.no_grad()
def _resolve_store(store: str, tokenizer) -> str:
    """``store`` with ``"auto"`` resolved: both for discrete tokenizers, latents otherwise."""
    if store not in ("auto", "latents", "indices", "both"):
        raise ValueError(f"store must be 'auto', 'latents', 'indices' or 'both', got {store!r}")
    discrete = hasattr(tokenizer, "encode_indices")
    if store == "auto":
        store = "both" if discrete else "latents"
    if store in ("indices", "both") and not discrete:
        raise ValueError(f"store={store!r}: {type(tokenizer).__name__} is continuous and has no indices")
    return store


class _ShardWriter:
    """Buffers encoded batches and writes them as ``shard-NNNNN.safetensors`` files of ``shard_size`` items."""

    def __init__(self, out_dir: str, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards: list[dict] = []
        self.buffer: dict[str, list[torch.Tensor]] = {"latents": [], "indices": [], "labels": []}

    def add(self, **tensors: torch.Tensor) -> None:
        for key, value in tensors.items():
            self.buffer[key].append(value)
        while sum(len(t) for t in self.buffer["labels"]) >= self.shard_size:
            self.flush(self.shard_size)

    def flush(self, limit: Optional[int] = None) -> None:
        """Write the first ``limit`` buffered items (all when None) as one shard; keep the rest."""
        if not self.buffer["labels"]:
            return
        tensors = {k: torch.cat(v) for k, v in self.buffer.items() if v}
        count = tensors["labels"].shape[0] if limit is None else limit
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({k: v[:count].contiguous() for k, v in tensors.items()}, os.path.join(self.out_dir, name))
        self.shards.append({"file": name, "count": int(count)})
        for key, value in tensors.items():
            self.buffer[key] = [value[count:]] if value.shape[0] > count else []


def tokenize_dataset(tokenizer, dataset, out_dir: str, batch_size: int = 64, shard_size: int = 10000,
                     store: str = "auto", num_samples: Optional[int] = None, tokenizer_path: Optional[str] = None,
                     device=None) -> str:
    """Encode ``dataset`` with ``tokenizer`` (eval mode, deterministic) into ``out_dir``.

    ``store``: ``"latents"``, ``"indices"``, ``"both"`` or ``"auto"`` (both for discrete tokenizers,
    latents otherwise). Returns the path of ``index.json``.
    """
    store = _resolve_store(store, tokenizer)
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError("batch_size and shard_size must be positive")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.eval()
    device = device or next(tokenizer.parameters()).device
    total = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    writer, labels, captions = _ShardWriter(out_dir, shard_size), [], []
    for start in tqdm(range(0, total, batch_size), desc="tokenize"):
        items = [dataset[i] for i in range(start, min(start + batch_size, total))]
        x = torch.stack([batch_input(item, tokenizer.config.modality) for item in items]).to(device)
        encoded = {}
        if store in ("latents", "both"):
            encoded["latents"] = tokenizer.encode(x).float().cpu()
        if store in ("indices", "both"):
            encoded["indices"] = tokenizer.encode_indices(x).long().cpu()
        batch_labels = torch.tensor([int(item.get("label", -1)) for item in items], dtype=torch.int64)
        writer.add(**encoded, labels=batch_labels)
        labels.extend(batch_labels.tolist())
        captions.extend(str(item.get("caption", "")) for item in items)
    writer.flush()
    first = load_file(os.path.join(out_dir, writer.shards[0]["file"]))
    index = {
        "num_samples": total,
        "store": store,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_path": tokenizer_path,
        "tokenizer_config": dict(tokenizer.config),
        "latent_shape": list(first["latents"].shape[1:]) if "latents" in first else None,
        "indices_shape": list(first["indices"].shape[1:]) if "indices" in first else None,
        "shards": writer.shards,
        "labels": labels,
        "captions": captions,
        "class_names": list(getattr(dataset, "class_names", [])),
    }
    path = os.path.join(out_dir, INDEX_FILE)
    with open(path, "w") as f:
        json.dump(index, f)
    return path


class CachedLatentDataset(Dataset):
    """Items of a :func:`tokenize_dataset` cache: ``{"latents", "indices", "label", "caption"}``.

    All shards are loaded into memory (latent caches of the built-in datasets are a few MB)."""

    def __init__(self, cache_dir: str):
        path = os.path.join(cache_dir, INDEX_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {INDEX_FILE} in cache folder {cache_dir!r} (run genmod tokenize first)")
        self.index = _read_index(cache_dir)
        tensors: dict[str, list[torch.Tensor]] = {}
        for shard in self.index["shards"]:
            for key, value in load_file(_shard_path(cache_dir, path, shard)).items():
                tensors.setdefault(key, []).append(value)
        self.tensors = {k: torch.cat(v) for k, v in tensors.items()}
        self.num_samples = int(self.index["num_samples"])
        held = self.tensors["labels"].shape[0] if "labels" in self.tensors else 0
        if held != self.num_samples or len(self.index["captions"]) != self.num_samples:
            raise ValueError(f"{path}: stale cache: num_samples={self.num_samples} but the shards hold {held} "
                             f"and the index {len(self.index['captions'])} captions (rerun genmod tokenize)")
        self.captions = self.index["captions"]
        self.class_names = self.index.get("class_names", [])
        self.num_classes = len(self.class_names)
        self.tokenizer_config = self.index["tokenizer_config"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        item = {"label": self.tensors["labels"][i], "caption": self.captions[i]}
        if "latents" in self.tensors:
            item["latents"] = self.tensors["latents"][i]
        if "indices" in self.tensors:
            item["indices"] = self.tensors["indices"][i]
        return item


INDEX_KEYS = {"num_samples": int, "shards": list, "captions": list, "tokenizer_config": dict}


def _read_index(cache_dir: str) -> dict:
    """``index.json`` of a cache, checked against its ``manifest.json`` (when written with one) and for its keys."""
    from genmod.core.files import MANIFEST, CorruptFileError, read_json_object, verify_manifest

    path = os.path.join(cache_dir, INDEX_FILE)
    if os.path.isfile(os.path.join(cache_dir, MANIFEST)):
        problems = verify_manifest(cache_dir)
        if problems:
            raise CorruptFileError(f"{cache_dir}: stale or damaged cache: {problems[0]} (rerun genmod tokenize)")
    index = read_json_object(path)
    for key, tp in INDEX_KEYS.items():
        if not isinstance(index.get(key), tp) or isinstance(index.get(key), bool):
            raise CorruptFileError(f"{path}: {key!r} is missing or not a {tp.__name__}")
    return index


def _shard_path(cache_dir: str, index_path: str, shard) -> str:
    """The path of one listed shard, which exists and is a complete safetensors file."""
    from genmod.core.files import check_safetensors

    name = shard.get("file") if isinstance(shard, dict) else None
    if not isinstance(name, str) or os.path.basename(name) != name or not name:
        raise ValueError(f"{index_path}: bad shard entry {shard!r}")
    shard_path = os.path.join(cache_dir, name)
    if not os.path.isfile(shard_path):
        raise FileNotFoundError(f"{index_path}: shard {name!r} is missing")
    check_safetensors(shard_path)
    return shard_path


def check_modality(dataset, modality: str, name: str) -> None:
    """One line when the dataset's items lack the field a ``modality`` tokenizer reads (``image`` / ``audio``)."""
    if len(dataset) == 0:
        raise ValueError(f"--dataset {name}: no items")
    first = dataset[0]
    if modality not in first:
        raise ValueError(f"--dataset {name}: its items hold {sorted(first)}, not {modality!r}; this is an {modality} "
                         "tokenizer")


def check_tokenizer_arguments(args) -> None:
    """One-line errors for the shared flags of ``genmod tokenize`` / ``genmod eval-tokenizer``, before loading."""
    from genmod.core.arguments import check_count, check_device, check_finite
    from genmod.core.files import check_output_path
    from genmod.data import check_dataset_name

    check_count("--num_samples", args.num_samples)
    check_count("--batch_size", args.batch_size)
    check_count("--shard_size", getattr(args, "shard_size", None))
    check_finite("--duration", getattr(args, "duration", None), 0.0, strict=True)
    check_device("--device", args.device)
    if args.dataset is not None:
        try:
            check_dataset_name(args.dataset)
        except ValueError as err:
            raise ValueError(f"--dataset: {err}") from None
    if args.out is not None:
        check_output_path(args.out, folder=True)


def cache_to_webdataset(cache_dir: str, out_dir: str, shard_size: int) -> str:
    """A :func:`tokenize_dataset` cache rewritten as webdataset tar shards (``latents.npy``,
    ``indices.npy``, ``cls``, ``txt`` per item) plus ``dataset.json`` holding the tokenizer, for
    ``--dataset webdataset:OUT/train-{000000..N}.tar`` (``genmod.data.streaming``). Returns the JSON's path."""
    from genmod.data.shard_writer import write_shards

    cache = CachedLatentDataset(cache_dir)
    keep = ("store", "tokenizer_class", "tokenizer_path", "tokenizer_config", "latent_shape", "indices_shape")
    return write_shards(cache, out_dir, shard_size, extra_info={k: cache.index.get(k) for k in keep})


def main(argv: list[str]) -> int:
    """``genmod tokenize TOKENIZER_DIR --dataset NAME [--split train] [--out DIR] [--store auto]``."""
    import argparse

    from genmod.core.files import atomic_dir, check_output_path
    from genmod.data import get_dataset

    from .folders import tokenizer_and_dataset
    from .models import load_tokenizer

    parser = argparse.ArgumentParser(prog="genmod tokenize", description="encode a dataset once into cached latents / indices")
    parser.add_argument("tokenizer_dir")
    parser.add_argument("--dataset", default=None, help="default: the dataset of the run's train_config.json")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", default=None, help="default: TOKENIZER_DIR/../cache-<dataset>-<split>")
    parser.add_argument("--store", default="auto", choices=["auto", "latents", "indices", "both"])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--shard_size", type=int, default=10000)
    parser.add_argument("--num_samples", type=int, default=None)
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "webdataset"],
                        help="webdataset: tar shards OUT/train-%%06d.tar + dataset.json, streamed by --dataset webdataset:...")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    check_tokenizer_arguments(args)
    model_dir, dataset_name = tokenizer_and_dataset(args.tokenizer_dir, args.dataset)
    out_dir = args.out or os.path.join(model_dir, "..", f"cache-{dataset_name}-{args.split}")
    check_output_path(out_dir, folder=True)
    model = load_tokenizer(model_dir).to(args.device)
    dataset = get_dataset(dataset_name, split=args.split)
    check_modality(dataset, model.config.modality, dataset_name)
    if args.format == "safetensors":  # staged and renamed: a cut run leaves the previous cache, never a stale mix
        with atomic_dir(out_dir, replace=True, manifest=True) as staging:
            tokenize_dataset(model, dataset, staging, batch_size=args.batch_size, shard_size=args.shard_size,
                             store=args.store, num_samples=args.num_samples, tokenizer_path=os.path.abspath(model_dir))
        index = os.path.join(out_dir, INDEX_FILE)
    else:
        cache_dir = tempfile.mkdtemp(prefix="genmod-tokenize-")
        tokenize_dataset(model, dataset, cache_dir, batch_size=args.batch_size, shard_size=args.shard_size,
                         store=args.store, num_samples=args.num_samples, tokenizer_path=os.path.abspath(model_dir))
        index = cache_to_webdataset(cache_dir, out_dir, args.shard_size)
        shutil.rmtree(cache_dir)
    print(f"wrote {index}")
    return 0
