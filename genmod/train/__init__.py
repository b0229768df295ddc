"""The one trainer every family runs on (docs/DESIGN.md §3).

    from genmod.train import TrainConfig, Trainer, Family, register_family, parse_config

    config = parse_config(MyConfig, ["--max_steps", "200", "--cpu"])
    summary = Trainer(config, MyFamily(config), dataset).train()

``genmod train NAME [--field value ...]`` does the same for a registered family (:func:`run_family`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from genmod.presets import preset_files

from .batches import EpochBatchSampler, stable_seed
from .checkpoint import CheckpointError, find_checkpoint, list_checkpoints, load_weights, read_trainer_state
from .config import ConfigError, TrainConfig, load_config, save_config
from .ema import EMA
from .family import Family, get_family, register_family, registered_families, unwrap_model
from .flags import config_help, parse_config
from .logs import read_metrics
from .trainer import Trainer, TrainingDivergedError, TrainSummary

__all__ = [
    "TrainConfig", "ConfigError", "parse_config", "save_config", "load_config", "config_help",
    "Family", "register_family", "get_family", "registered_families", "unwrap_model",
    "EMA", "Trainer", "TrainSummary", "TrainingDivergedError", "EpochBatchSampler", "stable_seed", "read_metrics",
    "CheckpointError", "find_checkpoint", "list_checkpoints", "run_family", "pipeline_from_checkpoint",
    "load_family_from_checkpoint", "evaluate_family",
]


def run_family(name: str, argv: list[str]) -> TrainSummary:
    """``genmod train NAME ...``: parse the family's config from flags, train, evaluate, print paths.

    The family's per-step callbacks and ``time_budget_minutes`` act inside the trainer; its
    ``evaluate`` runs after training on the main process and lands in ``OUTPUT/eval/metrics.json``.
    """
    entry = get_family(name)
    config = parse_config(entry.config_class, argv, presets=preset_files(name))
    family = entry(config)
    try:
        summary = Trainer(config, family).train()
    except TrainingDivergedError as err:
        print(f"genmod train {name}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return summary
    _print_summary(name, summary)
    summary.evaluation = evaluate_family(family, summary)
    if summary.evaluation is not None:
        print(json.dumps(summary.evaluation, indent=2, default=str))
        print(f"  evaluation:  {os.path.join(family.eval_dir(), 'metrics.json')}")
    return summary


def evaluate_family(family: Family, summary: TrainSummary) -> Optional[dict]:
    """``family.evaluate(summary)`` with the run's step count and timing, written to ``OUTPUT/eval/metrics.json``."""
    metrics = family.evaluate(summary)
    if metrics is None:
        return None
    metrics = {"steps": summary.final_step, "last_loss": summary.last_loss, "pipeline": summary.pipeline,
               "stopped_early": summary.stopped_early, "train_wall_minutes": summary.train_wall_minutes,
               "train_cpu_minutes": summary.train_cpu_minutes, **metrics}
    os.makedirs(family.eval_dir(), exist_ok=True)
    with open(os.path.join(family.eval_dir(), "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    return metrics


def _print_summary(name: str, summary: TrainSummary) -> None:
    stopped = " (time budget spent)" if summary.stopped_early else ""
    print(f"trained {name} for {summary.final_step} steps{stopped} (last loss {summary.last_loss:.4f})")
    print(f"  checkpoint:  {summary.checkpoint}")
    if summary.final_model:
        print(f"  final model: {summary.final_model}")
    if summary.pipeline:
        print(f"  pipeline:    {summary.pipeline}")
    print(f"  metrics:     {summary.metrics_file}")


def load_family_from_checkpoint(path: str, use_ema: bool = True):
    """``(family, model)`` rebuilt from a checkpoint (or an output folder's latest) with its weights.

    The family comes from ``trainer_state.json`` (its class is imported by module path), the config
    from ``train_config.json``; the weights are the EMA ones when present and ``use_ema``.
    """
    import importlib

    from .config import resolve_config_class

    checkpoint = find_checkpoint(path, path)
    state = read_trainer_state(checkpoint)
    config_file = os.path.join(checkpoint, "train_config.json")
    config = load_config(resolve_config_class(config_file), config_file)
    family_class = state.get("family_class")
    if family_class:
        module, qualname = family_class.split(":", 1)
        factory = importlib.import_module(module)
        for part in qualname.split("."):
            factory = getattr(factory, part)
    else:
        factory = get_family(state["family"])
    family = factory(config)
    model = family.build_model()
    folder = os.path.join(checkpoint, "ema" if use_ema and os.path.isdir(os.path.join(checkpoint, "ema")) else "model")
    try:
        model.load_state_dict(load_weights(folder), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{folder}: weights do not match the model ({(str(err).splitlines() or [''])[0]})") from None
    return family, model.eval()


def pipeline_from_checkpoint(path: str, use_ema: bool = True):
    """The family's pipeline around a checkpoint's (EMA) model, for ``genmod sample CHECKPOINT``."""
    family, model = load_family_from_checkpoint(path, use_ema=use_ema)
    pipeline = family.build_pipeline(model)
    if pipeline is None:
        raise CheckpointError(f"{path}: family {type(family).__name__} builds no pipeline to sample with")
    return pipeline
