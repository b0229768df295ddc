"""The run's logs: one ``OUTPUT/metrics.jsonl`` line per optimizer step, the progress bar and the
tracker's scalars (main process), and :func:`read_metrics` to read the file back.

Trackers are Accelerate's (``Accelerator(log_with=...)``, ``init_trackers``, ``log``;
https://huggingface.co/docs/accelerate/usage_guides/tracking), chosen by ``--report_to``:
``tensorboard`` (default) writes ``OUTPUT/logs/events.out.tfevents.*`` and the hyperparameters,
``wandb`` a run under ``OUTPUT/wandb/`` (``WANDB_MODE=offline`` works without a network; project
``$WANDB_PROJECT`` or ``genmod``), ``none`` nothing.

:class:`LogMixin` reads the trainer's ``accelerator``, ``config``, ``step``, ``is_main`` and
``metrics_file``, and sets ``writer`` (the TensorBoard ``SummaryWriter`` for previews, or None).
"""

from __future__ import annotations

import importlib.util
import json
import os

from .config import ConfigError, config_to_dict

__all__ = ["LogMixin", "read_metrics", "make_trackers"]


def make_trackers(config) -> list:
    """Accelerate tracker objects for ``config.trackers()``; a missing wandb is a one-line ``ConfigError``."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    for name in config.trackers():
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("logs", config.output_dir))  # OUTPUT/logs
        elif importlib.util.find_spec("wandb") is None:
            raise ConfigError("--report_to wandb: the wandb package is not installed (pip install 'genmod[wandb]')")
        else:
            run_name = os.path.basename(os.path.abspath(config.output_dir))
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", "genmod"), dir=config.output_dir,
                                         name=run_name))
    return trackers


def _hparams(config) -> dict:
    """The config as tracker hyperparameters (bool/int/float/str only; sequences comma-joined)."""
    out = {}
    for key, value in config_to_dict(config).items():
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[key] = "none" if value is None else value
    return out


class LogMixin:
    """The trainer's progress bar, ``metrics.jsonl`` and tracker writes."""

    def _start_trackers(self) -> None:
        """Start the trackers given to the Accelerator (main process) with the config as hyperparameters."""
        self.accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "genmod"), config=_hparams(self.config))
        self.writer = None
        if self.is_main and "tensorboard" in self.config.trackers():
            self.writer = self.accelerator.get_tracker("tensorboard", unwrap=True)

    def _open_logs(self):
        """The progress bar (main process) and ``metrics.jsonl`` opened for appending (main process)."""
        from tqdm.auto import tqdm

        progress = tqdm(total=self.config.max_steps, initial=self.step, desc="train", disable=not self.is_main,
                        dynamic_ncols=True)
        metrics_out = open(self.metrics_file, "a") if self.is_main else None
        return progress, metrics_out

    def _close_logs(self, progress, metrics_out) -> None:
        """Close the progress bar and ``metrics.jsonl``; finish the trackers (also when training failed)."""
        progress.close()
        if metrics_out is not None:
            metrics_out.close()
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []  # end_training finishes them once only

    def _log(self, metrics: dict, progress, metrics_out) -> None:
        """Main process: a ``metrics.jsonl`` line, the progress bar and the trackers every ``log_every``."""
        metrics_out.write(json.dumps(metrics) + "\n")
        metrics_out.flush()
        progress.update(1)
        log_every = self.config.log_every
        if log_every and (self.step % log_every == 0 or self.step == 1):
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            self.accelerator.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=self.step)


def read_metrics(output_dir: str) -> list[dict]:
    """The per-step metrics a run appended to ``OUTPUT/metrics.jsonl``."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
