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
would train independently into the same folder; the trainer refuses to start.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from .checkpoint import (CheckpointError, checkpoint_name, checkpoints_root, find_checkpoint, load_training_state,
                         load_weights, prepare_staging, read_trainer_state, save_rank_rng, set_rng_state,
                         write_checkpoint)
from .config import ConfigError, TrainConfig, _check_instance_types
from .ema import EMA
from .family import Family, unwrap_model

__all__ = ["Trainer", "TrainSummary", "TrainingDivergedError", "EpochBatchSampler", "LRSchedule", "stable_seed"]

logger = logging.getLogger("genmod.train")


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/inf; no checkpoint was written with those weights."""


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical on every machine and Python run."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class EpochBatchSampler(Sampler):
    """Per-process batches of a seeded per-epoch permutation.

    Global batch ``i`` of epoch ``e`` is ``perm_e[i*B*W : (i+1)*B*W]`` (B = per-process batch,
    W = processes); process ``r`` takes its ``r``-th slice of B. So W processes x B samples see
    exactly the samples that 1 process x W*B would. The last incomplete global batch is dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, num_processes: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = batch_size * num_processes
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(f"--batch_size: the dataset has {num_samples} samples, fewer than one global batch "
                              f"({batch_size} x {num_processes} processes)")
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "epoch", self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        for index in range(self.start_batch, self.batches_per_epoch):
            start = index * self.global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


class LRSchedule:
    """Learning-rate factor: linear warmup ``(step+1)/warmup``, then constant, cosine or linear decay.

    Cosine: ``0.5 * (1 + cos(pi * p))`` with ``p`` the post-warmup progress in [0, 1] (SGDR,
    Loshchilov & Hutter 2017, without restarts); linear: ``1 - p``. A plain object so that
    ``LambdaLR.state_dict()`` stores only numbers.
    """

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int):
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 1.0)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


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


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _default_collate():
    try:  # the data package's collate knows about captions and other non-tensor fields
        from genmod.data import collate

        return collate
    except ImportError:
        from torch.utils.data import default_collate

        return default_collate


class Trainer:
    """``Trainer(config, family, dataset).train()``; ``dataset`` defaults to ``family.build_dataset()``.

    ``callbacks``: functions ``fn(trainer, step, metrics)`` called on every process after each
    optimizer step (after logging, before previews and checkpoints), after the family's own
    (``family.callbacks()``). ``config.time_budget_minutes`` ends the run early, cleanly.
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
        accelerator = Accelerator(cpu=self.config.cpu, mixed_precision=self.config.mixed_precision,
                                  gradient_accumulation_steps=1, step_scheduler_with_optimizer=False)
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
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(f"{type(self.family).__name__}.build_model: the model has no trainable parameters")
        if any(p.dtype != torch.float32 for p in trainable):
            # fp16 grads cannot be unscaled; accelerate autocasts the forward instead
            raise ConfigError(f"{type(self.family).__name__}.build_model: trainable parameters must be float32 "
                              "(use --mixed_precision for bf16/fp16 training)")
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                      weight_decay=config.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, LRSchedule(config.lr_schedule, config.warmup_steps, config.max_steps))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.trainable = trainable

        self.ema = None
        self.ema_model = None
        if config.ema_decay > 0:
            self.ema = EMA(unwrap_model(self.model), config.ema_decay, config.ema_warmup, config.ema_inv_gamma,
                           config.ema_power).to(self.device)
            self.ema_model = copy.deepcopy(unwrap_model(self.model)).eval().requires_grad_(False)

        self.sampler = EpochBatchSampler(len(self.dataset), config.batch_size, self.world_size, self.rank,
                                         seed=config.seed)
        # an explicit generator keeps DataLoader's base-seed draw off the global RNG
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=config.num_workers,
                                 collate_fn=_default_collate(), generator=self.loader_generator,
                                 pin_memory=self.device.type == "cuda" and config.num_workers > 0)
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
            return _to_device(batch, self.device)

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def _ema_weights_model(self):
        """The EMA copy with current EMA weights and the live model's buffers (or the raw model)."""
        live = unwrap_model(self.model)
        if self.ema is None:
            return live
        self.ema.copy_to(self.ema_model)
        with torch.no_grad():
            for target, source in zip(self.ema_model.buffers(), live.buffers()):
                target.copy_(source)
        return self.ema_model

    def _trainer_state(self) -> dict:
        family_cls = type(self.family)
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "micro_step": self.step * self.config.grad_accum_steps,
            "samples_seen": self.step * self.config.grad_accum_steps * self.config.batch_size * self.world_size,
            "world_size": self.world_size, "batch_size": self.config.batch_size,
            "grad_accum_steps": self.config.grad_accum_steps,
            "ema_num_updates": self.ema.num_updates if self.ema is not None else 0,
            "family": getattr(self.family, "name", family_cls.__name__),
            "family_class": f"{family_cls.__module__}:{family_cls.__qualname__}",
            "config_class": f"{type(self.config).__module__}:{type(self.config).__qualname__}",
            "last_loss": self.last_loss,
        }

    def save_checkpoint(self) -> str:
        """Write ``checkpoints/step-XXXXXXXX`` atomically (collective: call on every process)."""
        from .checkpoint import get_rng_state

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
        if self.is_main:
            scaler = getattr(accelerator, "scaler", None)
            training_state = {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "rng": get_rng_state(),
                "family": self.family.state_dict(),
            }
            path = write_checkpoint(staging, self.step, model=unwrap_model(self.model),
                                    ema_model=self._ema_weights_model() if self.ema is not None else None,
                                    training_state=training_state, trainer_state=self._trainer_state(),
                                    config=self.config, keep_last=self.config.keep_last)
        accelerator.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def _resume(self):
        """Continue from ``config.resume``: weights, optimizer, family state, RNG, step and data position."""
        config = self.config
        try:
            path = find_checkpoint(config.output_dir, config.resume)
        except CheckpointError:
            if config.resume == "latest" and not os.path.isdir(checkpoints_root(config.output_dir)):
                if self.is_main:
                    logger.warning("resume=latest: no checkpoint in %s yet, starting from step 0", config.output_dir)
                return
            raise
        state = read_trainer_state(path)
        if self.is_main:
            self._warn_config_changes(path)
        # 1) model and EMA weights
        self._load_weights(path, state)
        # 2) optimizer, schedule (re-aimed at this run's options), grad scaler
        training_state = load_training_state(path)
        self.optimizer.load_state_dict(training_state["optimizer"])
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

    def _load_weights(self, path: str, state: dict) -> None:
        """The checkpoint's model weights and EMA shadow (the model's when no ``ema/`` was saved)."""
        model = unwrap_model(self.model)
        try:
            model.load_state_dict(load_weights(os.path.join(path, "model")), strict=True)
            if self.ema is not None:
                ema_dir = os.path.join(path, "ema")
                source = ema_dir if os.path.isdir(ema_dir) else os.path.join(path, "model")
                self.ema.load_shadow(load_weights(source), where=source)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not match the model ({str(err).splitlines()[0]})") from None
        if self.ema is not None:
            self.ema.num_updates = int(state.get("ema_num_updates", state["step"]))

    def _restore_position(self, path: str, state: dict) -> None:
        """Epoch and batch to continue from; with another batch layout, from the number of samples seen."""
        config = self.config
        same_layout = (state.get("world_size") == self.world_size and state.get("batch_size") == config.batch_size
                       and state.get("grad_accum_steps") == config.grad_accum_steps)
        if same_layout:
            self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
            return
        micro_batches = state["samples_seen"] // (config.batch_size * self.world_size)
        self.epoch, self.batch_in_epoch = divmod(micro_batches, self.sampler.batches_per_epoch)
        if self.is_main:
            logger.warning("%s: saved with another batch layout; data position recomputed from samples seen", path)

    def _apply_optimizer_config(self) -> None:
        """After a resume, the optimizer and schedule follow *this* run's config, not the checkpoint's.

        ``LambdaLR.load_state_dict`` restores the saved ``LRSchedule`` (its ``total_steps``) and base
        lr, and ``Optimizer.load_state_dict`` the saved lr / betas / eps / weight decay, so without
        this a run resumed with a larger ``--max_steps`` would keep the old cosine, already at 0. With
        the options unchanged every value is recomputed to the same float (exact resume holds)."""
        config = self.config
        schedule = LRSchedule(config.lr_schedule, config.warmup_steps, config.max_steps)
        self.lr_scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        self.lr_scheduler.base_lrs = [config.lr] * len(self.optimizer.param_groups)
        factor = schedule(self.lr_scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=config.lr, lr=config.lr * factor, betas=tuple(config.adam_betas),
                         eps=config.adam_eps, weight_decay=config.weight_decay)
        self.lr_scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

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

    # ----------------------------------------------------------------------------------------
    # previews and export

    @torch.no_grad()
    def save_preview(self) -> Optional[str]:
        """Main process: ``samples/step-XXXXXX.png`` from the EMA model (family.sample)."""
        config = self.config
        if config.num_preview <= 0:
            return None
        model = self._ema_weights_model()
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        try:
            samples = self.family.sample(model, config.num_preview, generator)
        finally:
            model.train(was_training)
        if samples is None:
            return None
        folder = os.path.join(config.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, f"step-{self.step:06d}")
        if hasattr(self.family, "save_preview"):
            self.family.save_preview(samples, stem)
            return stem
        from torchvision.utils import save_image

        samples = samples.detach().float().cpu()
        nrow = max(1, math.ceil(math.sqrt(samples.shape[0])))
        save_image(samples, stem + ".png", nrow=nrow, normalize=True, value_range=(-1, 1))
        if self.writer is not None:
            self.writer.add_images("preview", ((samples.clamp(-1, 1) + 1) / 2), self.step)
        return stem + ".png"

    def _export(self) -> tuple[Optional[str], Optional[str]]:
        """Main process: final (EMA) model and, if the family builds one, the pipeline."""
        final_dir = os.path.join(self.config.output_dir, "final_model")
        model = copy.deepcopy(self._ema_weights_model()).eval()
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(final_dir, safe_serialization=True)
        else:
            final_dir = None
        pipeline = self.family.build_pipeline(model)
        pipeline_dir = None
        if pipeline is not None:
            pipeline_dir = os.path.join(self.config.output_dir, "pipeline")
            pipeline.save_pretrained(pipeline_dir, safe_serialization=True)
        return final_dir, pipeline_dir

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
        """Build, resume, take optimizer steps up to ``max_steps`` (or the time budget), checkpoint, export."""
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
        """Set up the run: build, make the output folder, resume, save the config, open TensorBoard."""
        config = self.config
        self._wall_start, self._cpu_start = time.monotonic(), time.process_time()
        self._deadline = self._wall_start + 60 * config.time_budget_minutes
        self.stopped_early = False
        self._build()
        self.metrics_file = os.path.join(config.output_dir, "metrics.jsonl")
        self.last_loss = float("nan")
        self.last_checkpoint = None
        if self.is_main:
            os.makedirs(config.output_dir, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if config.resume:
            self._resume()
        if self.is_main:
            from .config import save_config

            save_config(config, os.path.join(config.output_dir, "train_config.json"))
        self.writer = None
        if self.is_main and config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(config.output_dir, "logs"))

    def _open_logs(self):
        """The progress bar (main process) and ``metrics.jsonl`` opened for appending (main process)."""
        from tqdm.auto import tqdm

        progress = tqdm(total=self.config.max_steps, initial=self.step, desc="train", disable=not self.is_main,
                        dynamic_ncols=True)
        metrics_out = open(self.metrics_file, "a") if self.is_main else None
        return progress, metrics_out

    def _close_logs(self, progress, metrics_out) -> None:
        progress.close()
        if metrics_out is not None:
            metrics_out.close()
        if self.writer is not None:
            self.writer.close()

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
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(self.model)
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
        grad_norm = accelerator.clip_grad_norm_(self.trainable, clip)
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

    def _after_step(self, metrics: dict, progress, metrics_out) -> None:
        """Logs, then the callbacks (the family's first), then previews and checkpoints at their intervals."""
        config = self.config
        if self.is_main:
            self._log(metrics, progress, metrics_out)
        for callback in self.callbacks:
            callback(self, self.step, metrics)
        if config.sample_every and self.step % config.sample_every == 0 and self.is_main:
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


def read_metrics(output_dir: str) -> list[dict]:
    """The per-step metrics a run appended to ``OUTPUT/metrics.jsonl``."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
