"""Samples -> numbers, stated honestly: N, the real-vs-real floor at the same N, KID beside FID.

:func:`evaluate_images` is the core: generated uint8 images against real ones in one or more
feature spaces ("domain": the dataset's trained classifier, :mod:`genmod.evals.feature_net`; "inception":
the standard FID InceptionV3, :mod:`genmod.evals.inception`). torch-fidelity computes FID / KID / IS /
improved precision-recall (its input and feature caches are used, so reference features are
computed once); P-precision/P-recall and density/coverage are computed on the same cached features.
When a second real set is given, the same numbers for real-vs-real at the same N are the floor
a model is compared against.

:func:`eval_folders` (and ``eval_pipeline`` in :mod:`genmod.evals.cli`) build the inputs, and write
``report.json`` (every number, settings, versions), ``report.md`` (a short table) and, for sweeps, a PNG
plot. The held-out domain FID / KID of a class-conditional pipeline is :mod:`genmod.evals.held_out`.
"""

from __future__ import annotations

import json
import os
import platform
import uuid

import torch

from genmod.evals.generator_adapter import SampleDataset, to_uint8
from genmod.evals.metrics import density_coverage, fidelity_metrics, p_precision_recall
from genmod.evals.paths import fidelity_cache_dir

TORCH_FIDELITY_METRICS = ("fid", "isc", "kid", "prc")
FEATURE_METRICS = ("pppr", "dc")
DEFAULT_METRICS = ("fid", "isc", "kid", "prc", "pppr", "dc")
KEY_NAMES = {"frechet_inception_distance": "fid", "inception_score_mean": "isc", "inception_score_std": "isc_std",
             "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
             "precision": "precision", "recall": "recall", "f_score": "f_score"}


def versions() -> dict:
    import diffusers
    import numpy
    import torch_fidelity

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
           "numpy": numpy.__version__, "diffusers": diffusers.__version__}
    try:
        import genmod

        out["genmod"] = genmod.__version__
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------------------
# feature spaces


class FeatureSpace:
    """A named torch-fidelity extractor with what a report says about it."""

    def __init__(self, key: str, extractor: str, rgb: bool, layer: str, description: dict, has_logits: bool,
                 net=None):
        self.key, self.extractor, self.rgb, self.layer = key, extractor, rgb, layer
        self.description, self.has_logits = description, has_logits
        self.net = net  # the domain classifier behind a "domain" space (classifier accuracy), else None


def domain_space(dataset: str, feature_net_path: str | None = None) -> FeatureSpace:
    from genmod.evals.feature_net import get_feature_net, register_feature_net

    net = get_feature_net(dataset, feature_net_path)
    return FeatureSpace("domain", register_feature_net(net), rgb=False, layer="feat",
                        description={"kind": "domain classifier", **net.describe()}, has_logits=True, net=net)


def inception_space(weights_path: str | None = None) -> FeatureSpace:
    from genmod.evals import inception
    from genmod.core.files import file_sha256

    path = inception.resolve_inception_weights(weights_path)
    logits = inception.has_logits(inception.load_state_dict_file(path))
    description = {"kind": "InceptionV3 (TF inception-2015-12-05)", "weights": path,
                   "sha256": file_sha256(path)}
    if not logits:
        description["isc"] = "unavailable: these weights have no logits layer (fid-helper conversion)"
    return FeatureSpace("inception", inception.register_inception(path), rgb=True, layer="2048",
                        description=description, has_logits=logits)


def resolve_spaces(features, dataset: str | None, feature_net_path=None, inception_weights=None) -> list[FeatureSpace]:
    spaces = []
    for name in features:
        if name == "domain":
            if dataset is None:
                raise ValueError("features: 'domain' needs a dataset name (--dataset)")
            spaces.append(domain_space(dataset, feature_net_path))
        elif name == "inception":
            spaces.append(inception_space(inception_weights))
        else:
            raise ValueError(f"features: unknown feature space {name!r}; use 'domain' and/or 'inception'")
    return spaces


# ------------------------------------------------------------------------------------------------
# the core


def _cached_features(cache_name: str, space: FeatureSpace) -> torch.Tensor:
    path = os.path.join(fidelity_cache_dir(), f"{cache_name}-{space.extractor}-features-{space.layer}.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


def _drop_cache(cache_name: str) -> None:
    root = fidelity_cache_dir()
    for name in os.listdir(root):
        if name.startswith(cache_name + "-"):
            os.remove(os.path.join(root, name))


def space_metrics(fake: SampleDataset, real: SampleDataset, space: FeatureSpace, metrics, *, real_cache: str,
                  fake_cache: str | None = None, kid_subset_size: int | None = None) -> dict:
    """All requested metrics of ``fake`` against ``real`` in one feature space. ``real_cache`` names
    the reference's cache entry; ``fake_cache`` keeps the fakes' features too (e.g. a second real set).
    ``kid_subset_size`` defaults to half the smaller set, at most 1000."""
    wanted = [m for m in metrics if m in TORCH_FIDELITY_METRICS]
    # KID always stands beside FID (unbiased at small N); features get cached so PP/PR and D/C reuse them
    wanted = sorted(set(wanted) | {"fid", "kid"}, key=TORCH_FIDELITY_METRICS.index)
    out = {}
    if "isc" in wanted and not space.has_logits:
        wanted.remove("isc")
        out["isc"] = None
    temporary = fake_cache is None
    fake_cache = fake_cache or f"tmp-{uuid.uuid4().hex}"
    kid_subset = kid_subset_size or max(2, min(1000, len(fake) // 2, len(real) // 2))  # below N: the spread means something
    try:
        raw = fidelity_metrics(fake, real, metrics=wanted, feature_extractor=space.extractor, cache_name1=fake_cache,
                               cache_name2=real_cache, kid_subset_size=kid_subset)
        out.update({KEY_NAMES[k]: v for k, v in raw.items() if k in KEY_NAMES})
        if any(m in metrics for m in FEATURE_METRICS):
            fake_features, real_features = _cached_features(fake_cache, space), _cached_features(real_cache, space)
            if "pppr" in metrics:
                out.update(p_precision_recall(real_features, fake_features))
            if "dc" in metrics:
                out.update(density_coverage(real_features, fake_features))
    finally:
        if temporary:
            _drop_cache(fake_cache)
    out["kid_subset_size"] = kid_subset
    return out


def evaluate_images(fake_uint8: torch.Tensor, real_uint8: torch.Tensor, spaces: list[FeatureSpace], *,
                    metrics=DEFAULT_METRICS, real_cache: str, floor_uint8: torch.Tensor | None = None,
                    floor_cache: str | None = None, fake_cache: str | None = None,
                    kid_subset_size: int | None = None) -> dict:
    """Metrics of generated vs real images per feature space, and the real-vs-real floor at the same N."""
    result = {"num_fake": len(fake_uint8), "num_real": len(real_uint8), "spaces": {}}
    for space in spaces:
        entry = {"feature_extractor": space.description,
                 "model": space_metrics(SampleDataset(fake_uint8, rgb=space.rgb), SampleDataset(real_uint8, rgb=space.rgb),
                                        space, metrics, real_cache=real_cache, fake_cache=fake_cache,
                                        kid_subset_size=kid_subset_size)}
        if floor_uint8 is not None:
            entry["real_vs_real"] = space_metrics(SampleDataset(floor_uint8, rgb=space.rgb),
                                                  SampleDataset(real_uint8, rgb=space.rgb), space, metrics,
                                                  real_cache=real_cache, fake_cache=floor_cache,
                                                  kid_subset_size=kid_subset_size)
            entry["real_vs_real"]["num"] = len(floor_uint8)
        result["spaces"][space.key] = entry
    return result


# ------------------------------------------------------------------------------------------------
# real data


def real_images(dataset: str, split: str, num: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``num`` seeded random images of a dataset split as uint8, and a cache name that identifies them."""
    from tqdm.auto import tqdm

    from genmod.data import get_dataset

    data = get_dataset(dataset, split=split)
    if num > len(data):
        raise ValueError(f"num_samples: {dataset} {split} has only {len(data)} images, asked for {num}")
    indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    first = data[indices[0]]
    if "image" not in first:
        raise ValueError(f"dataset: {dataset} items have no 'image' field (keys {sorted(first)})")
    images = torch.stack([data[i]["image"] for i in tqdm(indices, desc=f"{dataset} {split}", leave=False)])
    return to_uint8(images), f"{dataset}-{split}-n{num}-s{seed}"


def real_floor(dataset: str, num: int, seed: int = 0):
    """Reference (train) and floor (test) real sets of the same size."""
    reference, reference_name = real_images(dataset, "train", num, seed)
    floor, floor_name = real_images(dataset, "test", num, seed + 1)
    return reference, reference_name, floor, floor_name


# ------------------------------------------------------------------------------------------------
# tables, files, plots


ROWS = [("fid", "FID"), ("kid", "KID"), ("isc", "IS"), ("precision", "precision"), ("recall", "recall"),
        ("p_precision", "P-precision"), ("p_recall", "P-recall"), ("density", "density"), ("coverage", "coverage")]


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(result: dict, title: str = "") -> str:
    """One table per run: rows are metrics, columns model / real-vs-real per feature space."""
    spaces = result["spaces"]
    header, rule = ["metric"], ["---"]
    for key, entry in spaces.items():
        header.append(f"{key}: model")
        rule.append("---")
        if "real_vs_real" in entry:
            header.append(f"{key}: real-vs-real")
            rule.append("---")
    lines = ([f"### {title}", ""] if title else []) + [
        f"N = {result['num_fake']} generated vs {result['num_real']} real (FID is biased at small N: compare "
        f"with the real-vs-real column at the same N; KID is unbiased).", "",
        "| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for key, label in ROWS:
        if not any(key in entry["model"] for entry in spaces.values()):
            continue
        cells = [label]
        for entry in spaces.values():
            model = entry["model"]
            value = _fmt(model.get(key))
            if key in ("kid", "isc") and model.get(key + "_std") is not None:
                value += f" ± {model[key + '_std']:.2g}"
            cells.append(value)
            if "real_vs_real" in entry:
                cells.append(_fmt(entry["real_vs_real"].get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for key, entry in spaces.items():
        fe = entry["feature_extractor"]
        if fe.get("kind") == "domain classifier":
            notes.append(f"{key}: classifier for {fe['dataset']}, test accuracy {fe['test_accuracy']:.4f}, "
                         f"sha256 {fe['sha256'][:16]}")
        else:
            notes.append(f"{key}: {fe['kind']}, weights sha256 {fe['sha256'][:16]}" + (f"; IS {fe['isc']}" if "isc" in fe else ""))
    if "classifier_accuracy" in result:
        notes.append(f"domain-classifier accuracy of generated samples against their class labels: "
                     f"{result['classifier_accuracy']:.4f}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def write_report(result: dict, out_dir: str, title: str = "") -> dict:
    from genmod.core.files import atomic_write

    markdown = result.get("markdown") or markdown_table(result, title)
    with atomic_write(os.path.join(out_dir, "report.json")) as f:  # each file whole or not at all
        json.dump(result, f, indent=2, default=str)
    with atomic_write(os.path.join(out_dir, "report.md")) as f:
        f.write(markdown)
    return {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md")}


def plot_sweep(runs: list[dict], parameter: str, path: str) -> str:
    """FID (and KID) against the swept parameter, one line per feature space, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = list(runs[0]["spaces"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [run["settings"][parameter] for run in runs]
    for axis, metric in zip(axes, ("fid", "kid")):
        for key in spaces:
            ys = [run["spaces"][key]["model"].get(metric) for run in runs]
            line = axis.plot(xs, ys, marker="o", label=key)[0]
            floor = runs[0]["spaces"][key].get("real_vs_real", {}).get(metric)
            if floor is not None:
                axis.axhline(floor, linestyle="--", color=line.get_color(), label=f"{key} real-vs-real")
        axis.set_xlabel(parameter)
        axis.set_ylabel(metric.upper())
        axis.set_yscale("log" if metric == "fid" else "linear")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"N = {runs[0]['num_fake']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# folders


def _load_image_input(path: str, channels: int | None = None) -> torch.Tensor:
    from genmod.evals.generator_adapter import load_npz, load_png_folder

    if os.path.isfile(path) and path.endswith(".npz"):
        return load_npz(path)[0]
    return load_png_folder(path, channels)


def eval_folders(generated: str, real: str, metrics=DEFAULT_METRICS, *, features=("inception",),
                 dataset: str | None = None, out_dir: str | None = None, feature_net_path: str | None = None,
                 inception_weights: str | None = None, real_cache: str | None = None) -> dict:
    """Metrics between two image sets (folders of PNG/JPEG, or ADM ``.npz``): ``generated`` vs ``real``.

    ``features`` "inception" and/or "domain" (needs ``dataset``). ``real_cache`` names a cache entry
    for the real set's features (reuse across calls); by default the real set is not cached.
    """
    spaces = resolve_spaces(features, dataset, feature_net_path, inception_weights)
    fake, reference = _load_image_input(generated), _load_image_input(real)
    temporary = real_cache is None
    real_cache = real_cache or f"tmp-{uuid.uuid4().hex}"
    try:
        result = evaluate_images(fake, reference, spaces, metrics=metrics, real_cache=real_cache)
    finally:
        if temporary:
            _drop_cache(real_cache)
    result["settings"] = {"generated": os.path.abspath(generated), "real": os.path.abspath(real),
                          "dataset": dataset, "metrics": list(metrics), "features": list(features)}
    report = {"versions": versions(), "runs": [result], "markdown": markdown_table(result, "eval-folder")}
    if out_dir:
        report["files"] = write_report(report, out_dir)
    return report
