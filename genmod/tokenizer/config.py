"""TokenizerConfig: the flat config of ``genmod train tokenizer`` and the model it describes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from genmod.train import ConfigError, TrainConfig
from genmod.tokenizers_vq.models import KLVAE, SigmaVAE, VQTokenizer

__all__ = ["TokenizerConfig", "resolved_cosine", "build_tokenizer"]


@dataclass
class TokenizerConfig(TrainConfig):
    """Flat config of a tokenizer run; every field is a ``genmod train tokenizer`` flag."""

    output_dir: str = "runs/tokenizers/fsq"
    ema_decay: float = 0.0  # model EMA off by default: codebook EMA already smooths, runs are short
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.5, 0.9)  # taming VQGAN
    batch_size: int = 32
    sample_every: int = 0
    checkpoint_every: int = 1000
    num_preview: int = 8
    # which tokenizer
    tokenizer: Literal["vq", "sigma_vae", "kl_vae"] = "vq"
    modality: Literal["image", "audio"] = "image"
    in_channels: Optional[int] = None  # None: from the dataset (channels)
    base_channels: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention: bool = False
    strides: tuple[int, ...] = (2, 4, 5, 8)
    full_rate_blocks: bool = True  # audio: residual units at the sample rate (False: a cheaper patchify level)
    istft_levels: int = 0  # audio: the decoder's last N upsampling levels become a Vocos inverse-STFT head
    latent_channels: int = 8
    # quantizer (tokenizer == "vq")
    quantizer: Literal["vq", "simvq", "fsq", "rvq", "rfsq", "msvq"] = "fsq"
    codebook_size: int = 4096
    fsq_levels: tuple[int, ...] = (7, 5, 5, 5, 5)  # FSQ paper Table 1 for ~2^12
    codebook_dim: Optional[int] = None
    # l2-normalised codes; none = on for msvq (VAR's quantizer collapses to a few codes without), off otherwise
    cosine: Optional[bool] = None
    codebook_update: Literal["ema", "loss"] = "ema"
    codebook_ema_decay: float = 0.99
    kmeans_init: bool = False
    dead_code_threshold: float = 0.0
    gradient: Literal["ste", "rotation", "softmax_ste"] = "ste"
    commitment_beta: float = 0.25
    num_quantizers: int = 1
    quantizer_dropout: float = 0.0
    scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    # continuous latents
    sigma_std: float = 0.75
    mean_l2_weight: float = 1e-2
    kl_weight: float = 1e-6
    # losses
    rec_loss: Literal["l1", "l2"] = "l1"
    rec_weight: float = 1.0
    perceptual_weight: float = 0.0
    gan_weight: float = 0.0  # 0 = no discriminator
    gan_start: int = 0
    disc_lr: float = 2e-4
    disc_channels: int = 64
    disc_layers: int = 3
    mel_weight: float = 15.0
    stft_weight: float = 0.0
    feature_matching_weight: float = 2.0
    audio_segment: int = 8000  # training crop in samples (a multiple of prod(strides))
    audio_crop_tries: int = 1  # random crops drawn per clip; the most energetic is kept (1 = plain random crop)
    # evaluation at the end of training (TokenizerFamily.evaluate; 0 = off)
    eval_samples: int = 1000
    eval_split: str = "test"

    def validate(self) -> None:
        super().validate()
        for name in ("base_channels", "latent_channels", "codebook_size", "num_quantizers", "audio_segment",
                     "disc_channels", "codebook_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("ch_mult", "strides", "fsq_levels", "scales"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ConfigError(f"--{name}: must be a non-empty list of ints >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0 or self.disc_layers < 0:
            raise ConfigError(f"--num_res_blocks / --disc_layers: must be >= 0, got {self.num_res_blocks} / {self.disc_layers}")
        if self.modality == "audio":
            hop = math.prod(self.strides)
            if self.audio_segment % hop:
                raise ConfigError(f"audio_segment={self.audio_segment} must be a multiple of prod(strides)={hop}")
        if self.audio_crop_tries < 1:
            raise ConfigError(f"--audio_crop_tries: must be >= 1, got {self.audio_crop_tries}")
        if self.gan_weight < 0 or self.perceptual_weight < 0:
            raise ConfigError(f"--gan_weight / --perceptual_weight: must be >= 0, got {self.gan_weight} / {self.perceptual_weight}")


def resolved_cosine(config: TokenizerConfig) -> bool:
    """``--cosine`` as given, else on for the multi-scale quantizer only."""
    return config.quantizer == "msvq" if config.cosine is None else config.cosine


def build_tokenizer(config: TokenizerConfig, in_channels: int):
    """The model a :class:`TokenizerConfig` describes."""
    common = dict(modality=config.modality, in_channels=in_channels, base_channels=config.base_channels,
                  ch_mult=tuple(config.ch_mult), num_res_blocks=config.num_res_blocks, attention=config.attention,
                  strides=tuple(config.strides), latent_channels=config.latent_channels)
    if config.modality == "audio":
        common["full_rate_blocks"] = config.full_rate_blocks
        common["istft_levels"] = config.istft_levels
    if config.tokenizer == "vq":
        return VQTokenizer(quantizer=config.quantizer, codebook_size=config.codebook_size,
                           fsq_levels=tuple(config.fsq_levels), codebook_dim=config.codebook_dim, cosine=resolved_cosine(config),
                           codebook_update=config.codebook_update, ema_decay=config.codebook_ema_decay,
                           kmeans_init=config.kmeans_init, dead_code_threshold=config.dead_code_threshold,
                           gradient=config.gradient, commitment_beta=config.commitment_beta,
                           num_quantizers=config.num_quantizers, quantizer_dropout=config.quantizer_dropout,
                           scales=tuple(config.scales), **common)
    if config.tokenizer == "sigma_vae":
        return SigmaVAE(sigma_std=config.sigma_std, mean_l2_weight=config.mean_l2_weight, **common)
    return KLVAE(kl_weight=config.kl_weight, **common)
