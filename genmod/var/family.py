"""The VAR family: next-scale prediction on a trained multi-scale VQ tokenizer (Tian et al. 2024).

Training (Sec. 3.2, official ``trainer.py``): encode each image to its token pyramid (index maps of
every scale, ``MultiScaleResidualVQ``), build the teacher-forcing input of scale k+1 from the
accumulated reconstruction ``f_hat`` after scale k area-downsampled to scale k+1
(``scales_to_teacher_forcing_inputs``), predict every scale's tokens in one block-causal forward and
take the cross-entropy over all tokens with uniform weights 1/L. Labels are dropped to the null class
with ``class_dropout_prob`` (0.1) for classifier-free guidance; drop-path and label dropout draw from
the trainer's generator. Optimiser defaults follow VAR: AdamW betas (0.9, 0.95), weight decay 0.05,
gradient clip 2, linear decay, no EMA.

The tokenizer is trained first (``genmod train tokenizer --quantizer msvq --scales 1,2,3,4,6,8 ...``)
and passed as ``--tokenizer DIR`` (its ``final_model`` folder or a pipeline's ``vqvae``). Image token
pyramids are encoded once per run (cached in memory) since the tokenizer is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from genmod.train import ConfigError, Family, TrainConfig, register_family, unwrap_model
from genmod.var.transformer import VARTransformer, var_loss


@dataclass
class VARConfig(TrainConfig):
    """VAR options on top of the trainer's (every field is a ``genmod train var`` flag)."""

    output_dir: str = "runs/var"
    lr: float = 5e-4
    batch_size: int = 64
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 2.0
    warmup_steps: int = 50
    lr_schedule: Literal["constant", "cosine", "linear"] = "linear"
    ema_decay: float = 0.0  # VAR trains without EMA
    # the trained multi-scale tokenizer (a VQTokenizer with quantizer=msvq); required
    tokenizer: Optional[str] = None
    # network: VAR's depth rule (width 64*depth, depth heads, drop-path 0.1*depth/24) unless overridden
    depth: int = 6
    width: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    drop_path_rate: Optional[float] = None
    class_dropout_prob: float = 0.1
    init_adaln_gamma: float = 1e-3
    label_smoothing: float = 0.0
    conditional: bool = True  # False: every label is the null class (unconditional VAR)
    # sampling defaults for previews and the exported pipeline (guidance w = 1 + VAR's cfg)
    guidance_scale: float = 2.5
    guidance_schedule: Literal["linear", "constant"] = "linear"
    top_k: Optional[int] = None
    top_p: Optional[float] = 0.96
    temperature: float = 1.0
    # after training: held-out domain metrics of N class-cycled samples (VARFamily.evaluate; 0 = off)
    eval_samples: int = 0

    def validate(self) -> None:
        super().validate()
        if not self.tokenizer:
            raise ConfigError("--tokenizer: VAR needs a trained multi-scale tokenizer folder (genmod train tokenizer --quantizer msvq)")
        if self.depth <= 0:
            raise ConfigError(f"--depth: must be > 0, got {self.depth}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top_k: must be >= 1 or none, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p: must be in (0, 1] or none, got {self.top_p}")


def load_msvq_tokenizer(path: str):
    """A frozen ``VQTokenizer`` with the multi-scale quantizer from ``path`` (one-line error otherwise)."""
    from genmod.tokenizers_vq.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    if getattr(tokenizer.config, "quantizer", None) != "msvq":
        raise ConfigError(f"--tokenizer {path}: VAR needs a VQTokenizer with quantizer 'msvq', got "
                          f"{type(tokenizer).__name__} with quantizer {getattr(tokenizer.config, 'quantizer', None)!r}")
    return tokenizer.eval().requires_grad_(False)


class TokenPyramidDataset(Dataset):
    """Images encoded once to their concatenated multi-scale indices ``(L,)`` plus labels."""

    def __init__(self, dataset, tokenizer, batch_size: int = 256):
        self.num_classes = getattr(dataset, "num_classes", 0)
        self.class_names = list(getattr(dataset, "class_names", []))
        self.image_size = getattr(dataset, "image_size", None)
        self.channels = getattr(dataset, "channels", None)
        device = next(tokenizer.parameters()).device
        indices, labels = [], []
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        with torch.no_grad():
            for batch in tqdm(loader, desc="encoding token pyramids", leave=False):
                if "image" not in batch:
                    raise ConfigError(f"dataset: VAR trains on images; the dataset items have keys {sorted(batch)}")
                indices.append(tokenizer.encode_indices(batch["image"].to(device)).cpu())
                labels.append(torch.as_tensor(batch.get("label", torch.zeros(len(batch["image"])))).long())
        self.indices = torch.cat(indices)
        self.labels = torch.cat(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {"indices": self.indices[i], "label": self.labels[i]}


class VARFamily(Family):
    """Class-conditional next-scale prediction on a frozen multi-scale VQ tokenizer."""

    name = "var"
    config_class = VARConfig

    def __init__(self, config: VARConfig):
        config.validate()
        super().__init__(config)
        self.tokenizer = load_msvq_tokenizer(config.tokenizer)
        self.quantizer = self.tokenizer.quantize_layer
        self._dataset = None
        self._class_info = None

    # -- data ----------------------------------------------------------------------------------
    def build_dataset(self):
        if self._dataset is None:
            self._dataset = TokenPyramidDataset(super().build_dataset(), self.tokenizer)
        return self._dataset

    def _classes(self) -> tuple[int, list[str]]:
        if self._class_info is None:
            from genmod.data import get_dataset

            try:  # class names without encoding the whole dataset
                info = get_dataset(self.config.dataset, split=self.config.dataset_split, num_samples=1)
            except TypeError:
                info = self.build_dataset()
            self._class_info = (int(getattr(info, "num_classes", 0)), list(getattr(info, "class_names", [])))
        return self._class_info

    def batch_indices(self, batch: dict) -> torch.Tensor:
        """Concatenated multi-scale indices ``[B, L]`` of a batch (cached pyramids or raw images)."""
        if "indices" in batch:
            return batch["indices"]
        self.tokenizer.to(batch["image"].device)
        return self.tokenizer.encode_indices(batch["image"])

    # -- model, loss, sampler --------------------------------------------------------------------
    def build_model(self) -> VARTransformer:
        cfg = self.config
        num_classes, _ = self._classes()
        return VARTransformer(
            vocab_size=self.quantizer.codebook_size, latent_channels=self.quantizer.dim,
            scales=[list(s) for s in self.quantizer.scales], num_classes=max(num_classes, 1), depth=cfg.depth,
            width=cfg.width, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate,
            class_dropout_prob=cfg.class_dropout_prob, init_adaln_gamma=cfg.init_adaln_gamma,
        )

    def loss(self, model, batch: dict, generator: torch.Generator) -> dict:
        indices = self.batch_indices(batch).to(generator.device)
        self.tokenizer.to(indices.device)
        with torch.no_grad():
            inputs = self.quantizer.scales_to_teacher_forcing_inputs(indices)
        labels = batch["label"].to(indices.device).long()
        if not self.config.conditional:
            labels = torch.full_like(labels, unwrap_model(model).null_class_id)
        logits = model(labels, inputs, dropout_generator=generator).logits
        loss = var_loss(logits, indices, self.config.label_smoothing)
        last = unwrap_model(model).scale_starts[-2]  # tokens of the finest scale
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == indices).float().mean()
            last_scale_accuracy = (logits[:, last:].argmax(-1) == indices[:, last:]).float().mean()
        return {"loss": loss, "accuracy": accuracy, "last_scale_accuracy": last_scale_accuracy}

    def sampling_settings(self) -> dict:
        cfg = self.config
        return dict(guidance_scale=cfg.guidance_scale, guidance_schedule=cfg.guidance_schedule, top_k=cfg.top_k,
                    top_p=cfg.top_p, temperature=cfg.temperature)

    @torch.no_grad()
    def sample(self, model, num: int, generator: torch.Generator, labels=None, **overrides) -> torch.Tensor:
        """``num`` images in [-1, 1], classes cycled unless ``labels``; sampling settings from the config."""
        from genmod.var.pipeline import VARSampling, var_generate

        device = next(model.parameters()).device
        if labels is None:
            labels = torch.arange(num, device=device) % model.config.num_classes
            if not self.config.conditional:
                labels = torch.full_like(labels, model.null_class_id)
        settings = {**self.sampling_settings(), **overrides}
        if not self.config.conditional:
            settings["guidance_scale"] = 1.0
        self.tokenizer.to(device)
        result = var_generate(model, self.quantizer, labels, VARSampling(**settings), generator=generator)
        return self.tokenizer.decoder(result.f_hat).clamp(-1, 1)

    def build_pipeline(self, model):
        from genmod.var.pipeline import VARPipeline

        _, class_names = self._classes()
        id2label = {i: name for i, name in enumerate(class_names)}
        return VARPipeline(transformer=model, vqvae=self.tokenizer, id2label=id2label, **self.sampling_settings())

    def evaluate(self, summary) -> Optional[dict]:
        """Held-out metrics of ``eval_samples`` class-cycled samples from the exported pipeline
        (``genmod.evals.held_out.held_out_report``; domain FID/KID and the floor on ``shapes``), ``eval/grid.png``."""
        from genmod.evals.held_out import held_out_report
        from genmod.pipelines import load_pipeline

        if self.config.eval_samples <= 0 or not summary.pipeline:
            return None
        pipe = load_pipeline(summary.pipeline)
        pipe.set_progress_bar_config(disable=True)
        dataset = self.config.dataset if self.config.dataset == "shapes" else None  # the one domain net we train
        return held_out_report(pipe, self.config.eval_samples, self.eval_dir(), dataset)


register_family("var", VARFamily)
