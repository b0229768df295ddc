"""The one trainer: a family's model, loss and sampler on ``accelerate.Accelerator``.

One optimizer step = ``grad_accum_steps`` micro-batches of ``batch_size`` samples on each process.
Everything that decides the numbers is a function of the config and the step, never of wall-clock
history, so a run killed at any time (SIGKILL included) and resumed with ``resume="latest"``
reproduces the uninterrupted run:

* data order: a permutation per epoch seeded by ``(seed, epoch)``; a global batch is a contiguous
  slice of it, split across processes; the position (epoch, batch) is checkpointed and the
  consumed batches of the current epoch are skipped on resume;
* training noise: the ``generator`` handed to ``family.loss`` is seeded by
  ``(seed, micro_step, rank)`` (the fix for resume drift found in diffusers-accelerate notes §4.3);
* model, EMA, optimizer, lr schedule, grad scaler and all RNG states are restored.

Multi-process: ``ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 script.py`` (gloo)
or ``accelerate launch`` on GPUs. When the environment announces several processes but Accelerate
sees one (plain ``torchrun`` on CPU, ``accelerate launch --cpu --num_processes 2``), the processes
would train independently into the same folder; the trainer refuses to start. ``--distributed fsdp``
shards the model per transformer block instead of replicating it (:mod:`~genmod.train.sharding`).

This file holds the build and the loop; the rest of the trainer lives beside it: data order and
seeds in :mod:`~genmod.train.batches`, optimizer and lr schedule in :mod:`~genmod.train.optim`,
checkpoint contents and resume in :mod:`~genmod.train.resume` (file I/O in
:mod:`~genmod.train.checkpoint`), previews and export in :mod:`~genmod.train.export`, logs in
:mod:`~genmod.train.logs`.
"""


from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .batches import EpochBatchSampler, build_loader, stable_seed, to_device
# save_checkpoint stays here: tests replace this module's write_checkpoint to kill a run mid-write
from .checkpoint import (checkpoint_name, checkpoints_root, load_initial_weights, prepare_staging, save_rank_rng,
                         write_checkpoint)
from .config import ConfigError, TrainConfig, _check_instance_types
from .ema import EMA
from .export import ExportMixin
from .family import Family, unwrap_model
from .logs import LogMixin, make_trackers
from .optim import LRSchedule  # still importable from here
from .resume import ResumeMixin
from .runlock import acquire_lock, release_lock
from .sharding import accelerate_fsdp_env_off, distributed_mode, full_value, no_sync, prepare_model
from .speed import compile_model, enable_gradient_checkpointing

__all__ = ["Trainer", "TrainSummary", "TrainingDivergedError", "EpochBatchSampler", "LRSchedule", "stable_seed"]

logger = logging.getLogger("genmod.train")


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/inf; no checkpoint was written with those weights."""


@dataclass
class TrainSummary:
    final_step: int
    last_loss: float
    output_dir: str
    checkpoint: Optional[str]
    final_model: Optional[str]
    pipeline: Optional[str]
    metrics_file: str
    samples_seen: int
    stopped_early: bool = False  # the time budget ended the run before max_steps
    train_wall_minutes: float = 0.0
    train_cpu_minutes: float = 0.0
    evaluation: Optional[dict] = None  # Family.evaluate's numbers, filled in by run_family


class Trainer(ResumeMixin, ExportMixin, LogMixin):
    """``Trainer(config, family, dataset).train()``; ``dataset`` defaults to ``family.build_dataset()``.

    ``callbacks``: functions ``fn(trainer, step, metrics)`` called on every process after each
    optimizer step (after logging, before previews and checkpoints), after the family's own
    (``family.callbacks()``). ``config.time_budget_minutes`` ends the run early, cleanly.

    Checkpoint contents and resume come from :class:`~genmod.train.resume.ResumeMixin`, previews and
    the final export from :class:`~genmod.train.export.ExportMixin`, the logs from
    :class:`~genmod.train.logs.LogMixin`.
    """

    def __init__(self, config: TrainConfig, family: Family, dataset=None,
                 callbacks: Optional[list[Callable]] = None):
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config: expected a TrainConfig, got {type(config).__name__}")
        _check_instance_types(config)
        config.validate()
        self.config = config
        self.family = family
        self.dataset = dataset if dataset is not None else family.build_dataset()
        self.callbacks = list(family.callbacks()) + list(callbacks or [])
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.accelerator = None
        self.model = None
        self.ema = None

    # ----------------------------------------------------------------------------------------
    # set-up

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:  # a fresh state per run, so several trainers can run in one process
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        with accelerate_fsdp_env_off():  # FSDP is applied by genmod.train.sharding, not by the plugin
            accelerator = Accelerator(cpu=self.config.cpu, mixed_precision=self.config.mixed_precision,
                                      gradient_accumulation_steps=1, step_scheduler_with_optimizer=False,
                                      log_with=make_trackers(self.config) or None)
        if world_size > 1 and accelerator.num_processes == 1:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but Accelerate sees 1 process: the processes would train independently "
                "into the same folder; on CPU launch with ACCELERATE_USE_CPU=1 torchrun --standalone "
                "--nproc_per_node N ... (or pass --cpu)")
        return accelerator

    def _build(self):
        from accelerate.utils import set_seed

        config = self.config
        self.accelerator = accelerator = self._make_accelerator()
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        set_seed(config.seed)

        model = self.family.build_model()
        if config.init_weights:  # fine-tuning; a resumed checkpoint's weights replace these later
            load_initial_weights(model, config.init_weights)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(f"{type(self.family).__name__}.build_model: the model has no trainable parameters")
        if any(p.dtype != torch.float32 for p in trainable):
            # fp16 grads cannot be unscaled; accelerate autocasts the forward instead
            raise ConfigError(f"{type(self.family).__name__}.build_model: trainable parameters must be float32 "
                              "(use --mixed_precision for bf16/fp16 training)")
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model, getattr(self.family, "name", type(self.family).__name__))
        # DDP replicas or FSDP shards (one function chooses); under FSDP rank 0 keeps a full copy for exports
        self.distributed = distributed_mode(config)
        self.model, self.optimizer, self.lr_scheduler, self.trainable, self.full_model = prepare_model(
            accelerator, model, config, self.distributed)
        if config.compile:
            self.model = compile_model(self.model)
        self.sharded = self.distributed == "fsdp" and self.world_size > 1
        self._gathered_step = -1

        self.ema = None
        self.ema_model = None
        if config.ema_decay > 0:  # the shadow is sharded like the parameters under FSDP
            self.ema = EMA(unwrap_model(self.model), config.ema_decay, config.ema_warmup, config.ema_inv_gamma,
                           config.ema_power, bias_correction=config.ema_bias_correction).to(self.device)
            source = self.full_model if self.sharded else unwrap_model(self.model)
            if source is not None:
                self.ema_model = copy.deepcopy(source).eval().requires_grad_(False)

        # the data position: an EpochBatchSampler, or a streaming dataset itself (batches.build_loader)
        self.sampler, self.loader, self.loader_generator = build_loader(
            self.dataset, config, self.world_size, self.rank, pin_memory=self.device.type == "cuda")
        self._data_iter = None

    # ----------------------------------------------------------------------------------------
    # data position

    def _next_batch(self):
        while True:
            if self._data_iter is None:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                self.loader_generator.manual_seed(stable_seed(self.config.seed, "loader", self.epoch))
                self._data_iter = iter(self.loader)
            try:
                batch = next(self._data_iter)
            except StopIteration:
                self._data_iter = None
                self.epoch += 1
                self.batch_in_epoch = 0
                continue
            self.batch_in_epoch += 1
            return to_device(batch, self.device)

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self) -> str:
        """Write ``checkpoints/step-XXXXXXXX`` atomically (collective: call on every process)."""
        accelerator = self.accelerator
        staging = os.path.join(checkpoints_root(self.config.output_dir), f".tmp-{checkpoint_name(self.step)}")
        accelerator.wait_for_everyone()
        if self.is_main:
            staging = prepare_staging(self.config.output_dir, self.step)
        accelerator.wait_for_everyone()
        if not self.is_main:
            save_rank_rng(staging, self.rank)
        accelerator.wait_for_everyone()
        path = os.path.join(checkpoints_root(self.config.output_dir), checkpoint_name(self.step))
        optimizer_state = self._gather_full(optimizer=True)  # FSDP: shards to rank 0 (collective)
        if self.is_main:
            training_state = self._training_state(optimizer_state)
            model = self.full_model if self.sharded else unwrap_model(self.model)
            path = write_checkpoint(staging, self.step, model=model,
                                    ema_model=self._ema_weights_model() if self.ema is not None else None,
                                    training_state=training_state, trainer_state=self._trainer_state(),
                                    config=self.config, keep_last=self.config.keep_last)
        accelerator.wait_for_everyone()
        self.last_checkpoint = path
        return path

    # ----------------------------------------------------------------------------------------
    # the loop

    def _diverged(self, what: str, value: float):
        where = self.last_checkpoint or "none (no checkpoint was written yet)"
        message = (f"training stopped at step {self.step + 1}: {what} is {value}; no checkpoint written with these "
                   f"weights; last good checkpoint: {where}")
        if self.is_main:
            logger.error(message)
        raise TrainingDivergedError(message)

    def train(self) -> TrainSummary:
        """Build, resume, take optimizer steps up to ``max_steps`` (or the time budget), checkpoint, export; the
        main process holds ``OUTPUT/run.lock`` throughout (one run per output folder, :mod:`.runlock`)."""
        self._lock = None  # taken in _start, once the accelerator says which process is the main one
        try:
            return self._train()
        finally:
            release_lock(self._lock)

    def _train(self) -> TrainSummary:
        # 1) model, optimizer and data; the checkpoint to continue from; config and log files
        self._start()
        progress, metrics_out = self._open_logs()
        try:
            while self.step < self.config.max_steps:
                # 2) one optimizer step, then its logs, callbacks, preview and checkpoint
                metrics = self._train_step()
                self._after_step(metrics, progress, metrics_out)
                # 3) past the time budget: stop here as if max_steps were reached
                if self._out_of_time():
                    break
            # 4) a checkpoint of the last step, the final (EMA) model and the pipeline
            final_dir, pipeline_dir = self._finish()
        finally:
            self._close_logs(progress, metrics_out)
        self.accelerator.end_training()
        return self._summary(final_dir, pipeline_dir)

    def _start(self) -> None:
        """Set up the run: build, make the output folder, resume, save the config, start the trackers."""
        config = self.config
        self._wall_start, self._cpu_start = time.monotonic(), time.process_time()
        self._deadline = self._wall_start + 60 * config.time_budget_minutes
        self.stopped_early = False
        self._build()
        self.metrics_file = os.path.join(config.output_dir, "metrics.jsonl")
        self.last_loss = float("nan")
        self.last_checkpoint = None
        if self.is_main:  # makes the folder; refuses it while another run holds it
            self._lock = acquire_lock(config.output_dir)
        self.accelerator.wait_for_everyone()
        if config.resume:
            self._resume()
        if self.is_main:
            from .config import save_config

            save_config(config, os.path.join(config.output_dir, "train_config.json"))
        self._start_trackers()

    def _accumulate_gradients(self) -> dict[str, torch.Tensor]:
        """Forward + backward over ``grad_accum_steps`` micro-batches; the summed logged scalars (on device)."""
        accelerator, config = self.accelerator, self.config
        accum = config.grad_accum_steps
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            # 1) the next batch and this micro-step's noise, seeded by (seed, micro_step, rank)
            batch = self._next_batch()
            micro_step = self.step * accum + micro
            generator = torch.Generator(device=self.device).manual_seed(stable_seed(config.seed, micro_step, self.rank))
            # 2) loss and backward; gradients are all-reduced only on the last micro-batch of the step
            sync = contextlib.nullcontext() if micro == accum - 1 else no_sync(accelerator, self.model)
            with sync:
                with accelerator.autocast():
                    out = self.family.loss(self.model, batch, generator)
                if not isinstance(out, dict) or "loss" not in out:
                    raise TypeError(f"{type(self.family).__name__}.loss must return a dict with 'loss'")
                accelerator.backward(out["loss"] / accum)
            # 3) the micro-batch's scalars, summed without a host sync
            for key, value in out.items():
                value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
                sums[key] = sums.get(key, 0.0) + value.to(self.device).reshape(())
        return sums

    def _host_values(self, keys: list[str], means: torch.Tensor, grad_norm) -> tuple[dict, float]:
        """The step's logs and grad norm as floats: one host sync per step, after the step's work is
        queued (as ``loss.item()`` in a plain loop). A NaN/inf raises before any checkpoint holds it."""
        values = torch.cat([means.float(), torch.as_tensor(grad_norm).float().reshape(1).to(means.device)]).tolist()
        logs, grad_norm = dict(zip(keys, values[:-1])), values[-1]
        if not math.isfinite(logs["loss"]):
            self._diverged("the loss", logs["loss"])
        fp16 = self.accelerator.mixed_precision == "fp16"
        if not math.isfinite(grad_norm) and not fp16:  # fp16: the grad scaler skipped the step
            self._diverged("the gradient norm", grad_norm)
        return logs, grad_norm

    def _train_step(self) -> dict:
        """One optimizer step (accumulate, clip, step, NaN guard, schedule, EMA); returns its metrics."""
        accelerator, config = self.accelerator, self.config
        # 1) gradients of grad_accum_steps micro-batches; their logged means across processes
        sums = self._accumulate_gradients()
        keys = list(sums)
        means = accelerator.reduce(torch.stack([sums[k] for k in keys]) / config.grad_accum_steps, reduction="mean")
        # 2) clip and take the optimizer step
        clip = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = full_value(accelerator.clip_grad_norm_(self.trainable, clip))  # FSDP: a DTensor
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # 3) to the host; stop on NaN/inf
        logs, grad_norm = self._host_values(keys, means, grad_norm)
        # 4) schedule, step count, EMA and the family's step
        if not accelerator.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(unwrap_model(self.model))
        self.last_loss = logs["loss"]
        self.family.set_step(self.step)
        return {"step": self.step, **logs, "lr": lr, "grad_norm": grad_norm, "epoch": self.epoch}

    def _after_step(self, metrics: dict, progress, metrics_out) -> None:
        """Logs, then the callbacks (the family's first), then previews and checkpoints at their intervals."""
        config = self.config
        if self.is_main:
            self._log(metrics, progress, metrics_out)
        for callback in self.callbacks:
            callback(self, self.step, metrics)
        if config.sample_every and self.step % config.sample_every == 0:
            self._gather_full()  # FSDP: rank 0's full copies (collective)
            if self.is_main:
                self.save_preview()
        if config.checkpoint_every and self.step % config.checkpoint_every == 0:
            self.save_checkpoint()

    def _out_of_time(self) -> bool:
        """True once ``time_budget_minutes`` have passed since :meth:`train` began, decided alike on
        every process (any process past the deadline stops all of them, so none waits on the others)."""
        if self.config.time_budget_minutes <= 0 or self.step >= self.config.max_steps:
            return False
        late = time.monotonic() > self._deadline
        if self.world_size > 1:
            flag = torch.tensor([float(late)], device=self.device)
            late = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if late and self.is_main:
            logger.info("time budget of %g minutes spent: stopping at step %d", self.config.time_budget_minutes,
                        self.step)
        self.stopped_early = late
        return late

    def _finish(self) -> tuple[Optional[str], Optional[str]]:
        """A checkpoint of the last step (unless one was just written) and, on the main process, the export."""
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(checkpoint_name(self.step)):
            self.save_checkpoint()
        final_dir = pipeline_dir = None
        self._gather_full()
        if self.is_main:
            final_dir, pipeline_dir = self._export()
        self.accelerator.wait_for_everyone()
        return final_dir, pipeline_dir

    def _summary(self, final_dir: Optional[str], pipeline_dir: Optional[str]) -> TrainSummary:
        config = self.config
        return TrainSummary(final_step=self.step, last_loss=self.last_loss, output_dir=config.output_dir,
                            checkpoint=self.last_checkpoint, final_model=final_dir, pipeline=pipeline_dir,
                            metrics_file=self.metrics_file,
                            samples_seen=self.step * config.grad_accum_steps * config.batch_size * self.world_size,
                            stopped_early=self.stopped_early,
                            train_wall_minutes=(time.monotonic() - self._wall_start) / 60,
                            train_cpu_minutes=(time.process_time() - self._cpu_start) / 60)
