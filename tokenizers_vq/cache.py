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
        with open(path) as f:
            self.index = json.load(f)
        tensors: dict[str, list[torch.Tensor]] = {}
        for shard in self.index["shards"]:
            shard_path = os.path.join(cache_dir, shard["file"])
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{path}: shard {shard['file']!r} is missing")
            for key, value in load_file(shard_path).items():
                tensors.setdefault(key, []).append(value)
        self.tensors = {k: torch.cat(v) for k, v in tensors.items()}
        self.num_samples = int(self.index["num_samples"])
        if self.tensors["labels"].shape[0] != self.num_samples:
            raise ValueError(f"{path}: num_samples={self.num_samples} but shards hold {self.tensors['labels'].shape[0]}")
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
    model_dir, dataset_name = tokenizer_and_dataset(args.tokenizer_dir, args.dataset)
    model = load_tokenizer(model_dir).to(args.device)
    out_dir = args.out or os.path.join(model_dir, "..", f"cache-{dataset_name}-{args.split}")
    cache_dir = out_dir if args.format == "safetensors" else tempfile.mkdtemp(prefix="genmod-tokenize-")
    index = tokenize_dataset(model, get_dataset(dataset_name, split=args.split), cache_dir, batch_size=args.batch_size,
                             shard_size=args.shard_size, store=args.store, num_samples=args.num_samples,
                             tokenizer_path=os.path.abspath(model_dir))
    if args.format == "webdataset":
        index = cache_to_webdataset(cache_dir, out_dir, args.shard_size)
        shutil.rmtree(cache_dir)
    print(f"wrote {index}")
    return 0
