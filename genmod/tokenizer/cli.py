"""``genmod eval-tokenizer TOKENIZER_DIR``: reconstruction metrics of a saved tokenizer."""
from __future__ import annotations

import argparse
import json
import os

import torch

from genmod.core.files import check_output_path
from genmod.tokenizers_vq.cache import check_modality, check_tokenizer_arguments
from genmod.tokenizers_vq.folders import tokenizer_and_dataset

from .evaluation import evaluate_tokenizer, load_eval_dataset

__all__ = ["main_eval_tokenizer"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genmod eval-tokenizer", description=evaluate_tokenizer.__doc__.split("\n")[0])
    parser.add_argument("tokenizer_dir")
    parser.add_argument("--dataset", default=None, help="default: the dataset of the run's train_config.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=None, help="default: TOKENIZER_DIR/../eval")
    parser.add_argument("--no-lpips", dest="lpips", action="store_false")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="audio: skip the silence / mu-law reference codecs")
    parser.add_argument("--duration", type=float, default=None,
                        help="audio: pad/crop clips to this many seconds (default: each clip at its own length)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main_eval_tokenizer(argv: list[str]) -> int:
    """``genmod eval-tokenizer TOKENIZER_DIR [--dataset NAME] [--split test] [--num_samples N] [--out DIR]``."""
    from genmod.tokenizers_vq.models import load_tokenizer

    args = _parser().parse_args(argv)
    check_tokenizer_arguments(args)
    model_dir, dataset_name = tokenizer_and_dataset(args.tokenizer_dir, args.dataset)
    out_dir = args.out or os.path.join(model_dir, "..", "eval")
    check_output_path(out_dir, folder=True)
    model = load_tokenizer(model_dir).to(args.device)
    dataset = load_eval_dataset(dataset_name, args.split, model.config.modality, args.duration)
    check_modality(dataset, model.config.modality, dataset_name)
    metrics = evaluate_tokenizer(model, dataset, out_dir, num_samples=args.num_samples,
                                 batch_size=args.batch_size, lpips=args.lpips, baselines=args.baselines)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}")
    return 0
