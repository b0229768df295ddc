"""What the trainer writes for people: preview grids during training and, at the end, the final
(EMA) model and the family's pipeline (docs/DESIGN.md §3).

:class:`ExportMixin` reads the trainer's ``config``, ``family``, ``model``, ``ema``, ``ema_model``,
``device``, ``step`` and ``writer``.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Optional

import torch

from genmod.core.files import atomic_dir, atomic_path
from .family import unwrap_model
from .sharding import gather_ema_into, gather_model_into, gather_optimizer_state

__all__ = ["ExportMixin"]


class ExportMixin:
    """The trainer's EMA-weights model, previews and final export."""

    def _gather_full(self, optimizer: bool = False) -> Optional[dict]:
        """Every process: under FSDP, gather the sharded weights and EMA into rank 0's full copies (once per
        step) and, with ``optimizer``, return the full optimizer state on rank 0. Nothing under DDP."""
        if not self.sharded:
            return None
        if self._gathered_step != self.step:
            gather_model_into(self.model, self.full_model)
            if self.ema is not None:
                gather_ema_into(self.ema, self.ema_model)
            self._gathered_step = self.step
        return gather_optimizer_state(self.optimizer, keep=self.is_main) if optimizer else None

    def _ema_weights_model(self):
        """The EMA copy with current EMA weights and the live model's buffers (or the raw model).
        Under FSDP: rank 0's full copies, filled by :meth:`_gather_full`."""
        live = self.full_model if self.sharded else unwrap_model(self.model)
        if self.ema is None:
            return live
        if not self.sharded:
            self.ema.copy_to(self.ema_model)
        with torch.no_grad():
            for target, source in zip(self.ema_model.buffers(), live.buffers()):
                target.copy_(source)
        return self.ema_model

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
        with atomic_path(stem + ".png") as tmp:
            save_image(samples, tmp, nrow=nrow, normalize=True, value_range=(-1, 1))
        if self.writer is not None:
            self.writer.add_images("preview", ((samples.clamp(-1, 1) + 1) / 2), self.step)
        return stem + ".png"

    def _export(self) -> tuple[Optional[str], Optional[str]]:
        """Main process: final (EMA) model and, if the family builds one, the pipeline."""
        final_dir = os.path.join(self.config.output_dir, "final_model")
        model = copy.deepcopy(self._ema_weights_model()).eval()
        if hasattr(model, "save_pretrained"):  # staged and renamed: a cut export keeps the previous folder
            with atomic_dir(final_dir, replace=True, manifest=True) as staging:
                model.save_pretrained(staging, safe_serialization=True)
        else:
            final_dir = None
        pipeline = self.family.build_pipeline(model)
        pipeline_dir = None
        if pipeline is not None:
            pipeline_dir = os.path.join(self.config.output_dir, "pipeline")
            with atomic_dir(pipeline_dir, replace=True, manifest=True) as staging:
                pipeline.save_pretrained(staging, safe_serialization=True)
        return final_dir, pipeline_dir
