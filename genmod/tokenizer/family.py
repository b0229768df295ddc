"""TokenizerFamily: trains VQ / FSQ / RVQ / multi-scale VQ / sigma-VAE / KL-VAE tokenizers with the
shared trainer (``genmod train tokenizer --quantizer fsq ...``), and ``evaluate_tokenizer``.

Loss (one micro-batch):

* images: ``rec_weight * L1|L2 + perceptual_weight * LPIPS + reg`` (reg = quantizer loss, KL or the
  sigma-VAE mean L2) ``+ gan_factor * lambda_adapt * gan_weight * (-mean D(x_hat))`` with the VQGAN
  adaptive weight (Esser et al. 2021, Eq. 7) and a PatchGAN hinge discriminator from ``gan_start``;
* audio (Improved RVQGAN, Kumar et al. 2023, Sec. 3.4): ``rec_weight * L1 + mel_weight * multi-scale mel
  + stft_weight * MR-STFT + reg`` and, from ``gan_start``, LSGAN over MPD + multi-band STFT
  discriminators plus ``feature_matching_weight`` * feature matching.

The shared trainer has one optimizer, so the family owns the discriminator and its AdamW and takes
the discriminator step inside ``loss`` (before the generator's adversarial term is built, so the
trainer's backward sees no in-place-modified weights). Step count and discriminator state go
through ``set_step`` / ``state_dict`` / ``load_state_dict``, which a trainer may call when present;
``scripts/train_tokenizer.py`` wires ``set_step`` through a trainer callback.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from genmod.train import Family, TrainConfig, register_family, unwrap_model

from .losses import (MultiBandSTFTDiscriminator, MultiPeriodDiscriminator, MultiResolutionSTFTLoss, MultiScaleMelLoss,
                     PatchDiscriminator, PerceptualLoss, adaptive_gan_weight, feature_matching_loss, gan_factor,
                     hinge_d_loss, hinge_g_loss, lsgan_d_loss, lsgan_g_loss, reconstruction_loss, si_sdr)
from .models import KLVAE, SigmaVAE, VQTokenizer
from .models.common import batch_input


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
    # evaluation at the end of training
    eval_samples: int = 1000
    eval_split: str = "test"
    time_budget_minutes: float = 0.0  # scripts/train_tokenizer.py stops early (cleanly) past this; 0 = off

    def validate(self) -> None:
        super().validate()
        from genmod.train import ConfigError

        if self.modality == "audio":
            hop = math.prod(self.strides)
            if self.audio_segment % hop:
                raise ConfigError(f"audio_segment={self.audio_segment} must be a multiple of prod(strides)={hop}")
        if self.audio_crop_tries < 1:
            raise ConfigError(f"--audio_crop_tries: must be >= 1, got {self.audio_crop_tries}")
        if self.gan_weight < 0 or self.perceptual_weight < 0:
            raise ConfigError("gan_weight / perceptual_weight must be >= 0")


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


def load_dataset(name: str, split: str, num_samples: Optional[int] = None, **kwargs):
    """``genmod.data.get_dataset`` (falls back to the built-in classes while that registry is missing)."""
    if num_samples is not None:
        kwargs["num_samples"] = num_samples
    try:
        from genmod.data import get_dataset
    except ImportError:
        get_dataset = None
    if get_dataset is not None:
        return get_dataset(name, split=split, **kwargs)
    if name == "shapes":
        from genmod.data.shapes import ShapesDataset
        return ShapesDataset(split=split, **kwargs)
    if name == "fashion_mnist":
        from genmod.data.fashion_mnist import FashionMNIST
        return FashionMNIST(split="test" if split != "train" else "train", **kwargs)
    if name == "tones":
        from genmod.data.tones import ToneDataset
        return ToneDataset(split=split, **kwargs)
    raise ValueError(f"dataset {name!r} unknown (genmod.data.get_dataset is not available yet)")


class TokenizerFamily(Family):
    name = "tokenizer"
    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        self.step = 0
        self._micro_steps = 0
        self.in_channels = config.in_channels
        self.sample_rate = 16000
        self.discriminator = None
        self.disc_optimizer = None
        self.perceptual = None
        self.mel_loss = None
        self.stft_loss = None
        self.preview_batch = None
        self.dataset = None

    # ------------------------------------------------------------------ model and data
    def build_dataset(self):
        config = self.config
        dataset = load_dataset(config.dataset, config.dataset_split, config.dataset_size)
        self.attach_dataset(dataset)
        return dataset

    def attach_dataset(self, dataset) -> None:
        """Take channels / sample rate and the fixed preview items from ``dataset``."""
        self.dataset = dataset
        if self.in_channels is None:
            self.in_channels = int(getattr(dataset, "channels", 1 if self.config.modality == "audio" else 3))
        self.sample_rate = int(getattr(dataset, "sample_rate", self.sample_rate))
        count = min(self.config.num_preview, len(dataset)) if self.config.num_preview > 0 else 0
        if count:
            items = [dataset[i] for i in range(count)]
            x = torch.stack([batch_input(item, self.config.modality) for item in items])
            self.preview_batch = self.crop_audio(x, None) if self.config.modality == "audio" else x

    def build_model(self):
        if self.in_channels is None:
            self.in_channels = 1 if self.config.modality == "audio" else 3
        return build_tokenizer(self.config, self.in_channels)

    def crop_audio(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Crop ``audio_segment`` samples from each clip of ``(B, C, T)``: without a generator the
        leading segment; with one, an independent random start per clip. With ``audio_crop_tries = k > 1``
        each clip draws k starts and keeps the crop with the most energy, so short utterances padded
        with silence (spoken digits) are not mostly trained on silence."""
        segment = self.config.audio_segment
        if x.shape[-1] < segment:
            return F.pad(x, (0, segment - x.shape[-1]))
        if generator is None:
            return x[..., :segment]
        tries = max(1, int(self.config.audio_crop_tries))
        starts = torch.randint(0, x.shape[-1] - segment + 1, (x.shape[0], tries), generator=generator,
                               device=generator.device).cpu()
        crops = []
        for clip, candidates in zip(x, starts.tolist()):
            options = [clip[..., s:s + segment] for s in candidates]
            energies = [float(o.float().pow(2).sum()) for o in options]
            crops.append(options[max(range(tries), key=energies.__getitem__)])
        return torch.stack(crops)

    # ------------------------------------------------------------------ trainer hooks
    def set_step(self, step: int) -> None:
        """Optimizer step number (gates the GAN); a trainer callback keeps it exact across resumes."""
        self.step = int(step)

    def trainer_callback(self, trainer, step: int, metrics: dict) -> None:
        """``Trainer(..., callbacks=[family.trainer_callback])``: the step after each optimizer step."""
        self._step_from_trainer = True
        self.set_step(step)

    def state_dict(self) -> dict:
        """Discriminator and its optimizer, for a trainer that checkpoints family state."""
        if self.discriminator is None:
            return {}
        return {"discriminator": self.discriminator.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict(),
                "step": self.step}

    def load_state_dict(self, state: dict, device=None) -> None:
        if not state:
            return
        self._ensure_discriminator(device or torch.device("cpu"))
        self.discriminator.load_state_dict(state["discriminator"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.step = int(state.get("step", self.step))

    def _ensure_discriminator(self, device) -> None:
        config = self.config
        if self.discriminator is not None:
            return
        if config.modality == "image":
            disc = PatchDiscriminator(self.in_channels or 3, config.disc_channels, config.disc_layers)
        else:
            disc = torch.nn.ModuleList([MultiPeriodDiscriminator(), MultiBandSTFTDiscriminator()])
        self.discriminator = disc.to(device)
        self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=config.disc_lr,
                                                betas=tuple(config.adam_betas))

    def _audio_disc(self, x):
        return [out for d in self.discriminator for out in d(x)]

    # ------------------------------------------------------------------ loss
    def loss(self, model, batch, generator):
        config = self.config
        x = batch_input(batch, config.modality)
        if config.modality == "audio":
            x = self.crop_audio(x, generator)
        if self.trainer_steps_unknown():
            self.step = self._micro_steps // config.grad_accum_steps
        self._micro_steps += 1
        out = model(x, generator=generator)
        x_hat = out.sample
        logs = {k: torch.as_tensor(v) for k, v in out.stats.items()}
        rec = reconstruction_loss(x.float(), x_hat.float(), config.rec_loss)
        total_rec = config.rec_weight * rec
        logs["rec"] = rec.detach()
        if config.modality == "image" and config.perceptual_weight > 0:
            if self.perceptual is None:
                self.perceptual = PerceptualLoss().to(x.device)
            p_loss = self.perceptual(x, x_hat)
            total_rec = total_rec + config.perceptual_weight * p_loss
            logs["lpips"] = p_loss.detach()
        if config.modality == "audio":
            if config.mel_weight > 0:
                if self.mel_loss is None:
                    self.mel_loss = MultiScaleMelLoss(self.sample_rate).to(x.device)
                mel = self.mel_loss(x, x_hat)
                total_rec = total_rec + config.mel_weight * mel
                logs["mel"] = mel.detach()
            if config.stft_weight > 0:
                if self.stft_loss is None:
                    self.stft_loss = MultiResolutionSTFTLoss()
                stft = self.stft_loss(x, x_hat)
                total_rec = total_rec + config.stft_weight * stft
                logs["mr_stft"] = stft.detach()
        total = total_rec + out.reg_loss
        logs["reg"] = out.reg_loss.detach()
        if config.gan_weight > 0 and gan_factor(self.step, config.gan_start) > 0:
            total = total + self._adversarial(model, x, x_hat, total_rec, logs)
        logs["loss"] = total
        return logs

    def trainer_steps_unknown(self) -> bool:
        """True until a trainer callback has reported a step (then ``self.step`` is authoritative)."""
        return not getattr(self, "_step_from_trainer", False)

    def _adversarial(self, model, x, x_hat, rec_loss, logs) -> torch.Tensor:
        config = self.config
        self._ensure_discriminator(x.device)
        disc = self.discriminator
        disc.train()
        # 1) discriminator step on detached fakes, before the generator term references its weights
        with torch.enable_grad():
            if config.modality == "image":
                d_loss = hinge_d_loss(disc(x.detach()), disc(x_hat.detach()))
            else:
                real, fake = self._audio_disc(x.detach()), self._audio_disc(x_hat.detach())
                d_loss = sum(lsgan_d_loss(r[0], f[0]) for r, f in zip(real, fake))
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_optimizer.step()
        logs["d_loss"] = d_loss.detach()
        # 2) generator adversarial term
        if config.modality == "image":
            g_loss = hinge_g_loss(disc(x_hat))
            last = unwrap_model(model).last_layer_weight
            weight = adaptive_gan_weight(rec_loss, g_loss, last) if torch.is_grad_enabled() else torch.tensor(1.0)
            logs["g_loss"], logs["gan_adaptive_weight"] = g_loss.detach(), weight
            return config.gan_weight * weight * g_loss
        real, fake = self._audio_disc(x), self._audio_disc(x_hat)
        g_loss = sum(lsgan_g_loss(f[0]) for f in fake)
        fm = feature_matching_loss(real, fake)
        logs["g_loss"], logs["feature_matching"] = g_loss.detach(), fm.detach()
        return config.gan_weight * g_loss + config.feature_matching_weight * fm

    # ------------------------------------------------------------------ previews / export
    @torch.no_grad()
    def sample(self, model, num, generator):
        """Side-by-side previews: each input next to its reconstruction (width-wise for images,
        time-wise for audio)."""
        if self.preview_batch is None:
            return None
        device = next(model.parameters()).device
        x = self.preview_batch[:num].to(device)
        x_hat = model(x).sample.clamp(-1, 1)
        return torch.cat([x, x_hat], dim=-1)

    def save_preview(self, samples, stem: str) -> None:
        from genmod.data.io import save_image_grid, save_wav

        if self.config.modality == "image":
            save_image_grid(samples.float().cpu(), stem + ".png", nrow=max(1, int(math.sqrt(samples.shape[0]))))
        else:
            for i, clip in enumerate(samples.float().cpu()):
                save_wav(f"{stem}-{i:02d}.wav", clip, self.sample_rate)


register_family("tokenizer", TokenizerFamily, TokenizerConfig)


# ---------------------------------------------------------------------------- evaluation
def _code_histograms(model, indices: torch.Tensor) -> list[torch.Tensor]:
    """One histogram per codebook (per RVQ stage; one for FSQ / VQ / multi-scale)."""
    size = model.quantize_layer.codebook_size if hasattr(model.quantize_layer, "codebook_size") else model.config.codebook_size
    if model.config.quantizer in ("rvq", "rfsq"):
        stages = model.quantize_layer.stages
        return [torch.bincount(indices[..., s][indices[..., s] >= 0].flatten(), minlength=stages[s].codebook_size)
                for s in range(indices.shape[-1])]
    return [torch.bincount(indices.flatten(), minlength=int(size))]


def _usage_metrics(histograms: list[torch.Tensor]) -> dict:
    """Usage (fraction of codes hit) and perplexity (exp of the whole-set code entropy), per codebook and averaged."""
    usages, perplexities = [], []
    for h in histograms:
        p = h.double() / h.sum().clamp_min(1)
        usages.append(float((h > 0).double().mean()))
        perplexities.append(float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum())))
    metrics = {"codebook_usage": sum(usages) / len(usages), "perplexity": sum(perplexities) / len(perplexities),
               "codebook_size": int(histograms[0].numel())}
    if len(histograms) > 1:
        metrics["usage_per_codebook"] = usages
        metrics["perplexity_per_codebook"] = perplexities
    return metrics


def token_rate(model, sample_rate: int) -> dict:
    """Frames per second and, for discrete tokenizers, bits per frame (``sum_stages log2 codebook_size``)
    and the bitrate ``frames/s * bits/frame`` of an audio tokenizer."""
    frames = sample_rate / model.downsample_factor
    out = {"frames_per_second": frames}
    config = model.config
    if "quantizer" in config:
        if config.quantizer in ("rvq", "rfsq"):
            sizes = [stage.codebook_size for stage in model.quantize_layer.stages]
        else:
            sizes = [int(getattr(model.quantize_layer, "codebook_size", config.codebook_size))]
        out["bits_per_frame"] = float(sum(math.log2(n) for n in sizes))
        out["bitrate_bps"] = frames * out["bits_per_frame"]
    else:
        out["latent_channels"] = int(config.latent_channels)
        out["floats_per_second"] = frames * int(config.latent_channels)
    return out


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def evaluate_audio_tokenizer(model, dataset, out_dir: str, num_samples: int = 1000, batch_size: int = 64,
                             num_show: int = 8, baselines: bool = True) -> dict:
    """Audio reconstruction metrics (see :func:`evaluate_tokenizer`) on clips at their own lengths (cut
    to a multiple of the hop; clips of different lengths are run one at a time).

    Per clip, averaged: SI-SDR (dB), multi-resolution STFT distance and 80-band log-mel distance
    (``evals.audio``), and DAC's multi-scale mel distance (the training loss). With ``baselines`` the same
    numbers for silence and resampled mu-law codecs (``evals.audio.DEFAULT_BASELINES``) on the same
    clips, so the tokenizer's numbers can be read against known bitrates. Writes ``metrics.json``,
    ``input_XX.wav`` / ``recon_XX.wav`` and ``mel_spectrograms.png`` (inputs vs reconstructions)."""
    from evals.audio import audio_baselines, reconstruction_scores, save_mel_comparison
    from genmod.data.io import save_wav

    device = next(model.parameters()).device
    hop = model.downsample_factor
    sample_rate = int(getattr(dataset, "sample_rate", 16000))
    multiscale_mel = MultiScaleMelLoss(sample_rate).to(device)
    scores: dict[str, list] = {}
    base_scores: dict[str, dict[str, list]] = {}
    base_bitrates: dict[str, int] = {}
    histograms = None
    shown_in, shown_out = [], []

    def add(store, values):
        for key, vals in values.items():
            store.setdefault(key, []).extend(vals)

    clips = []
    for i in range(num_samples):
        x = batch_input(dataset[i], "audio")
        length = max(hop, x.shape[-1] // hop * hop)
        clips.append(F.pad(x, (0, max(0, length - x.shape[-1])))[..., :length])
    groups, current = [], []
    for clip in clips:  # runs of equal-length clips, at most batch_size each
        if current and (clip.shape[-1] != current[0].shape[-1] or len(current) == batch_size):
            groups.append(current)
            current = []
        current.append(clip)
    groups.append(current)
    for group in tqdm(groups, desc="eval tokenizer", leave=False):
        x = torch.stack(group).to(device)
        out = model(x)
        x_hat = out.sample.clamp(-1, 1)
        add(scores, reconstruction_scores(x_hat.cpu(), x.cpu(), sample_rate))
        scores.setdefault("multiscale_mel_distance", []).extend(
            float(multiscale_mel(x[i:i + 1], x_hat[i:i + 1])) for i in range(len(x)))
        if baselines:
            for name, (y, bitrate) in audio_baselines(x.cpu(), sample_rate).items():
                base_bitrates[name] = bitrate
                add(base_scores.setdefault(name, {}), reconstruction_scores(y, x.cpu(), sample_rate))
        if out.indices is not None:
            hists = _code_histograms(model, out.indices)
            histograms = hists if histograms is None else [a + b for a, b in zip(histograms, hists)]
        for i in range(len(x)):
            if len(shown_in) < num_show:
                shown_in.append(x[i].cpu())
                shown_out.append(x_hat[i].cpu())
    metrics = {key: _mean(vals) for key, vals in scores.items()}
    metrics["num_samples"] = num_samples
    metrics["seconds"] = sum(c.shape[-1] for c in clips) / sample_rate
    metrics["sample_rate"] = sample_rate
    metrics.update(token_rate(model, sample_rate))
    if histograms is not None:
        metrics.update(_usage_metrics(histograms))
    if baselines:
        metrics["baselines"] = {name: {"bitrate_bps": base_bitrates[name], **{k: _mean(v) for k, v in vals.items()}}
                                for name, vals in base_scores.items()}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    for i in range(len(shown_in)):
        save_wav(os.path.join(out_dir, f"input_{i:02d}.wav"), shown_in[i], sample_rate)
        save_wav(os.path.join(out_dir, f"recon_{i:02d}.wav"), shown_out[i], sample_rate)
    count = min(4, len(shown_in))
    save_mel_comparison(os.path.join(out_dir, "mel_spectrograms.png"),
                        [("input", shown_in[:count]), ("reconstruction", shown_out[:count])], sample_rate)
    return metrics


@torch.no_grad()
def evaluate_tokenizer(model, dataset, out_dir: str, num_samples: int = 1000, batch_size: int = 64,
                       num_show: int = 8, lpips: bool = True, lpips_net: str = "alex", baselines: bool = True) -> dict:
    """Reconstruction metrics of ``model`` on the first ``num_samples`` items of ``dataset``.

    Images: PSNR, SSIM, LPIPS-``lpips_net`` (when its weights are available); audio
    (:func:`evaluate_audio_tokenizer`): SI-SDR, multi-resolution STFT distance, mel distances, frames/s
    and bitrate, and the same numbers for reference codecs (``baselines``). Discrete tokenizers: codebook
    usage (fraction of codes used over the whole set) and perplexity (exp of the entropy of the
    whole-set code histogram), per codebook (RVQ stage) and averaged.
    Writes ``metrics.json`` and ``reconstructions.png`` (or ``input_XX.wav`` / ``recon_XX.wav`` and
    ``mel_spectrograms.png``) into ``out_dir`` and returns the metrics.
    """
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    modality = model.config.modality
    device = next(model.parameters()).device
    num_samples = min(num_samples, len(dataset))
    if num_samples <= 0:
        raise ValueError(f"evaluate_tokenizer: dataset is empty or num_samples={num_samples}")
    if modality == "audio":
        return evaluate_audio_tokenizer(model, dataset, out_dir, num_samples, batch_size, num_show, baselines)
    from evals.recon import psnr as psnr_fn, ssim as ssim_fn

    lpips_fn = None
    if lpips:
        try:
            lpips_fn = PerceptualLoss(net=lpips_net).to(device)
        except RuntimeError:
            lpips_fn = None
    sums: dict[str, float] = {}
    histograms = None
    shown_in, shown_out = [], []
    for start in tqdm(range(0, num_samples, batch_size), desc="eval tokenizer", leave=False):
        items = [dataset[i] for i in range(start, min(start + batch_size, num_samples))]
        x = torch.stack([batch_input(item, modality) for item in items]).to(device)
        out = model(x)
        x_hat = out.sample.clamp(-1, 1)
        n = x.shape[0]
        sums["psnr"] = sums.get("psnr", 0.0) + float(psnr_fn(x, x_hat).sum())
        sums["ssim"] = sums.get("ssim", 0.0) + float(ssim_fn(x, x_hat).sum())
        if lpips_fn is not None:
            sums[f"lpips_{lpips_net}"] = sums.get(f"lpips_{lpips_net}", 0.0) + float(lpips_fn(x, x_hat)) * n
        if out.indices is not None:
            hists = _code_histograms(model, out.indices)
            histograms = hists if histograms is None else [a + b for a, b in zip(histograms, hists)]
        if len(shown_in) * batch_size < num_show:
            shown_in.append(x[:num_show].cpu())
            shown_out.append(x_hat[:num_show].cpu())
    metrics = {k: v / num_samples for k, v in sums.items()}
    metrics["num_samples"] = num_samples
    if histograms is not None:
        metrics.update(_usage_metrics(histograms))
    # numbers first, so a failing image writer cannot lose them
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    shown_x = torch.cat(shown_in)[:num_show]
    shown_y = torch.cat(shown_out)[:num_show]
    from genmod.data.io import save_image_grid

    grid = torch.cat([shown_x, shown_y], dim=-1)  # input | reconstruction, side by side
    save_image_grid(grid, os.path.join(out_dir, "reconstructions.png"), nrow=max(1, int(math.sqrt(len(grid)))))
    return metrics


def load_eval_dataset(name: str, split: str, modality: str, duration: Optional[float] = None):
    """The evaluation set: for audio, clips at their own lengths (``duration=None``) when the dataset
    takes a ``duration`` (speech digits, audio folders) instead of zero-padded to a fixed length."""
    if modality == "audio":
        try:
            return load_dataset(name, split, duration=duration)
        except TypeError:  # a dataset without a duration argument (tones): its own fixed length
            pass
    return load_dataset(name, split)


def _resolve_tokenizer_dir(path: str) -> tuple[str, Optional[dict]]:
    """A tokenizer folder (config.json) or a run folder holding ``final_model/``; plus its run's config."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"TOKENIZER_DIR: {path!r} is not a folder")
    model_dir = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "final_model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"TOKENIZER_DIR: no config.json in {path!r} or its final_model/")
    run_config = None
    for candidate in (os.path.join(model_dir, "..", "train_config.json"), os.path.join(path, "train_config.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                run_config = json.load(f)
            break
    return model_dir, run_config


def main_eval_tokenizer(argv: list[str]) -> int:
    """``genmod eval-tokenizer TOKENIZER_DIR [--dataset NAME] [--split test] [--num_samples N] [--out DIR]``."""
    import argparse

    from .models import load_tokenizer

    parser = argparse.ArgumentParser(prog="genmod eval-tokenizer", description=evaluate_tokenizer.__doc__.split("\n")[0])
    parser.add_argument("tokenizer_dir")
    parser.add_argument("--dataset", default=None, help="default: the dataset of the run's train_config.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=None, help="default: TOKENIZER_DIR/../eval")
    parser.add_argument("--no-lpips", dest="lpips", action="store_false")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="audio: skip the silence / mu-law reference codecs")
    parser.add_argument("--duration", type=float, default=None,
                        help="audio: pad/crop clips to this many seconds (default: each clip at its own length)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model_dir, run_config = _resolve_tokenizer_dir(args.tokenizer_dir)
    dataset_name = args.dataset or (run_config or {}).get("dataset")
    if dataset_name is None:
        parser.error("--dataset is required (no train_config.json next to the tokenizer)")
    model = load_tokenizer(model_dir).to(args.device)
    out_dir = args.out or os.path.join(model_dir, "..", "eval")
    dataset = load_eval_dataset(dataset_name, args.split, model.config.modality, args.duration)
    metrics = evaluate_tokenizer(model, dataset, out_dir, num_samples=args.num_samples,
                                 batch_size=args.batch_size, lpips=args.lpips, baselines=args.baselines)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}")
    return 0
