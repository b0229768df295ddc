"""The CausalFusion family: the dual-factorization training objective on the shared trainer.

Deng et al. 2024, "Causal Diffusion Transformers for Generative Modeling" (arXiv 2412.12095), training recipe of the dual factorization:

* tokens are visited in a random order per sample (random-order AR);
* the number of AR steps N is drawn with ``P(N = n) ∝ decay^(n-1)`` (``ar_step_decay``, 0.9 in the
  paper) and the N - 1 split points uniformly without replacement; splits (hence the mask) are
  shared by the batch (``draw_ar_steps``);
* one noise level t per sample, shared by all noisy tokens of all AR steps;
* sequence ``[class tokens | clean tokens of steps 0..N-2 | noisy tokens of all steps]`` under the
  generalized causal mask (``CausalFusionTransformer.forward``);
* the per-token loss is weighted by AR step, ``w = w_max - (w_max - w_min) * start / L`` with
  ``start`` the index of the step's first token (``ar_step_weights``; 2.0 -> 1.0 in the paper).

Diffusion convention (docs/DESIGN.md §1): the default is the linear flow path with a velocity
output, the same as the ``flow`` family, so that the AR-step study compares factorizations at equal
network evaluations with the same path and solver. The paper's own setting (DDPM linear betas,
epsilon prediction, uniform integer steps) is ``--path ddpm_linear --prediction epsilon
--time_sampling discrete``; both go through ``flow_matching_loss`` and convert exactly at sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from genmod.causalfusion.sampling import CausalFusionSampling, sample_tokens
from genmod.causalfusion.transformer import CausalFusionTransformer
from genmod.core.loss import flow_matching_loss
from genmod.core.paths import get_path
from genmod.core.time_sampling import get_time_sampler
from genmod.nn.embeddings import patchify, unpatchify
from genmod.train import TrainConfig, register_family, unwrap_model
from genmod.train.image_family import ImageFamily


def draw_ar_steps(num_tokens: int, generator: torch.Generator, decay: float = 0.9, max_steps: int | None = None) -> list[int]:
    """AR step sizes for one batch: ``N ~ P(n) ∝ decay^(n-1)`` on ``1..max_steps``, then N-1 uniform split points.

    CausalFusion's AR-step sampler ("the number of AR steps is sampled from an exponentially decaying
    distribution"; ``decay = 1`` makes N uniform). Returns N positive sizes summing to ``num_tokens``.
    """
    max_steps = num_tokens if max_steps is None else min(int(max_steps), num_tokens)
    if max_steps < 1:
        raise ValueError(f"max_ar_steps: must be >= 1, got {max_steps}")
    if not 0 < decay <= 1:
        raise ValueError(f"ar_step_decay: must be in (0, 1], got {decay}")
    probs = decay ** torch.arange(max_steps, dtype=torch.float64)
    num_steps = int(torch.multinomial(probs / probs.sum(), 1, generator=_cpu(generator)).item()) + 1
    cuts = (torch.randperm(num_tokens - 1, generator=_cpu(generator))[: num_steps - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, num_tokens]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _cpu(generator: torch.Generator) -> torch.Generator:
    # multinomial / randperm on a CUDA generator would need CUDA tensors; the split is tiny, so
    # derive a CPU generator from the device one (still fully determined by the trainer's seed).
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)


def ar_step_weights(step_sizes: list[int], max_weight: float = 2.0, min_weight: float = 1.0) -> torch.Tensor:
    """Per-token loss weights in AR order: ``w_max - (w_max - w_min) * start_index / L`` (CausalFusion's AR-step loss weighting)."""
    length = sum(step_sizes)
    starts = torch.repeat_interleave(torch.cumsum(torch.tensor([0, *step_sizes[:-1]]), 0), torch.tensor(step_sizes))
    return max_weight - (max_weight - min_weight) * starts.double() / length


@dataclass
class CausalFusionConfig(TrainConfig):
    """CausalFusion options (model size, AR-step sampling, loss weights, diffusion, sampling) on top of the trainer's."""

    output_dir: str = "runs/causalfusion"
    lr: float = 3e-4
    batch_size: int = 64
    ema_decay: float = 0.999
    adam_betas: tuple[float, float] = (0.9, 0.95)  # the paper's AdamW betas
    # network
    patch_size: int = 4
    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_cond_tokens: int = 4
    class_dropout_prob: float = 0.1
    conditional: bool = True
    # dual factorization
    ar_step_decay: float = 0.9
    max_ar_steps: Optional[int] = None  # None = number of tokens (pure AR reachable)
    max_ar_weight: float = 2.0
    min_ar_weight: float = 1.0
    # diffusion
    path: Literal["linear", "cosine", "ddpm_linear", "ddpm_cosine"] = "linear"
    prediction: Literal["velocity", "x0", "epsilon"] = "velocity"
    time_sampling: Literal["uniform", "logit_normal", "shifted", "discrete"] = "uniform"
    time_shift: float = 1.0
    # latent space: a saved tokenizers_vq tokenizer folder (None = pixels); with a KL / sigma-VAE tokenizer the model
    # trains on posterior samples, as DiT, SiT, MAR and CausalFusion do (`latent_dist.sample()`); --no-latent_sample: means
    tokenizer: Optional[str] = None
    latent_sample: bool = True
    # previews / exported pipeline defaults
    num_inference_steps: int = 16
    num_ar_steps: int = 4
    solver: Literal["euler", "midpoint", "heun", "rk4", "dpmsolver++2m"] = "euler"
    guidance_scale: float = 2.0

    def validate(self) -> None:
        super().validate()
        from genmod.train import ConfigError

        if not 0 < self.ar_step_decay <= 1:
            raise ConfigError(f"--ar_step_decay: must be in (0, 1], got {self.ar_step_decay}")
        if self.max_ar_steps is not None and self.max_ar_steps < 1:
            raise ConfigError(f"--max_ar_steps: must be >= 1, got {self.max_ar_steps}")
        if self.path == "linear" and self.prediction == "epsilon":
            raise ConfigError("--prediction: epsilon cannot be converted at t = 1 on the linear path (use velocity or ddpm_linear)")


class CausalFusionFamily(ImageFamily):
    """Class-conditional CausalFusion on images or tokenizer latents."""

    name = "causalfusion"
    config_class = CausalFusionConfig

    def __init__(self, config: CausalFusionConfig):
        super().__init__(config)
        self.path = get_path(config.path)
        kwargs = {"shift": config.time_shift} if config.time_sampling == "shifted" else {}
        self.draw_time = get_time_sampler(config.time_sampling, **kwargs)  # "discrete": DDPM's n ~ U{0..999}

    # -- model, loss, sampler --------------------------------------------------------------------
    def build_model(self) -> CausalFusionTransformer:
        cfg = self.config
        channels, size, num_classes, _ = self.data_shape()
        return CausalFusionTransformer(
            in_channels=channels, sample_size=size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            num_classes=num_classes if cfg.conditional else 0, num_cond_tokens=cfg.num_cond_tokens,
            class_dropout_prob=cfg.class_dropout_prob,
        )

    def loss(self, model, batch: dict, generator: torch.Generator) -> dict:
        """The weighted dual-factorization loss of one batch (module docstring)."""
        cfg = self.config
        inner = unwrap_model(model)
        x0 = self.clean_data(batch, generator)
        batch_size, length, patch = x0.shape[0], inner.num_tokens, inner.config.patch_size
        gen_device = generator.device
        order = torch.argsort(torch.rand((batch_size, length), generator=generator, device=gen_device), dim=1).to(x0.device)
        step_sizes = draw_ar_steps(length, generator, cfg.ar_step_decay, cfg.max_ar_steps)
        t = self.draw_time((batch_size,), generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        x_t = self.path.sample(x0, noise, t).x_t
        labels = batch["label"].to(x0.device) if inner.config.num_classes else None
        out = model(x_t, self.path.network_timestep(t), labels, clean_sample=x0, token_order=order, step_sizes=step_sizes,
                    dropout_generator=generator).sample
        # per-token weights: AR order -> raster positions
        weight_ar = ar_step_weights(step_sizes, cfg.max_ar_weight, cfg.min_ar_weight).to(x0.device, torch.float32)
        weight = torch.empty((batch_size, length), device=x0.device).scatter_(1, order, weight_ar.expand(batch_size, -1))
        loss = flow_matching_loss(patchify(out, patch), patchify(x0, patch), patchify(noise, patch), t, path=self.path,
                                  prediction=cfg.prediction, weight=weight)
        return {"loss": loss, "ar_steps": torch.tensor(float(len(step_sizes)))}

    def tokens_to_images(self, tokens: torch.Tensor, model) -> torch.Tensor:
        """Raster tokens ``[B, L, token_dim]`` -> images (decoded by the tokenizer in latent space)."""
        grid = model.grid_size
        return self.decode(unpatchify(tokens, model.config.patch_size, (grid, grid)))

    @torch.no_grad()
    def sample(self, model, num: int, generator: torch.Generator, labels=None, num_inference_steps=None,
               num_ar_steps=None, solver=None, guidance_scale=None) -> torch.Tensor:
        """``num`` images in [-1, 1] (classes cycled unless ``labels``), random order, even AR split."""
        cfg = self.config
        device = next(model.parameters()).device
        if labels is None and model.config.num_classes:
            labels = torch.arange(num, device=device) % model.config.num_classes
        settings = CausalFusionSampling(
            num_ar_steps=min(num_ar_steps or cfg.num_ar_steps, model.num_tokens),
            num_inference_steps=num_inference_steps or cfg.num_inference_steps, solver=solver or cfg.solver, path=self.path,
            prediction=cfg.prediction, guidance_scale=cfg.guidance_scale if guidance_scale is None else guidance_scale,
        )
        tokens = sample_tokens(model, labels, num, settings, generator=generator)
        return self.tokens_to_images(tokens, model).clamp(-1, 1)

    def build_pipeline(self, model):
        from genmod.causalfusion.pipeline import CausalFusionPipeline

        _, _, _, class_names = self.data_shape()
        id2label = {i: name for i, name in enumerate(class_names)} if model.config.num_classes else None
        return CausalFusionPipeline(
            transformer=model, vae=self.tokenizer, id2label=id2label, path=self.config.path,
            prediction=self.config.prediction, solver=self.config.solver,
        )


register_family("causalfusion", CausalFusionFamily)
