"""The trainer's optimizer and learning-rate schedule: AdamW with linear warmup, then constant,
cosine (SGDR, Loshchilov & Hutter 2017, without restarts) or linear decay, all from the config."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

__all__ = ["LRSchedule", "build_optimizer", "apply_optimizer_config"]


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


def build_optimizer(trainable: list, config: TrainConfig):
    """``(AdamW, LambdaLR)`` over the trainable parameters, with the config's settings and schedule."""
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule(config.lr_schedule, config.warmup_steps, config.max_steps))
    return optimizer, lr_scheduler


def apply_optimizer_config(optimizer, lr_scheduler, config: TrainConfig) -> None:
    """After a resume, the optimizer and schedule follow *this* run's config, not the checkpoint's.

    ``LambdaLR.load_state_dict`` restores the saved ``LRSchedule`` (its ``total_steps``) and base
    lr, and ``Optimizer.load_state_dict`` the saved lr / betas / eps / weight decay, so without
    this a run resumed with a larger ``--max_steps`` would keep the old cosine, already at 0. With
    the options unchanged every value is recomputed to the same float (exact resume holds)."""
    schedule = LRSchedule(config.lr_schedule, config.warmup_steps, config.max_steps)
    lr_scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    lr_scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    factor = schedule(lr_scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(initial_lr=config.lr, lr=config.lr * factor, betas=tuple(config.adam_betas),
                     eps=config.adam_eps, weight_decay=config.weight_decay)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
