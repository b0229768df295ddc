"""Entry points of ``genmod eval`` and ``genmod eval-folder`` (wired in ``genmod/cli.py``).

``eval_pipeline`` loads a checkpoint or pipeline folder the way ``genmod sample`` does and runs the
metrics of :mod:`genmod.evals.report` on its samples; this is the one module of ``genmod.evals`` that
stands above the generators (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from genmod.core.arguments import check_name
from genmod.core.files import check_output_path
from genmod.evals.generator_adapter import generate_samples, pipeline_sampler
from genmod.evals.held_out import held_out_report, pipeline_num_classes
from genmod.evals.report import (DEFAULT_METRICS, eval_folders, evaluate_images, markdown_table, plot_sweep, real_floor,
                                 resolve_spaces, versions, write_report)

METRIC_CHOICES = ("fid", "isc", "kid", "prc", "pppr", "dc")
# nearest-neighbour metrics need more samples than their k (torch-fidelity prc k=3, P-precision k=4, D/C k=5)
NEIGHBOURS = {"prc": 3, "pppr": 4, "dc": 5}


def load_pipeline_for_eval(path: str):
    """A pipeline from a pipeline folder or a training checkpoint (the ``genmod sample`` loader)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or pipeline folder")
    try:
        from genmod.sampling import load_for_sampling
    except ImportError:
        load_for_sampling = None
    if load_for_sampling is not None:
        return load_for_sampling(path)
    try:
        from genmod.pipelines import load_pipeline
    except ImportError:
        raise ValueError("genmod.pipelines.load_pipeline is not available in this install; cannot load "
                         f"{path} (evaluate a folder of samples with eval_folders instead)") from None
    return load_pipeline(path)


def dataset_of(path: str) -> str | None:
    """The dataset name recorded in a run's ``train_config.json`` (searched upwards from ``path``)."""
    folder = os.path.abspath(path)
    for _ in range(4):
        config = os.path.join(folder, "train_config.json")
        if os.path.isfile(config):
            from genmod.core.files import read_json_object

            dataset = read_json_object(config).get("dataset")
            return dataset if isinstance(dataset, str) else None
        folder = os.path.dirname(folder)
    return None


def configure_scheduler(pipe, **options) -> None:
    """Set scheduler config fields (``solver``, ``schedule``, ``rtol``, ``atol``; None = keep) via ``from_config``."""
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return
    scheduler = getattr(pipe, "scheduler", None)
    for key in given:
        if scheduler is None or key not in scheduler.config:
            raise ValueError(f"--{key}: {type(pipe).__name__} has no scheduler with a {key} setting")
    pipe.scheduler = type(scheduler).from_config(scheduler.config, **given)


def eval_pipeline(path: str, metrics=DEFAULT_METRICS, num_samples: int = 1000, num_inference_steps=20,
                  guidance_scale=1.0, *,
                  dataset: str | None = None, features=("domain", "inception"), seed: int = 0, batch_size: int = 64,
                  out_dir: str | None = None, feature_net_path: str | None = None,
                  inception_weights: str | None = None, save_samples: bool = True, pipeline=None,
                  schedule=None, scheduler_options: dict | None = None) -> dict:
    """Evaluate a checkpoint or pipeline folder: ``num_samples`` class-balanced samples per setting.

    ``num_inference_steps``, ``guidance_scale`` and ``schedule`` (a flow time grid: uniform, shifted, karras,
    cosine, ays) may be lists: every combination is evaluated (a sweep) and a PNG of FID/KID against the swept
    steps or guidance is written. ``scheduler_options`` (``solver``, ``rtol``, ``atol``) are set on the scheduler.
    Writes ``report.json`` / ``report.md`` (and ``samples_*.npz``) into ``out_dir`` (default ``<path>/eval``).
    Returns the report dict.
    """
    pipe = pipeline if pipeline is not None else load_pipeline_for_eval(path)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    configure_scheduler(pipe, **(scheduler_options or {}))
    dataset = dataset or dataset_of(path)
    if dataset is None and "domain" in features:
        raise ValueError(f"dataset: no train_config.json with a dataset found near {path}; pass --dataset")
    out_dir = out_dir or os.path.join(path, "eval")
    steps_list = list(num_inference_steps) if isinstance(num_inference_steps, (list, tuple)) else [num_inference_steps]
    guidance_list = list(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else [guidance_scale]
    schedule_list = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule]
    spaces = resolve_spaces(features, dataset, feature_net_path, inception_weights)
    reference, reference_name, floor, floor_name = real_floor(dataset, num_samples, seed) if dataset else (None,) * 4
    context = dict(pipe=pipe, path=path, dataset=dataset, features=features, metrics=metrics, num_samples=num_samples,
                   seed=seed, batch_size=batch_size, spaces=spaces, real=(reference, reference_name, floor, floor_name),
                   feature_net_path=feature_net_path, out_dir=out_dir if save_samples else None)
    runs = []
    for grid_name in schedule_list:
        configure_scheduler(pipe, schedule=grid_name)
        for num_steps in steps_list:
            for scale in guidance_list:
                runs.append(_evaluate_setting(num_steps, scale, **context))
    report = {"versions": versions(), "runs": runs}
    report["markdown"] = "\n".join(markdown_table(run, _title(run)) for run in runs)
    if len(steps_list) > 1 or len(guidance_list) > 1:
        parameter = "steps" if len(steps_list) > 1 else "guidance"
        name = f"sweep_{parameter}.png" if len(schedule_list) == 1 else f"sweep_{parameter}_{schedule_list[-1]}.png"
        report["plot"] = plot_sweep(runs[-len(steps_list) * len(guidance_list):], parameter, os.path.join(out_dir, name))
    report["files"] = write_report(report, out_dir)
    return report


def _title(run) -> str:
    settings = run["settings"]
    grid = f", schedule={settings['schedule']}" if settings.get("schedule") else ""
    return f"{settings['dataset']}: steps={settings['steps']}, guidance={settings['guidance']}{grid}"


def _evaluate_setting(num_steps, scale, *, pipe, path, dataset, features, metrics, num_samples, seed, batch_size, spaces,
                      real, feature_net_path, out_dir) -> dict:
    """Sample and score one (steps, guidance) setting of the pipeline as its scheduler stands."""
    reference, reference_name, floor, floor_name = real
    sampler = pipeline_sampler(pipe, num_inference_steps=num_steps, guidance_scale=scale)
    fake, labels = generate_samples(sampler, num_samples, num_classes=pipeline_num_classes(pipe), seed=seed,
                                    batch_size=batch_size, desc=f"sampling steps={num_steps} w={scale}")
    run = evaluate_images(fake, reference, spaces, metrics=metrics, real_cache=reference_name,
                          floor_uint8=floor, floor_cache=floor_name)
    scheduler_config = getattr(getattr(pipe, "scheduler", None), "config", {})
    run["settings"] = {"path": os.path.abspath(path), "dataset": dataset, "steps": num_steps, "guidance": scale,
                       "num_samples": num_samples, "seed": seed, "metrics": list(metrics),
                       "solver": scheduler_config.get("solver"), "schedule": scheduler_config.get("schedule")}
    if getattr(getattr(pipe, "scheduler", None), "is_adaptive", False):
        run["settings"]["adaptive_nfe_last_batch"] = pipe.scheduler.last_nfe
    if labels is not None and "domain" in features:
        from genmod.evals.feature_net import classifier_accuracy, get_feature_net

        run["classifier_accuracy"] = classifier_accuracy(get_feature_net(dataset, feature_net_path), fake, labels)
    if out_dir is not None:
        from genmod.evals.generator_adapter import save_npz

        grid = f"_{run['settings']['schedule']}" if run["settings"]["schedule"] not in (None, "uniform") else ""
        save_npz(os.path.join(out_dir, f"samples_steps{num_steps}_w{scale}{grid}.npz"), fake, labels)
    return run


def _metrics(text: str) -> list[str]:
    items = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in items if m not in METRIC_CHOICES]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {unknown}; choose from {','.join(METRIC_CHOICES)}")
    return items


def _features(text: str) -> list[str]:
    items = [f.strip() for f in text.split(",") if f.strip()]
    if not items or any(f not in ("domain", "inception") for f in items):
        raise argparse.ArgumentTypeError(f"--features: expected a comma list of domain,inception, got {text!r}")
    return items


def _names(text: str):
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a name or a comma list of names, got {text!r}")
    return items if len(items) > 1 else items[0]


def _numbers(cast):
    def parse(text: str):
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got {text!r}")
        return values if len(values) > 1 else values[0]

    return parse


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def check_eval_arguments(args, metrics) -> None:
    """One-line errors before anything loads: counts, finite guidance, enough samples for the metrics'
    nearest neighbours, a known dataset, existing feature-net / Inception files, a writable ``--out``."""
    from genmod.core.arguments import check_count, check_finite
    from genmod.core.files import check_output_path
    for steps in _as_list(getattr(args, "num_inference_steps", None)):
        check_count("--num-inference-steps/--steps", steps)
    for scale in _as_list(getattr(args, "guidance_scale", None)):
        check_finite("--guidance-scale/--guidance", scale)
    check_count("--batch-size", getattr(args, "batch_size", None))
    needed = max([1] + [NEIGHBOURS[m] for m in metrics if m in NEIGHBOURS]) + 1
    check_count(f"--num-samples (the metrics {','.join(metrics)} need)", getattr(args, "num_samples", None), needed)
    if args.dataset is not None and not args.dataset.strip():  # other names: a dataset or a registered feature net
        raise ValueError(f"--dataset: must be a dataset name, got {args.dataset!r}")
    for flag, path in (("--feature-net", args.feature_net), ("--inception-weights", args.inception_weights)):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{flag}: no such file or folder {path!r}")
    if args.out is not None:
        check_output_path(args.out, folder=True)


def main_eval(argv: list[str] | None = None) -> int:
    """``genmod eval CHECKPOINT_OR_PIPELINE --metrics fid,isc,kid,prc --num-samples N --num-inference-steps S --guidance-scale G``"""
    parser = argparse.ArgumentParser(prog="genmod eval", description="FID / IS / KID / precision-recall of a model, "
                                     "next to the real-vs-real floor at the same N. Comma lists of --num-inference-steps "
                                     "or --guidance-scale make a sweep (and a PNG plot).")
    parser.add_argument("path", help="pipeline folder (model_index.json) or training checkpoint")
    parser.add_argument("--metrics", type=_metrics, default=list(DEFAULT_METRICS),
                        help="comma list of fid,isc,kid,prc,pppr,dc (default: all)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-inference-steps", "--steps", type=_numbers(int), default=None,
                        help="solver steps, or a comma list to sweep (default: the pipeline's own)")
    parser.add_argument("--guidance-scale", "--guidance", type=_numbers(float), default=None,
                        help="guidance scale w, or a comma list (default: the pipeline's own)")
    parser.add_argument("--solver", default=None, help="flow: ODE solver (euler, heun, ..., or adaptive dopri5 ...)")
    parser.add_argument("--schedule", type=_names, default=None,
                        help="flow: time grid uniform, shifted, karras, cosine, ays, or a comma list to compare")
    parser.add_argument("--rtol", type=float, default=None, help="flow: adaptive solver relative tolerance")
    parser.add_argument("--atol", type=float, default=None, help="flow: adaptive solver absolute tolerance")
    parser.add_argument("--dataset", default=None, help="reference dataset (default: from train_config.json)")
    parser.add_argument("--features", type=_features, default=["domain", "inception"],
                        help="feature spaces: domain,inception (default both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="output folder (default PATH/eval)")
    parser.add_argument("--feature-net", default=None, help="domain feature net folder (default: the cache's)")
    parser.add_argument("--inception-weights", default=None, help="InceptionV3 weights file")
    parser.add_argument("--held-out", action="store_true",
                        help="the held-out protocol instead (class-cycled samples at the pipeline's settings, domain "
                        "FID/KID against the first N test images, floor = the next N; as genmod train var --eval_samples)")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2")
    if not os.path.exists(args.path):
        raise FileNotFoundError(f"{args.path}: no such checkpoint or pipeline folder")
    check_eval_arguments(args, [] if args.held_out else args.metrics)
    check_output_path(args.out or os.path.join(args.path, "eval"), folder=True)
    if args.held_out:
        return _main_held_out(args)
    report = eval_pipeline(args.path, args.metrics, args.num_samples, args.num_inference_steps, args.guidance_scale,
                           dataset=args.dataset,
                           features=args.features, seed=args.seed, batch_size=args.batch_size, out_dir=args.out,
                           feature_net_path=args.feature_net, inception_weights=args.inception_weights,
                           schedule=args.schedule,
                           scheduler_options={"solver": args.solver, "rtol": args.rtol, "atol": args.atol})
    print(report["markdown"])
    print(f"wrote {report['files']['json']}" + (f" and {report['plot']}" if "plot" in report else ""))
    return 0


def main_eval_folder(argv: list[str] | None = None) -> int:
    """``genmod eval-folder GENERATED REAL``: folders of images or ADM .npz files."""
    parser = argparse.ArgumentParser(prog="genmod eval-folder", description="metrics between generated and real "
                                     "images (folders of PNG/JPEG or ADM-style .npz)")
    parser.add_argument("generated")
    parser.add_argument("real")
    parser.add_argument("--metrics", type=_metrics, default=list(DEFAULT_METRICS))
    parser.add_argument("--features", type=_features, default=["inception"])
    parser.add_argument("--dataset", default=None, help="dataset whose domain feature net to use (for --features domain)")
    parser.add_argument("--out", default=None, help="write report.json / report.md here")
    parser.add_argument("--feature-net", default=None)
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--real-cache-name", default=None, help="cache the real set's features under this name")
    args = parser.parse_args(argv)
    check_eval_arguments(args, args.metrics)
    if args.real_cache_name is not None:
        check_name("--real-cache-name", args.real_cache_name)
    report = eval_folders(args.generated, args.real, args.metrics, features=args.features, dataset=args.dataset,
                          out_dir=args.out, feature_net_path=args.feature_net, inception_weights=args.inception_weights,
                          real_cache=args.real_cache_name)
    print(report["markdown"])
    return 0


def _main_held_out(args) -> int:
    """``genmod eval PATH --held-out --num-samples N [--dataset D] [--out DIR]``: :func:`held_out_report`."""
    pipe = load_pipeline_for_eval(args.path)
    pipe.set_progress_bar_config(disable=True)
    out_dir = args.out or os.path.join(args.path, "eval")
    metrics = held_out_report(pipe, args.num_samples, out_dir, args.dataset or dataset_of(args.path),
                              feature_net_path=args.feature_net)
    print(json.dumps(metrics, indent=2, default=str))
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}")
    return 0
