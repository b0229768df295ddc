"""Entry points of ``genmod eval`` and ``genmod eval-folder`` (wired in ``genmod/cli.py``)."""

from __future__ import annotations

import argparse

import json
import os

from evals.report import DEFAULT_METRICS, dataset_of, eval_folders, eval_pipeline, held_out_report, load_pipeline_for_eval

METRIC_CHOICES = ("fid", "isc", "kid", "prc", "pppr", "dc")


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


def _numbers(cast):
    def parse(text: str):
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got {text!r}") from None
        return values if len(values) > 1 else values[0]

    return parse


def main_eval(argv: list[str] | None = None) -> int:
    """``genmod eval CHECKPOINT_OR_PIPELINE --metrics fid,isc,kid,prc --num-samples N --steps S --guidance G``"""
    parser = argparse.ArgumentParser(prog="genmod eval", description="FID / IS / KID / precision-recall of a model, "
                                     "next to the real-vs-real floor at the same N. Comma lists of --steps or "
                                     "--guidance make a sweep (and a PNG plot).")
    parser.add_argument("path", help="pipeline folder (model_index.json) or training checkpoint")
    parser.add_argument("--metrics", type=_metrics, default=list(DEFAULT_METRICS),
                        help="comma list of fid,isc,kid,prc,pppr,dc (default: all)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=_numbers(int), default=20, help="solver steps, or a comma list to sweep")
    parser.add_argument("--guidance", type=_numbers(float), default=1.0, help="guidance scale w, or a comma list")
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
    if args.held_out:
        return _main_held_out(args)
    report = eval_pipeline(args.path, args.metrics, args.num_samples, args.steps, args.guidance, dataset=args.dataset,
                           features=args.features, seed=args.seed, batch_size=args.batch_size, out_dir=args.out,
                           feature_net_path=args.feature_net, inception_weights=args.inception_weights)
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
