"""The run's logs: one ``OUTPUT/metrics.jsonl`` line per optimizer step, the progress bar and
TensorBoard scalars (main process), and :func:`read_metrics` to read the file back.

:class:`LogMixin` reads the trainer's ``config``, ``step``, ``is_main``, ``metrics_file`` and ``writer``.
"""

from __future__ import annotations

import json
import os

__all__ = ["LogMixin", "read_metrics"]


class LogMixin:
    """The trainer's progress bar, ``metrics.jsonl`` and TensorBoard writes."""

    def _open_logs(self):
        """The progress bar (main process) and ``metrics.jsonl`` opened for appending (main process)."""
        from tqdm.auto import tqdm

        progress = tqdm(total=self.config.max_steps, initial=self.step, desc="train", disable=not self.is_main,
                        dynamic_ncols=True)
        metrics_out = open(self.metrics_file, "a") if self.is_main else None
        return progress, metrics_out

    def _close_logs(self, progress, metrics_out) -> None:
        """Close the progress bar, ``metrics.jsonl`` and the TensorBoard writer."""
        progress.close()
        if metrics_out is not None:
            metrics_out.close()
        if self.writer is not None:
            self.writer.close()

    def _log(self, metrics: dict, progress, metrics_out) -> None:
        """Main process: a ``metrics.jsonl`` line, the progress bar and TensorBoard every ``log_every``."""
        metrics_out.write(json.dumps(metrics) + "\n")
        metrics_out.flush()
        progress.update(1)
        log_every = self.config.log_every
        if log_every and (self.step % log_every == 0 or self.step == 1):
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            if self.writer is not None:
                for key, value in metrics.items():
                    if key != "step":
                        self.writer.add_scalar(f"train/{key}", value, self.step)


def read_metrics(output_dir: str) -> list[dict]:
    """The per-step metrics a run appended to ``OUTPUT/metrics.jsonl``."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
