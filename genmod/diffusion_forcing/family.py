"""The Diffusion Forcing family: independent per-frame noise levels in a frame-causal network.

Training (Chen et al. 2024, Sec. 3.2, Alg. 1): every frame ``t`` of every clip draws its own time
``k_t ~ U[0, 1]`` (``noise_level="random_all"``; ``"full_sequence"`` shares one level per clip, the
full-sequence diffusion baseline), is noised on the package path ``x_t = alpha x0 + sigma eps``
(``eps`` clipped to ``+-clip_noise`` as in the reference video configs) and the network predicts
velocity, x0 or epsilon for all frames at once; the MSE is weighted per frame by min-SNR or the fused
SNR (``genmod.diffusion_forcing.loss``). Optional labels are dropped for CFG with
``class_dropout_prob``; ``history_drop_prob`` hides a random prefix of frames from the rest (to train
the "drop" kind of history guidance). All randomness comes from the trainer's generator.

Network (``backbone``): ``transformer`` (``DiffusionForcingTransformer``, video or sequences) or ``unet``
(``DiffusionForcingUNet``, video only: a per-frame conv U-Net with causal temporal attention, which
learns appearance much faster on a CPU budget); ``causal=False`` gives either full attention over the
window and the bidirectional fused SNR (DFoT). The network is fed ``path.network_timestep(t)`` (the DDPM
step n on ``ddpm_*`` paths).

Data: ``moving_shapes`` clips ``[T, 3, S, S]`` (pixels) or ``oscillators`` series ``[T * k, D]``
grouped into ``T`` frames of ``k = frame_stack`` steps (DF's frame stacking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from genmod.diffusion_forcing.loss import fused_snr_weight
from genmod.diffusion_forcing.sampling import RolloutSettings, rollout
from genmod.diffusion_forcing.transformer import DiffusionForcingTransformer
from genmod.diffusion_forcing.unet import DiffusionForcingUNet
from genmod.core.loss import flow_matching_loss, min_snr_weight
from genmod.core.paths import get_path
from genmod.core.time_sampling import get_time_sampler
from genmod.train import Family, TrainConfig, register_family, unwrap_model

SEQUENCE_DATASETS = ("oscillators",)


@dataclass
class DiffusionForcingConfig(TrainConfig):
    """Diffusion Forcing options (data, network, noise levels, loss weights, sampling) on top of the trainer's."""

    output_dir: str = "runs/diffusion_forcing"
    dataset: str = "moving_shapes"
    lr: float = 3e-4
    batch_size: int = 16
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    # data: clip length in frames (= the model's attention window), frame side, steps per sequence frame
    num_frames: int = 8
    image_size: int = 16
    frame_stack: int = 1
    # network: a frame-causal DiT, or (video) a conv U-Net with causal temporal attention
    backbone: Literal["transformer", "unet"] = "transformer"
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    unet_temporal_levels: tuple[int, ...] = (1, 2)  # U-Net levels (0 = full resolution) with temporal attention
    unet_head_dim: int = 32
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = True  # False: full attention over the window and the bidirectional fused SNR (DFoT)
    conditional: bool = False
    class_dropout_prob: float = 0.1
    # diffusion forcing
    path: Literal["linear", "cosine", "vp", "ddpm_linear", "ddpm_cosine", "ddpm_sigmoid"] = "cosine"
    prediction: Literal["velocity", "x0", "epsilon"] = "velocity"
    noise_level: Literal["random_all", "full_sequence"] = "random_all"
    loss_weighting: Literal["fused_snr", "min_snr", "none"] = "fused_snr"
    snr_gamma: float = 5.0
    fused_snr_decay: float = 0.96
    # "frame": the decay applies per model frame; "step": per source time step, so it is raised to
    # frame_stack * frame_skip as the reference code does (0.96 -> 0.9216 for its Minecraft frame_skip 2)
    fused_snr_decay_per: Literal["frame", "step"] = "frame"
    frame_skip: int = 1  # source frames per data frame (read only by fused_snr_decay_per="step")
    clip_noise: float = 6.0  # 0 = off
    history_drop_prob: float = 0.0
    # sampling (previews and exported pipeline defaults)
    num_inference_steps: int = 20
    schedule: Literal["autoregressive", "pyramid", "full_sequence"] = "pyramid"
    slope: float = 1.0
    context_noise: float = 0.02
    stabilization: Literal["v1.5", "v1.5_ddpm", "dfot", "fixed_noise"] = "v1.5"
    clip_denoised: float = 1.0  # clamp the x0 prediction of video frames to [-c, c]; 0 = off (latents)
    preview_context: int = 2
    preview_frames: int = 16

    def validate(self) -> None:
        super().validate()
        from genmod.train import ConfigError

        for name in ("num_frames", "frame_stack", "frame_skip", "num_inference_steps", "preview_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.context_noise < 1:
            raise ConfigError(f"--context_noise: must be in [0, 1), got {self.context_noise}")
        if self.clip_denoised < 0:
            raise ConfigError(f"--clip_denoised: must be >= 0 (0 = off), got {self.clip_denoised}")
        if not 0 <= self.history_drop_prob < 1:
            raise ConfigError(f"--history_drop_prob: must be in [0, 1), got {self.history_drop_prob}")
        if self.backbone == "unet" and self.dataset in SEQUENCE_DATASETS:
            raise ConfigError(f"--backbone unet: models video frames only; use --backbone transformer for {self.dataset}")
        if not 0 <= self.preview_context < self.num_frames:
            raise ConfigError(f"--preview_context: must be in [0, num_frames), got {self.preview_context}")


class DiffusionForcingFamily(Family):
    """Diffusion Forcing on video clips or 1-D sequences with the shared trainer."""

    name = "diffusion-forcing"
    config_class = DiffusionForcingConfig

    def __init__(self, config: DiffusionForcingConfig):
        super().__init__(config)
        self.path = get_path(config.path)
        self.draw_time = get_time_sampler("uniform")
        self._dataset = None

    # -- data ------------------------------------------------------------------------------------
    @property
    def is_sequence(self) -> bool:
        return self.config.dataset in SEQUENCE_DATASETS

    def build_dataset(self, split: str | None = None):
        cfg = self.config
        split = split or cfg.dataset_split
        if split == cfg.dataset_split and self._dataset is not None:
            return self._dataset
        from genmod.data import get_dataset

        kwargs = {} if cfg.dataset_size is None or split != cfg.dataset_split else {"num_samples": cfg.dataset_size}
        if cfg.dataset == "moving_shapes":
            kwargs.update(num_frames=cfg.num_frames, image_size=cfg.image_size)
        elif cfg.dataset == "oscillators":
            kwargs.update(num_steps=cfg.num_frames * cfg.frame_stack)
        dataset = get_dataset(cfg.dataset, split=split, **kwargs)
        if split == cfg.dataset_split:
            self._dataset = dataset
        return dataset

    def to_frames(self, batch: dict) -> torch.Tensor:
        """Clean frames ``[B, T, *frame]`` of a batch (sequences grouped by ``frame_stack``)."""
        if "video" in batch:
            return batch["video"]
        if "sequence" in batch:
            return self.stack_frames(batch["sequence"])
        raise ValueError(f"batch: diffusion forcing needs a 'video' or 'sequence' key, got {sorted(batch)}")

    def stack_frames(self, sequence: torch.Tensor) -> torch.Tensor:
        """``[B, T * k, D] -> [B, T, k * D]`` (frame stacking)."""
        k = self.config.frame_stack
        if sequence.shape[1] % k:
            raise ValueError(f"sequence: length {sequence.shape[1]} is not divisible by frame_stack {k}")
        return sequence.reshape(sequence.shape[0], sequence.shape[1] // k, k * sequence.shape[2])

    def unstack_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, T, k * D] -> [B, T * k, D]``."""
        k = self.config.frame_stack
        return frames.reshape(frames.shape[0], frames.shape[1] * k, frames.shape[2] // k)

    # -- model, loss, sampler --------------------------------------------------------------------
    def build_model(self) -> DiffusionForcingTransformer | DiffusionForcingUNet:
        cfg = self.config
        dataset = self.build_dataset()
        num_classes = getattr(dataset, "num_classes", 0) if cfg.conditional else 0
        if cfg.backbone == "unet":
            if self.is_sequence:
                raise ValueError(f"backbone: 'unet' models video frames only, not the {cfg.dataset} sequences")
            first = dataset[0]["video"]
            return DiffusionForcingUNet(
                in_channels=first.shape[1], sample_size=first.shape[-1], block_out_channels=tuple(cfg.unet_channels),
                layers_per_block=cfg.unet_layers_per_block, temporal_attention_levels=tuple(cfg.unet_temporal_levels),
                attention_head_dim=cfg.unet_head_dim, max_frames=cfg.num_frames, num_classes=num_classes,
                class_dropout_prob=cfg.class_dropout_prob, causal=cfg.causal)
        common = dict(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                      max_frames=cfg.num_frames, num_classes=num_classes, class_dropout_prob=cfg.class_dropout_prob,
                      causal=cfg.causal)
        if self.is_sequence:
            dim = dataset[0]["sequence"].shape[-1]
            return DiffusionForcingTransformer(modality="sequence", in_channels=dim * cfg.frame_stack, **common)
        first = dataset[0]["video"]
        return DiffusionForcingTransformer(modality="video", in_channels=first.shape[1], sample_size=first.shape[-1],
                                           patch_size=cfg.patch_size, **common)

    def draw_levels(self, batch: int, frames: int, generator: torch.Generator, device) -> torch.Tensor:
        """Per-frame times ``[B, T]``: independent for every frame (``random_all``) or one per clip."""
        if self.config.noise_level == "full_sequence":
            return self.draw_time((batch, 1), generator, device=device).expand(batch, frames)
        return self.draw_time((batch, frames), generator, device=device)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        cfg = self.config
        if cfg.loss_weighting == "none":
            return None
        if cfg.loss_weighting == "min_snr":
            return min_snr_weight(self.path, t, cfg.snr_gamma, cfg.prediction)
        power = cfg.frame_stack * cfg.frame_skip if cfg.fused_snr_decay_per == "step" else 1
        return fused_snr_weight(self.path, t, cfg.snr_gamma, cfg.fused_snr_decay, cfg.prediction, causal=cfg.causal,
                                decay_power=power)

    def loss(self, model, batch: dict, generator: torch.Generator) -> dict:
        cfg = self.config
        x0 = self.to_frames(batch)
        batch_size, frames = x0.shape[:2]
        device = x0.device
        t = self.draw_levels(batch_size, frames, generator, device).clamp(1e-4, 1.0)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(device)
        if cfg.clip_noise > 0:
            noise = noise.clamp(-cfg.clip_noise, cfg.clip_noise)
        x_t = self.path.sample(x0, noise, t).x_t
        history_cut = None
        if cfg.history_drop_prob > 0:
            drop = torch.rand((batch_size,), generator=generator, device=generator.device).to(device) < cfg.history_drop_prob
            cut = torch.randint(1, frames, (batch_size,), generator=generator, device=generator.device).to(device)
            history_cut = torch.where(drop, cut, torch.zeros_like(cut))
        inner = unwrap_model(model)
        labels = batch["label"].to(device) if inner.config.num_classes else None
        actions = batch["actions"].to(device) if inner.config.action_dim else None
        out = model(x_t, self.path.network_timestep(t), labels, actions=actions, history_cut=history_cut, dropout_generator=generator).sample
        weight = self.loss_weight(t)
        per_frame = flow_matching_loss(out, x0, noise, t, path=self.path, prediction=cfg.prediction, reduction="none")
        per_frame = per_frame.flatten(2).mean(-1)  # [B, T]
        loss = (per_frame * weight).mean() if weight is not None else per_frame.mean()
        logs = {"loss": loss, "mse_unweighted": per_frame.mean().detach()}
        low = t < 0.3
        if low.any():
            logs["mse_low_t"] = per_frame[low].mean().detach()
        return logs

    def rollout(self, model, context, num_frames, generator, **kwargs) -> torch.Tensor:
        """``genmod.diffusion_forcing.sampling.rollout`` with this family's path, prediction and defaults."""
        cfg = self.config
        settings = RolloutSettings(path=self.path, prediction=cfg.prediction, schedule=cfg.schedule,
                                   num_inference_steps=cfg.num_inference_steps, slope=cfg.slope,
                                   context_noise=cfg.context_noise, stabilization=cfg.stabilization,
                                   clip_denoised=None if self.is_sequence or cfg.clip_denoised == 0 else cfg.clip_denoised)
        return rollout(model, context, num_frames, settings, generator=generator, **kwargs)

    @torch.no_grad()
    def sample(self, model, num: int, generator: torch.Generator) -> torch.Tensor:
        """``num`` rollouts of ``preview_frames`` frames after ``preview_context`` clean frames of validation clips."""
        cfg = self.config
        device = next(model.parameters()).device
        dataset = self.build_dataset("val")
        items = [dataset[i % len(dataset)] for i in range(num)]
        batch = {key: torch.stack([item[key] for item in items]) for key in ("video", "sequence", "label") if key in items[0]}
        clips = self.to_frames(batch).to(device)
        labels = batch["label"].to(device) if model.config.num_classes else None
        out = self.rollout(model, clips[:, :cfg.preview_context], cfg.preview_frames, generator, class_labels=labels)
        return out if not self.is_sequence else self.unstack_frames(out)

    def save_preview(self, samples: torch.Tensor, stem: str) -> None:
        """Video: a GIF and a PNG strip per rollout; sequences: a line plot."""
        samples = samples.detach().float().cpu()
        if self.is_sequence:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(min(4, len(samples)), 1, figsize=(7, 6), squeeze=False)
            context_steps = self.config.preview_context * self.config.frame_stack
            for ax, seq in zip(axes[:, 0], samples):
                ax.plot(seq[:, 0].numpy())
                ax.axvline(context_steps - 0.5, color="grey", ls="--")
            fig.savefig(stem + ".png", dpi=80)
            plt.close(fig)
            return
        from genmod.data.io import save_gif
        from torchvision.utils import save_image

        save_gif(stem + ".gif", samples.clamp(-1, 1))
        strip = samples[: min(8, len(samples))]
        save_image(strip.flatten(0, 1), stem + ".png", nrow=strip.shape[1], normalize=True, value_range=(-1, 1))

    def build_pipeline(self, model):
        from genmod.diffusion_forcing.pipeline import DiffusionForcingPipeline

        cfg = self.config
        return DiffusionForcingPipeline(
            transformer=model, path=cfg.path, prediction=cfg.prediction, context_noise=cfg.context_noise,
            schedule=cfg.schedule, slope=cfg.slope, frame_stack=cfg.frame_stack,
            num_inference_steps=cfg.num_inference_steps,
        )


register_family("diffusion-forcing", DiffusionForcingFamily)
