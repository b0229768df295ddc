"""What a checkpoint holds of the trainer, and how a run continues from one (docs/DESIGN.md §3).

:class:`ResumeMixin` is the save/resume half of :class:`~genmod.train.trainer.Trainer`: the state
dicts that :meth:`Trainer.save_checkpoint` writes (``trainer_state.json``, ``training_state.pt``) and
``_resume``, which restores weights, EMA, optimizer (re-aimed at this run's options), grad scaler,
family state, RNG, step and data position, and cuts ``metrics.jsonl`` back to the resumed step.
The file-level checkpoint I/O lives in :mod:`genmod.train.checkpoint`.

It reads the trainer's attributes: ``config``, ``family``, ``accelerator``, ``model``, ``ema``,
``optimizer``, ``lr_scheduler``, ``sampler``, ``rank``, ``world_size``, ``is_main``, ``metrics_file``.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from .checkpoint import (CheckpointError, find_checkpoint, get_rng_state, list_checkpoints, load_training_state,
                         load_weights, read_trainer_state, set_rng_state)
from .family import unwrap_model
from .integrity import find_resumable
from .optim import apply_optimizer_config
from .sharding import load_ema_shadow, load_model_state, shard_optimizer_state

__all__ = ["ResumeMixin"]

logger = logging.getLogger("genmod.train")


class ResumeMixin:
    """The trainer's checkpoint contents and resume (see the module docstring)."""

    def _trainer_state(self) -> dict:
        """Step, data position, batch layout, EMA count and the family / config classes (``trainer_state.json``)."""
        family_cls = type(self.family)
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "micro_step": self.step * self.config.grad_accum_steps,
            "samples_seen": self.step * self.config.grad_accum_steps * self.config.batch_size * self.world_size,
            "world_size": self.world_size, "batch_size": self.config.batch_size, "num_workers": self.config.num_workers,
            "distributed": "fsdp" if self.sharded else "ddp",
            "grad_accum_steps": self.config.grad_accum_steps,
            "ema_num_updates": self.ema.num_updates if self.ema is not None else 0,
            "family": getattr(self.family, "name", family_cls.__name__),
            "family_class": f"{family_cls.__module__}:{family_cls.__qualname__}",
            "config_class": f"{type(self.config).__module__}:{type(self.config).__qualname__}",
            "last_loss": self.last_loss,
        }

    def _training_state(self, optimizer_state: dict | None = None) -> dict:
        """Optimizer (``optimizer_state``: FSDP's gathered one), lr schedule, grad scaler, this process's RNG
        and the family's state (``training_state.pt``)."""
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "optimizer": optimizer_state if optimizer_state is not None else self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "rng": get_rng_state(),
            "family": self.family.state_dict(),
        }

    def _resume(self):
        """Continue from ``config.resume``: weights, optimizer, family state, RNG, step and data position."""
        config = self.config
        path = self._latest_intact() if config.resume == "latest" else find_checkpoint(config.output_dir, config.resume)
        if path is None:
            return
        state = read_trainer_state(path)
        if self.is_main:
            self._warn_config_changes(path)
        # 1) model and EMA weights
        self._load_weights(path, state)
        # 2) optimizer, schedule (re-aimed at this run's options), grad scaler
        training_state = load_training_state(path)
        self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, training_state["optimizer"]))
        self.lr_scheduler.load_state_dict(training_state["lr_scheduler"])
        self._apply_optimizer_config()
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and training_state.get("grad_scaler") is not None:
            scaler.load_state_dict(training_state["grad_scaler"])
        # 3) family state, then RNG: rebuilding a family part (a GAN discriminator) must not draw from
        #    the restored RNG
        self.family.load_state_dict(training_state.get("family") or {}, device=self.accelerator.device)
        rank_rng = os.path.join(path, f"rng_rank{self.rank}.pt")
        if self.rank > 0 and os.path.isfile(rank_rng):
            set_rng_state(torch.load(rank_rng, map_location="cpu", weights_only=True))
        else:
            set_rng_state(training_state["rng"])
        # 4) step and data position
        self.step = state["step"]
        self.family.set_step(self.step)
        self._restore_position(path, state)
        self.last_loss = state.get("last_loss", float("nan"))
        self.last_checkpoint = path
        if self.is_main:
            self._truncate_metrics(self.step)
            logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, self.step, self.epoch,
                        self.batch_in_epoch)

    def _latest_intact(self) -> str | None:
        """``resume=latest``: the newest intact checkpoint (one warning line per broken newer one); None: none yet."""
        output_dir = self.config.output_dir
        if not list_checkpoints(output_dir):  # no run yet, or killed while writing its first checkpoint
            if self.is_main:
                logger.warning("resume=latest: no checkpoint in %s yet, starting from step 0", output_dir)
            return None
        path, broken = find_resumable(output_dir)
        if self.is_main:
            for reason in broken:
                logger.warning("resume=latest: skipping a broken checkpoint: %s; resuming from %s", reason, path)
        return path

    def _load_weights(self, path: str, state: dict) -> None:
        """The checkpoint's model weights and EMA shadow (the model's when no ``ema/`` was saved)."""
        model = unwrap_model(self.model)
        try:
            load_model_state(model, load_weights(os.path.join(path, "model")))  # FSDP: each rank its rows
            if self.ema is not None:
                ema_dir = os.path.join(path, "ema")
                source = ema_dir if os.path.isdir(ema_dir) else os.path.join(path, "model")
                load_ema_shadow(self.ema, load_weights(source), where=source)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not match the model ({(str(err).splitlines() or [''])[0]})") from None
        if self.ema is not None:
            self.ema.num_updates = int(state.get("ema_num_updates", state["step"]))

    def _restore_position(self, path: str, state: dict) -> None:
        """Epoch and batch to continue from; with another batch layout, from the number of samples seen."""
        config = self.config
        same_layout = (state.get("world_size") == self.world_size and state.get("batch_size") == config.batch_size
                       and state.get("grad_accum_steps") == config.grad_accum_steps
                       # a streaming dataset's order also depends on the workers (genmod.data.streaming)
                       and (not hasattr(self.sampler, "num_workers") or state.get("num_workers") == config.num_workers))
        if same_layout:
            self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
            return
        micro_batches = state["samples_seen"] // (config.batch_size * self.world_size)
        self.epoch, self.batch_in_epoch = divmod(micro_batches, self.sampler.batches_per_epoch)
        if self.is_main:
            logger.warning("%s: saved with another batch layout; data position recomputed from samples seen", path)

    def _apply_optimizer_config(self) -> None:
        """After a resume, the optimizer and schedule follow *this* run's config (:func:`apply_optimizer_config`)."""
        apply_optimizer_config(self.optimizer, self.lr_scheduler, self.config)

    def _warn_config_changes(self, path: str) -> None:
        """Log the fields that differ from the checkpoint's config (legitimate for max_steps, lr, ...)."""
        from .config import config_to_dict

        try:
            with open(os.path.join(path, "train_config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        ignored = {"resume", "output_dir", "time_budget_minutes"}
        changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in config_to_dict(self.config).items()
                   if k in saved and k not in ignored and saved[k] != v]
        if changed:
            logger.warning("resuming %s with changed options: %s", path, "; ".join(changed))
        if self.ema is not None and self.ema.bias_correction and "ema_bias_correction" not in saved:
            logger.warning("%s: saved before EMA bias correction; its EMA (which still holds a share of the initial "
                           "weights) continues bias-corrected from here (--no-ema_bias_correction keeps the old "
                           "constant decay)", path)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines after ``step`` (written by the killed run) so the file reads as one run."""
        if not os.path.isfile(self.metrics_file):
            return
        kept = []
        with open(self.metrics_file) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError):
                    continue  # a line cut by the kill
        tmp = self.metrics_file + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.metrics_file)
