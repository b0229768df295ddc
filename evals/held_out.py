"""The held-out protocol: domain FID / KID of a class-conditional pipeline beside its real-vs-real floor.

``class_cycled_samples`` draws ``num`` samples with labels ``i % num_classes`` (one seeded generator per
sample), ``held_out_pair`` gives two disjoint real sets of the same size (reference and floor),
``domain_fidelity`` measures both in the dataset's classifier feature space
(:func:`genmod.evals.report.evaluate_images`), and ``held_out_report`` runs the whole protocol for
``genmod eval --held-out`` and ``genmod train var --eval_samples N``. The pipeline is only called, never
imported: this module stands below the families (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import json
import os
import time
import uuid

import torch

from genmod.evals.generator_adapter import to_uint8
from genmod.evals.report import _drop_cache, domain_space, evaluate_images


def class_cycled_samples(pipe, num: int, num_classes: int, seed: int = 10_000, batch_size: int = 100,
                         **call_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` samples in [-1, 1] from a class-conditional pipeline, labels ``i % num_classes``, sample
    ``i`` drawn with its own generator seeded ``seed + i`` (so any batch size gives the same images)."""
    labels = torch.arange(num) % num_classes
    images = []
    for start in range(0, num, batch_size):
        batch = labels[start:start + batch_size].tolist()
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images.append(pipe(class_labels=batch, generator=generators, output_type="pt", **call_kwargs).images * 2 - 1)
    return torch.cat(images), labels


def held_out_pair(dataset: str, num: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint real sets in [-1, 1]: items ``[0, num)`` and ``[num, 2 num)`` of ``split`` built with
    ``2 num`` samples. The first is the reference, the second the floor's real "generator"."""
    from genmod.data import get_dataset

    data = get_dataset(dataset, split=split, num_samples=2 * num)
    reference_BCHW = torch.stack([data[i]["image"] for i in range(num)])
    floor_BCHW = torch.stack([data[i]["image"] for i in range(num, 2 * num)])
    return reference_BCHW, floor_BCHW


def domain_fidelity(fake: torch.Tensor, reference: torch.Tensor, floor: torch.Tensor, dataset: str, *,
                    labels: torch.Tensor | None = None, kid_subset_size: int | None = None,
                    feature_net_path: str | None = None) -> dict:
    """Domain FID / KID of ``fake`` against ``reference``, beside the real-vs-real floor (``floor`` against
    ``reference``, same N), in the dataset's classifier feature space; with ``labels``, the classifier's
    accuracy on ``fake``. Images in [-1, 1] (or uint8). Flat keys ``domain_fid``, ``domain_fid_floor``,
    ``domain_kid``, ``domain_kid_floor``, ``classifier_accuracy``, ``feature_net``."""
    from genmod.evals.feature_net import classifier_accuracy

    space = domain_space(dataset, feature_net_path)
    as_uint8 = [x if x.dtype == torch.uint8 else to_uint8(x) for x in (fake, reference, floor)]
    reference_cache = f"tmp-{uuid.uuid4().hex}"
    try:
        entry = evaluate_images(as_uint8[0], as_uint8[1], [space], metrics=("fid", "kid"), real_cache=reference_cache,
                                floor_uint8=as_uint8[2], kid_subset_size=kid_subset_size)["spaces"]["domain"]
    finally:
        _drop_cache(reference_cache)
    out = {"domain_fid": entry["model"]["fid"], "domain_fid_floor": entry["real_vs_real"]["fid"],
           "domain_kid": entry["model"]["kid"], "domain_kid_floor": entry["real_vs_real"]["kid"],
           "feature_net": space.net.describe()}
    if labels is not None:
        out["classifier_accuracy"] = classifier_accuracy(space.net, fake, labels)
    return out


def pipeline_num_classes(pipe) -> int:
    """The class count of a class-conditional pipeline's transformer (0 when it has none)."""
    return int(getattr(getattr(getattr(pipe, "transformer", None), "config", None), "num_classes", 0) or 0)


def held_out_report(pipe, num: int, out_dir: str, dataset: str | None = "shapes", *,
                    kid_subset_size: int | None = None, feature_net_path: str | None = None, **call_kwargs) -> dict:
    """The held-out protocol (``genmod eval --held-out``, ``genmod train var --eval_samples N``).

    ``num`` class-cycled samples (:func:`class_cycled_samples`) at the pipeline's own settings, unless
    ``call_kwargs`` say otherwise; ``grid.png`` with 8 samples per class, one class per row; with a
    ``dataset``, :func:`domain_fidelity` against :func:`held_out_pair` (KID subset ``min(1000, num)``
    unless given). Writes ``metrics.json`` into ``out_dir`` and returns it."""
    from torchvision.utils import save_image

    num_classes = pipeline_num_classes(pipe)
    if num_classes <= 0:
        raise ValueError("held-out evaluation: the pipeline's transformer has no num_classes (not class-conditional)")
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    fake, labels = class_cycled_samples(pipe, num, num_classes, **call_kwargs)
    metrics = {"num_eval": num, "sample_seconds": time.perf_counter() - start}
    if hasattr(pipe, "sampling_settings"):
        metrics["settings"] = pipe.sampling_settings()
    grid = torch.cat([fake[labels == c][:8] for c in range(num_classes)])
    save_image(grid, os.path.join(out_dir, "grid.png"), nrow=8, normalize=True, value_range=(-1, 1))
    if dataset is not None:
        reference, floor = held_out_pair(dataset, num)
        metrics.update(domain_fidelity(fake, reference, floor, dataset, labels=labels, feature_net_path=feature_net_path,
                                       kid_subset_size=kid_subset_size or min(1000, num)))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    return metrics
