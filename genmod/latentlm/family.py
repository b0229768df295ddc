"""The LatentLM family: next-token diffusion over sigma-VAE latents mixed with text in one causal
transformer (Sun et al. 2024, "Multimodal Latent Language Modeling with Next-Token Diffusion").

Training (Sec. 2.2; released ``train_hf.py``): every item becomes one mixed sequence
(``genmod.latentlm.text``): text-to-latent (``<bos> caption <bol> z_1..z_L <eol> <eos>``) or, with
probability ``caption_prob``, latent-to-text (``<bos> <bol> z_1..z_L <eol> caption <eos>``); class
models use ``<bos> <class> <bol> ... ``. Captions / classes are dropped to the null condition with
``cond_dropout_prob`` (CFG). Discrete next elements get cross-entropy through the LM head; each latent
next element gets the diffusion loss of the head conditioned on the previous state, with an
independent time per token and the condition repeated ``diffusion_batch_mul`` times with fresh noise
and time (MAR / LatentLM ``ddpm_batch_mul = 4``). Total loss = ``ce_weight * CE + diffusion``.

Latents come from a saved sigma-VAE (``--tokenizer``; image patches in raster order, audio frames in
time order), normalised by the data mean / std stored in the tokenizer's ``shift_factor`` /
``scaling_factor`` (computed once on the first batches when the tokenizer has none, as LatentLM does).
As in the released ``train_hf.py``, the language model trains on posterior samples (sigma-VAE:
``mu + sigma_b * eps`` with one sigma per item, fresh every step) and the statistics come from such
samples (``--latent_sample``, default on; ``--no-latent_sample`` trains on ``mu``, the old behaviour).
With ``--cache_latents`` the normalised means (and a KL posterior's std) are cached and the noise is
drawn per step. Captioning encodes with the mean.
The diffusion path defaults to the continuous cosine path with a velocity output; the paper's DDPM
cosine with epsilon-prediction is ``--path ddpm_cosine --prediction epsilon`` (integer steps n drawn
uniformly and fed to the head as n, as the released code; ``path.network_timestep``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from genmod.core.loss import flow_matching_loss
from genmod.core.paths import DiscreteSchedulePath, get_path
from genmod.core.time_sampling import sample_discrete_t, sample_uniform_t
from genmod.latentlm.sampling import generate_latents, generate_text
from genmod.latentlm.text import BOL, BOS, EOL, EOS, LATENT, NULL, PAD, LatentLMTokenizer, pack_sequences
from genmod.latentlm.transformer import LatentLMTransformer
from genmod.train import Family, TrainConfig, register_family, unwrap_model

MODALITY_KEYS = {"image": "image", "audio": "audio"}


@dataclass
class LatentLMConfig(TrainConfig):
    """LatentLM options (model, head, sequence layout, sampling) on top of the trainer's."""

    output_dir: str = "runs/latentlm"
    lr: float = 3e-4
    batch_size: int = 32
    adam_betas: tuple[float, float] = (0.9, 0.98)  # LatentLM's AdamW betas
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    sample_every: int = 0
    num_preview: int = 16
    # the sigma-VAE (a tokenizers_vq SigmaVAE folder, e.g. runs/tokenizers/sigma_vae_shapes/final_model)
    tokenizer: Optional[str] = None
    latent_stats_batches: int = 8  # batches used for the latent mean/std when the tokenizer has none
    cache_latents: bool = True  # encode the dataset once before training (in memory) instead of every step
    latent_sample: bool = True  # train on (and take the stats from) posterior samples, as LatentLM; False: the mean
    # speech_digits only: clip length in seconds; longer clips are dropped (not cropped) so speech matches text
    audio_duration: Optional[float] = None
    # conditioning and layout
    condition: Literal["text", "class"] = "text"
    caption_prob: float = 0.5  # share of text items laid out latents-first (captioning)
    cond_dropout_prob: float = 0.1
    max_text_length: int = 48
    # decoder
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    latent_patch_size: int = 1  # images: one token = a p x p patch of latent vectors (shorter sequences)
    rope_spacing: Literal["llama", "latentlm"] = "llama"  # latentlm: the released code's 10000^(-i/(d/2-1))
    # diffusion head
    head_width: int = 256
    head_depth: int = 3
    head_mlp_ratio: float = 4.0
    path: Literal["cosine", "ddpm_cosine", "linear"] = "cosine"
    prediction: Literal["velocity", "epsilon", "x0"] = "velocity"
    diffusion_batch_mul: int = 4
    ce_weight: float = 1.0
    # previews / exported pipeline defaults
    num_head_steps: int = 10
    guidance_scale: float = 3.0
    temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        from genmod.train import ConfigError

        if self.tokenizer is None:
            raise ConfigError("--tokenizer: LatentLM needs a continuous tokenizer folder (a sigma-VAE: genmod train tokenizer --tokenizer sigma_vae; or a KL autoencoder)")
        if not 0.0 <= self.caption_prob <= 1.0:
            raise ConfigError(f"--caption_prob: must be in [0, 1], got {self.caption_prob}")
        if not 0.0 <= self.cond_dropout_prob < 1.0:
            raise ConfigError(f"--cond_dropout_prob: must be in [0, 1), got {self.cond_dropout_prob}")
        if self.diffusion_batch_mul < 1:
            raise ConfigError(f"--diffusion_batch_mul: must be >= 1, got {self.diffusion_batch_mul}")
        if self.num_head_steps < 1:
            raise ConfigError(f"--num_head_steps: must be >= 1, got {self.num_head_steps}")
        if self.audio_duration is not None and (self.dataset != "speech_digits" or self.audio_duration <= 0):
            raise ConfigError(f"--audio_duration: a positive number of seconds for --dataset speech_digits, "
                              f"got {self.audio_duration} for {self.dataset!r}")


def item_segments(tokenizer: LatentLMTokenizer, condition: str, caption: Optional[str] = None,
                  label: Optional[int] = None, caption_first: bool = True, drop: bool = False) -> list:
    """The segment list of one training item (``genmod.latentlm.text`` layouts)."""
    if condition == "class":
        cls = NULL if drop else tokenizer.class_token(label)
        return [[BOS, cls, BOL], LATENT, [EOL, EOS]]
    text = [] if drop else tokenizer.encode(caption)
    if caption_first:
        return [[BOS, *text, BOL], LATENT, [EOL, EOS]]
    return [[BOS, BOL], LATENT, [EOL, *text, EOS]]


def draw_head_time(path, num: int, generator: torch.Generator, device) -> torch.Tensor:
    """Per-token diffusion times ``[num]``: ``t ~ U(0, 1)`` on a continuous path; on a DDPM table the integer step
    ``n ~ U{0..N-1}`` at its knot ``t = (n + 1) / N``, as LatentLM's ``train_hf.py`` draws its 1000 timesteps
    uniformly (so the head is fed exactly ``n``, :meth:`DiscreteSchedulePath.network_timestep`)."""
    if isinstance(path, DiscreteSchedulePath):
        return sample_discrete_t(num, generator, device, num_steps=path.num_steps)
    return sample_uniform_t(num, generator, device)


def next_element_loss(model, packed, generator: torch.Generator, path, prediction: str, diffusion_batch_mul: int = 4,
                      ce_weight: float = 1.0) -> dict:
    """CE on positions whose next element is a (non-pad) discrete token, diffusion loss on positions
    whose next element is a latent (Sec. 2.2); returns ``loss``, ``ce``, ``diffusion`` and counts."""
    out = model(packed.tokens, packed.latents, packed.is_latent, positions=packed.positions)
    hidden, logits = out.hidden_states[:, :-1], out.logits[:, :-1]
    next_tokens, next_is_latent = packed.tokens[:, 1:], packed.is_latent[:, 1:]
    next_is_text = packed.valid[:, 1:] & ~next_is_latent & (next_tokens != PAD)
    ce = F.cross_entropy(logits[next_is_text].float(), next_tokens[next_is_text]) if next_is_text.any() else logits.sum() * 0
    cond = hidden[next_is_latent].repeat(diffusion_batch_mul, 1)  # [N * mul, C]
    x0 = packed.latents[:, 1:][next_is_latent].repeat(diffusion_batch_mul, 1)  # [N * mul, D]
    device = x0.device
    t = draw_head_time(path, x0.shape[0], generator, device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device, x0.dtype)
    x_t = path.sample(x0, noise, t).x_t
    head_out = unwrap_model(model).head(x_t, path.network_timestep(t), cond)  # 1000 t; the DDPM step n on ddpm_*
    diffusion = flow_matching_loss(head_out, x0, noise, t, path=path, prediction=prediction)
    return {"loss": ce_weight * ce + diffusion, "ce": ce.detach(), "diffusion": diffusion.detach(),
            "num_text_targets": float(next_is_text.sum()), "num_latent_targets": float(next_is_latent.sum())}


def sample_from_cached(tokenizer, mean: torch.Tensor, std: Optional[torch.Tensor],
                       generator: torch.Generator) -> torch.Tensor:
    """A posterior sample from cached normalised means (noise drawn on ``generator``'s device): ``mean + std * eps``
    for a KL posterior; for a sigma-VAE ``normalize(mu + sigma_b * eps)`` = ``mean + scaling_factor * sigma_b * eps``,
    the same draws as ``tokenizer.encode(x, sample=True, generator=generator)``."""
    if std is not None:
        eps = torch.randn(mean.shape, generator=generator, device=generator.device)
        return mean + std * eps.to(mean.device, mean.dtype)
    zeros = torch.zeros(mean.shape, device=generator.device, dtype=mean.dtype)
    noise = tokenizer.add_noise(zeros, generator).to(mean.device)
    return mean + tokenizer.config.scaling_factor * noise


class LatentLMFamily(Family):
    """Text/class-conditional next-token diffusion on sigma-VAE latents (images or audio), plus captioning."""

    name = "latentlm"
    config_class = LatentLMConfig

    def __init__(self, config: LatentLMConfig):
        super().__init__(config)
        from genmod.tokenizers_vq.models import load_tokenizer

        if not os.path.isdir(config.tokenizer or ""):
            raise FileNotFoundError(f"--tokenizer: {config.tokenizer}: no such tokenizer folder")
        self.tokenizer = load_tokenizer(config.tokenizer).eval().requires_grad_(False)
        if hasattr(self.tokenizer, "encode_indices"):  # continuous latents only: a sigma-VAE or a KL autoencoder
            raise ValueError(f"--tokenizer: {config.tokenizer} is a {type(self.tokenizer).__name__} (discrete); LatentLM "
                             "needs a continuous tokenizer (a sigma-VAE, a KL-VAE or a diffusers AutoencoderKL)")
        self.modality = self.tokenizer.config.modality
        self.path = get_path(config.path)
        self._dataset = None
        self._raw_dataset = None
        self._info = None

    # -- data ----------------------------------------------------------------------------------
    def raw_dataset(self):
        """The dataset of images / clips (``--dataset``)."""
        if self._raw_dataset is None:
            self._raw_dataset = super().build_dataset()
        return self._raw_dataset

    def dataset_kwargs(self) -> dict:
        """``--audio_duration``: speech clips of that length, longer ones dropped so each says all its text."""
        if self.config.audio_duration is None:
            return {}
        return {"duration": self.config.audio_duration, "drop_longer": True}

    def build_dataset(self):
        """The training dataset: raw items, or (``--cache_latents``) their normalised latents with captions/labels."""
        if self._dataset is None:
            self._dataset = self._encode_dataset(self.raw_dataset()) if self.config.cache_latents else self.raw_dataset()
        return self._dataset

    @torch.no_grad()
    def _encode_dataset(self, dataset) -> list[dict]:
        from tqdm.auto import tqdm

        self._ensure_latent_stats()
        key = MODALITY_KEYS[self.modality]
        items = []
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=False)
        for batch in tqdm(loader, desc="encoding latents", leave=False):
            latents = self.tokenizer.encode(batch[key])
            # a KL tokenizer's per-element posterior std; None for a sigma-VAE (noise drawn per item, sample_from_cached)
            std = self.tokenizer.posterior_std(batch[key]) if self.config.latent_sample else None
            for i in range(len(latents)):
                item = {"latents": latents[i], "label": batch["label"][i]}
                if std is not None:
                    item["latent_std"] = std[i]
                if "caption" in batch:
                    item["caption"] = batch["caption"][i]
                items.append(item)
        return items

    def _ensure_latent_stats(self) -> None:
        """LatentLM normalises latents by a data mean/std computed once; kept in the tokenizer config."""
        cfg = self.tokenizer.config
        if cfg.scaling_factor != 1.0 or cfg.shift_factor != 0.0:
            return
        loader = torch.utils.data.DataLoader(self.raw_dataset(), batch_size=64, shuffle=False)
        generator = torch.Generator().manual_seed(self.config.seed) if self.config.latent_sample else None
        self.tokenizer.compute_latent_stats(loader, max_batches=self.config.latent_stats_batches,
                                            sample=self.config.latent_sample, generator=generator)

    def data_info(self) -> dict:
        """Latent channels and grid, classes, sample rate of the dataset through the tokenizer."""
        if self._info is None:
            self._ensure_latent_stats()
            dataset = self.raw_dataset()
            first = dataset[0]
            key = MODALITY_KEYS[self.modality]
            if key not in first:
                raise ValueError(f"dataset {self.config.dataset!r}: has no {key!r} (the tokenizer is for {self.modality})")
            if self.config.condition == "text" and "caption" not in first:
                raise ValueError(f"dataset {self.config.dataset!r}: has no captions; use --condition class")
            with torch.no_grad():
                z = self.tokenizer.encode(first[key][None])[0]
            self._info = {"latent_channels": z.shape[0], "latent_grid": list(z.shape[1:]),
                          "num_classes": int(getattr(dataset, "num_classes", 0)),
                          "class_names": list(getattr(dataset, "class_names", [])),
                          "sample_rate": first.get("sample_rate")}
        return self._info

    def text_tokenizer(self, model=None) -> LatentLMTokenizer:
        cfg = unwrap_model(model).config if model is not None else None
        num_classes = cfg.num_classes if cfg is not None else (self.data_info()["num_classes"] if self.config.condition == "class" else 0)
        return LatentLMTokenizer(num_classes, self.config.max_text_length)

    def encode_batch(self, batch: dict, model, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Normalised latent tokens ``[B, L, D]`` of a batch (cached ``latents`` or encoded inputs): posterior
        samples drawn with ``generator`` when one is given and ``--latent_sample`` is on, else the means."""
        sample = generator is not None and self.config.latent_sample
        if "latents" in batch:
            z = batch["latents"]
            if sample:
                z = sample_from_cached(self.tokenizer, z, batch.get("latent_std"), generator)
            return unwrap_model(model).latents_to_tokens(z)
        x = batch[MODALITY_KEYS[self.modality]]
        self.tokenizer.to(x.device)
        with torch.no_grad():
            z = self.tokenizer.encode(x, sample=True, generator=generator) if sample else self.tokenizer.encode(x)
        return unwrap_model(model).latents_to_tokens(z)

    # -- model, loss, sampler --------------------------------------------------------------------
    def build_model(self) -> LatentLMTransformer:
        cfg, info = self.config, self.data_info()
        num_classes = info["num_classes"] if cfg.condition == "class" else 0
        return LatentLMTransformer(
            latent_channels=info["latent_channels"], latent_grid=info["latent_grid"], latent_patch_size=cfg.latent_patch_size,
            vocab_size=LatentLMTokenizer(num_classes).vocab_size, num_classes=num_classes,
            hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            mlp_ratio=cfg.mlp_ratio, head_width=cfg.head_width, head_depth=cfg.head_depth,
            head_mlp_ratio=cfg.head_mlp_ratio, path=cfg.path, prediction=cfg.prediction, modality=self.modality,
            max_text_length=cfg.max_text_length, rope_spacing=cfg.rope_spacing,
        )

    def loss(self, model, batch: dict, generator: torch.Generator) -> dict:
        cfg = self.config
        latents = self.encode_batch(batch, model, generator)
        batch_size = latents.shape[0]
        tok = self.text_tokenizer(model)
        drop = (torch.rand(batch_size, generator=generator, device=generator.device) < cfg.cond_dropout_prob).tolist()
        caption_first = (torch.rand(batch_size, generator=generator, device=generator.device) >= cfg.caption_prob).tolist()
        segments = []
        for i in range(batch_size):
            if cfg.condition == "class":
                segments.append(item_segments(tok, "class", label=int(batch["label"][i]), drop=drop[i]))
            else:
                first = caption_first[i]
                # a dropped caption only makes sense before the latents (the null condition)
                segments.append(item_segments(tok, "text", caption=batch["caption"][i], caption_first=first,
                                              drop=drop[i] and first))
        packed = pack_sequences(segments, latents, latents.shape[-1], device=latents.device)
        return next_element_loss(model, packed, generator, self.path, unwrap_model(model).config.prediction,
                                 cfg.diffusion_batch_mul, cfg.ce_weight)

    def preview_conditions(self, num: int) -> tuple[list, list]:
        """Captions of the first ``num`` dataset items (text) or cycled class ids."""
        if self.config.condition == "class":
            classes = self.data_info()["num_classes"]
            return [i % classes for i in range(num)], []
        dataset = self.build_dataset()
        return [], [dataset[i % len(dataset)]["caption"] for i in range(num)]

    @torch.no_grad()
    def sample(self, model, num: int, generator: torch.Generator, prompts=None, labels=None, num_head_steps=None,
               guidance_scale=None, temperature=None) -> torch.Tensor:
        """``num`` decoded samples in [-1, 1] for dataset captions (or cycled classes)."""
        model = unwrap_model(model)
        tok = self.text_tokenizer(model)
        if prompts is None and labels is None:
            labels, prompts = self.preview_conditions(num)
        if model.config.num_classes:
            cond = [[BOS, tok.class_token(y), BOL] for y in labels]
            null = [[BOS, NULL, BOL] for _ in labels]
        else:
            cond = [[BOS, *tok.encode(p), BOL] for p in prompts]
            null = [[BOS, BOL] for _ in prompts]
        z = generate_latents(model, cond, null, num_head_steps or self.config.num_head_steps,
                             self.config.guidance_scale if guidance_scale is None else guidance_scale,
                             self.config.temperature if temperature is None else temperature, generator)
        device = z.device
        self.tokenizer.to(device)
        return self.tokenizer.decode(model.tokens_to_latents(z)).clamp(-1, 1)

    @torch.no_grad()
    def caption(self, model, inputs: torch.Tensor, max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy captions of images / clips (``[B, C, H, W]`` or ``[B, 1, N]`` in [-1, 1])."""
        model = unwrap_model(model)
        tok = self.text_tokenizer(model)
        latents = self.encode_batch({MODALITY_KEYS[self.modality]: inputs}, model)
        ids = generate_text(model, [[[BOS, BOL], LATENT, [EOL]] for _ in range(len(inputs))], latents,
                            max_new_tokens or model.config.max_text_length + 1)
        return [tok.decode(row) for row in ids]

    def save_preview(self, samples: torch.Tensor, stem: str) -> None:
        if self.modality == "audio":
            from genmod.data.io import save_wav

            for i, clip in enumerate(samples):
                save_wav(f"{stem}_{i:02d}.wav", clip.cpu(), self.data_info()["sample_rate"] or 16000)
        else:
            from genmod.data.io import save_image_grid

            save_image_grid(samples, f"{stem}.png")

    def build_pipeline(self, model):
        from genmod.latentlm.pipeline import LatentLMPipeline

        info = self.data_info()
        id2label = {i: n for i, n in enumerate(info["class_names"])} if unwrap_model(model).config.num_classes else None
        return LatentLMPipeline(transformer=unwrap_model(model), vae=self.tokenizer, sample_rate=info["sample_rate"],
                                id2label=id2label, num_head_steps=self.config.num_head_steps,
                                guidance_scale=self.config.guidance_scale, temperature=self.config.temperature)


register_family("latentlm", LatentLMFamily)
