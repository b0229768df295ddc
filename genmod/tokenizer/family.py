"""TokenizerFamily: trains VQ / FSQ / RVQ / multi-scale VQ / sigma-VAE / KL-VAE tokenizers with the
shared trainer (``genmod train tokenizer --quantizer fsq ...``), then evaluates the exported model.

Loss (one micro-batch):

* images: ``rec_weight * L1|L2 + perceptual_weight * LPIPS + reg`` (reg = quantizer loss, KL or the
  sigma-VAE mean L2) ``+ gan_factor * lambda_adapt * gan_weight * (-mean D(x_hat))`` with the VQGAN
  adaptive weight (Esser et al. 2021, Eq. 7) and a PatchGAN hinge discriminator from ``gan_start``;
* audio (Improved RVQGAN, Kumar et al. 2023, Sec. 3.4): ``rec_weight * L1 + mel_weight * multi-scale mel
  + stft_weight * MR-STFT + reg`` and, from ``gan_start``, LSGAN over MPD + multi-band STFT
  discriminators plus ``feature_matching_weight`` * feature matching.

The shared trainer has one optimizer, so the family owns the discriminator and its AdamW and takes
the discriminator step inside ``loss`` (before the generator's adversarial term is built, so the
trainer's backward sees no in-place-modified weights). The trainer tells the family the optimizer
step (``set_step``, after every step and on resume) and checkpoints the discriminator and its
optimizer (``state_dict`` / ``load_state_dict``), so ``--resume`` keeps the GAN delay exact.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from genmod.train import Family, register_family, unwrap_model
from genmod.tokenizers_vq.losses import (MultiBandSTFTDiscriminator, MultiPeriodDiscriminator, MultiResolutionSTFTLoss,
                                  MultiScaleMelLoss, PatchDiscriminator, PerceptualLoss, adaptive_gan_weight,
                                  feature_matching_loss, gan_factor, hinge_d_loss, hinge_g_loss, lsgan_d_loss,
                                  lsgan_g_loss, reconstruction_loss)
from genmod.tokenizers_vq.models.common import batch_input

from .config import TokenizerConfig, build_tokenizer
from .evaluation import evaluate_tokenizer, load_eval_dataset

__all__ = ["TokenizerFamily"]


class TokenizerFamily(Family):
    name = "tokenizer"
    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        self.step = 0
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
        dataset = super().build_dataset()
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
        """The optimizer step, from the trainer after every step and on resume (gates the GAN)."""
        self.step = int(step)

    def state_dict(self) -> dict:
        """Discriminator and its optimizer (checkpointed by the trainer once the GAN has started)."""
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
        """Reconstruction + regulariser, plus the adversarial term from optimizer step ``gan_start`` on."""
        config = self.config
        x = batch_input(batch, config.modality)
        if config.modality == "audio":
            x = self.crop_audio(x, generator)
        out = model(x, generator=generator)
        x_hat = out.sample
        logs = {k: torch.as_tensor(v) for k, v in out.stats.items()}
        total_rec = self._reconstruction(x, x_hat, logs)
        total = total_rec + out.reg_loss
        logs["reg"] = out.reg_loss.detach()
        if config.gan_weight > 0 and gan_factor(self.step, config.gan_start) > 0:
            total = total + self._adversarial(model, x, x_hat, total_rec, logs)
        logs["loss"] = total
        return logs

    def _reconstruction(self, x, x_hat, logs: dict) -> torch.Tensor:
        """``rec_weight * L1|L2`` plus LPIPS (images) or multi-scale mel / MR-STFT (audio); logs each term."""
        config = self.config
        rec = reconstruction_loss(x.float(), x_hat.float(), config.rec_loss)
        logs["rec"] = rec.detach()
        terms = [config.rec_weight * rec]
        if config.modality == "image" and config.perceptual_weight > 0:
            if self.perceptual is None:
                self.perceptual = PerceptualLoss().to(x.device)
            logs["lpips"] = self.perceptual(x, x_hat)
            terms.append(config.perceptual_weight * logs["lpips"])
        if config.modality == "audio" and config.mel_weight > 0:
            if self.mel_loss is None:
                self.mel_loss = MultiScaleMelLoss(self.sample_rate).to(x.device)
            logs["mel"] = self.mel_loss(x, x_hat)
            terms.append(config.mel_weight * logs["mel"])
        if config.modality == "audio" and config.stft_weight > 0:
            if self.stft_loss is None:
                self.stft_loss = MultiResolutionSTFTLoss()
            logs["mr_stft"] = self.stft_loss(x, x_hat)
            terms.append(config.stft_weight * logs["mr_stft"])
        for key in ("lpips", "mel", "mr_stft"):
            if key in logs:
                logs[key] = logs[key].detach()
        return sum(terms[1:], terms[0])

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

    # ------------------------------------------------------------------ after training
    def evaluate(self, summary) -> Optional[dict]:
        """Reconstruction metrics of the exported model on ``--eval_split`` (``--eval_samples`` items; 0 = off)."""
        from genmod.tokenizers_vq.models import load_tokenizer

        config = self.config
        if config.eval_samples <= 0 or not summary.final_model:
            return None
        model = load_tokenizer(summary.final_model)
        dataset = load_eval_dataset(config.dataset, config.eval_split, config.modality)
        return evaluate_tokenizer(model, dataset, self.eval_dir(), num_samples=config.eval_samples)


register_family("tokenizer", TokenizerFamily, TokenizerConfig)
