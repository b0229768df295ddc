"""The flow-matching family: a FlowTransformer, the flow-matching loss and an ODE sampler.

Training (Lipman et al. 2023; Liu et al. 2023; SD3's logit-normal time sampling, Esser et al. 2024
eq. 19): draw ``t`` and noise, build ``x_t = alpha(t) x0 + sigma(t) eps`` on the chosen path, regress
the network output on the target of its prediction type. Labels are dropped to the null class with
``class_dropout_prob`` so one network is both conditional and unconditional (classifier-free
guidance, Ho & Salimans 2022). Everything random comes from the trainer's generator.

Pixel space by default; ``--tokenizer DIR`` trains in the latent space of a saved ``tokenizers_vq``
tokenizer (the generator only sees "latents plus a decode function").

Couplings (``--coupling ot|sinkhorn|sb``, ``genmod.core.couplings``): the batch's noise is re-paired with
its data by a minibatch OT plan, within each class (Tong et al. 2023); ``sb`` adds the Brownian-bridge
noise of the Schrodinger bridge. Reflow (``--reflow_from TEACHER``, ``genmod.flow.reflow``): the data are
(noise, teacher sample) pairs, the loss uses the stored noise (Liu et al. 2022, Sec. 2.2), and with
``--distill_steps K`` only the K Euler times are trained (Sec. 2.3, a K-step student).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from genmod.core.couplings import brownian_bridge_sample, couple
from genmod.core.loss import flow_matching_loss
from genmod.core.paths import get_path
from genmod.core.time_sampling import get_time_sampler
from genmod.flow.transformer import FlowTransformer
from genmod.flow.unet import FlowUNet
from genmod.train import TrainConfig, register_family, unwrap_model
from genmod.train.config import ConfigError, check_at_least
from genmod.train.image_family import ImageFamily
from genmod.samplers import classifier_free_guidance


@dataclass
class FlowConfig(TrainConfig):
    """Flow-matching options (model size, path, prediction, time sampling, sampling) on top of the trainer's."""

    output_dir: str = "runs/flow"
    # the defaults are a first run that fits about 8 CPU-minutes on the 2-core CPU (docs/RESULTS.md, issue 19:
    # before, 192 x 6 at batch 64 and a constant lr 3e-4 took 18 CPU-minutes for 1000 steps)
    max_steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 32
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    ema_decay: float = 0.999
    # network: a small U-Net (the default: it learns the shapes on a CPU budget, issue 19) or a DiT/SiT transformer
    backbone: Literal["dit", "unet"] = "unet"
    unet_channels: tuple[int, ...] = (32, 64, 64)
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    conditional: bool = True
    # released-model conventions (a SiT import sets them; pass them to fine-tune one with --init_weights)
    learn_sigma: bool = False  # 2C output channels, the first C are the prediction
    time_convention: Literal["genmod", "sit"] = "genmod"  # "sit": 1 - t into the embedder, velocity sign flipped
    guidance_channels: Optional[int] = None  # CFG on the first k channels only (SiT's sampler: 3 of 4)
    # flow matching
    path: Literal["linear", "cosine", "vp"] = "linear"
    prediction: Literal["velocity", "x0", "epsilon"] = "velocity"
    time_sampling: Literal["uniform", "logit_normal", "shifted"] = "logit_normal"
    time_shift: float = 1.0
    # latent space: a saved tokenizers_vq tokenizer folder (None = pixels); with a KL / sigma-VAE tokenizer the model
    # trains on posterior samples, as DiT, SiT, MAR and CausalFusion do (`latent_dist.sample()`); --no-latent_sample: means
    tokenizer: Optional[str] = None
    latent_sample: bool = True
    # previews / exported pipeline defaults
    num_inference_steps: int = 20
    solver: Literal["euler", "midpoint", "heun", "rk4", "dpmsolver++2m"] = "heun"
    guidance_scale: float = 2.0
    # minibatch couplings of noise and data (genmod.core.couplings): OT-CFM / SB-CFM, Tong et al. 2023
    coupling: Literal["independent", "ot", "sinkhorn", "sb"] = "independent"
    coupling_reg: float = 0.05  # entropic regularisation of --coupling sinkhorn (cost ||x0 - eps||^2)
    sb_sigma: float = 0.5  # --coupling sb: bridge noise sigma sqrt(t (1 - t)), plan reg 2 sigma^2
    # reflow / k-step distillation on (noise, teacher sample) pairs (genmod.flow.reflow; Liu et al. 2022)
    reflow_from: Optional[str] = None  # teacher FlowMatchingPipeline folder
    reflow_pairs: int = 4096
    reflow_pairs_dir: Optional[str] = None  # default OUTPUT/reflow_pairs (resumable safetensors shards)
    reflow_num_inference_steps: int = 50  # teacher ODE steps (its saved solver)
    reflow_guidance_scale: float = 1.0  # teacher CFG while making pairs (the student then samples with w = 1)
    distill_steps: int = 0  # K > 0: train only at the K-step Euler times (a K-step student)

    def validate(self) -> None:
        """The trainer's checks, then the network and sampler sizes (one line naming the flag)."""
        super().validate()
        check_at_least(self, 1, "patch_size", "hidden_size", "depth", "num_heads", "num_inference_steps",
                       "guidance_channels")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"--hidden_size: must be a multiple of --num_heads {self.num_heads}, got {self.hidden_size}")
        if not self.unet_channels or min(self.unet_channels) < 1:
            raise ConfigError(f"--unet_channels: must be one or more sizes >= 1, got {self.unet_channels}")
        if not self.mlp_ratio > 0 or not self.time_shift > 0:
            raise ConfigError(f"--mlp_ratio and --time_shift: must be > 0, got {self.mlp_ratio}, {self.time_shift}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ConfigError(f"--class_dropout_prob: must be in [0, 1), got {self.class_dropout_prob}")
        self.validate_pairing()

    def validate_pairing(self) -> None:
        """Couplings, reflow and distillation flags agree with each other and with the path."""
        if not self.coupling_reg > 0 or self.sb_sigma < 0:
            raise ConfigError(f"--coupling_reg / --sb_sigma: expected > 0 / >= 0, got {self.coupling_reg}, {self.sb_sigma}")
        if self.coupling in ("sinkhorn", "sb") and importlib.util.find_spec("ot") is None:
            raise ConfigError(f"--coupling {self.coupling}: needs POT; pip install 'genmod[ot]'")
        if self.coupling == "sb" and (self.path != "linear" or self.prediction != "velocity" or not self.sb_sigma > 0):
            raise ConfigError("--coupling sb: needs --path linear, --prediction velocity and --sb_sigma > 0")
        if self.reflow_from and self.coupling != "independent":
            raise ConfigError(f"--coupling {self.coupling}: reflow pairs are already coupled; use --coupling independent")
        if self.distill_steps < 0 or (self.distill_steps and not self.reflow_from):
            raise ConfigError(f"--distill_steps {self.distill_steps}: expected >= 0, and > 0 only with --reflow_from")
        check_at_least(self, 1, "reflow_pairs", "reflow_num_inference_steps")


class FlowFamily(ImageFamily):
    """Class-conditional (or unconditional) flow matching on images or tokenizer latents."""

    name = "flow"
    config_class = FlowConfig

    def __init__(self, config: FlowConfig):
        super().__init__(config)
        self.path = get_path(config.path)
        kwargs = {"shift": config.time_shift} if config.time_sampling == "shifted" else {}
        self.draw_time = get_time_sampler(config.time_sampling, **kwargs)

    # -- model, loss, sampler --------------------------------------------------------------------
    def build_model(self) -> FlowTransformer | FlowUNet:
        cfg = self.config
        channels, size, num_classes, _ = self.data_shape()
        if cfg.backbone == "unet":
            return FlowUNet(in_channels=channels, sample_size=size, block_out_channels=tuple(cfg.unet_channels),
                            num_classes=num_classes if cfg.conditional else 0,
                            class_dropout_prob=cfg.class_dropout_prob)
        return FlowTransformer(
            in_channels=channels, sample_size=size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            num_classes=num_classes if cfg.conditional else 0, class_dropout_prob=cfg.class_dropout_prob,
            learn_sigma=cfg.learn_sigma, time_convention=cfg.time_convention, guidance_channels=cfg.guidance_channels,
        )

    def build_dataset(self):
        """The configured dataset, or with ``--reflow_from`` the teacher's (noise, sample) pairs (made if missing)."""
        if not self.config.reflow_from:
            return super().build_dataset()
        if self._dataset is None:
            from genmod.flow.reflow import make_reflow_pairs

            self._dataset = make_reflow_pairs(self.config)
        return self._dataset

    def loss(self, model, batch: dict, generator: torch.Generator) -> dict:
        cfg = self.config
        x0 = self.clean_data(batch, generator)
        batch_size = x0.shape[0]
        if cfg.distill_steps:
            from genmod.flow.reflow import distill_times

            t = distill_times(cfg.distill_steps, batch_size, generator, device=x0.device)
        else:
            t = self.draw_time((batch_size,), generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        labels = batch["label"].to(x0.device) if unwrap_model(model).config.num_classes else None
        if "noise" in batch:  # reflow: the teacher's own noise of this sample
            noise = batch["noise"].to(device=x0.device, dtype=x0.dtype)
        elif cfg.coupling != "independent":
            noise = couple(x0, noise, cfg.coupling, cfg.coupling_reg, cfg.sb_sigma, generator, labels)
        if cfg.coupling == "sb":
            z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t, target = brownian_bridge_sample(x0, noise, t, cfg.sb_sigma, z)
            out = model(x_t, 1000 * t, labels, dropout_generator=generator).sample[:, : x0.shape[1]]
            return {"loss": (out.float() - target.float()).pow(2).mean()}
        x_t = self.path.sample(x0, noise, t).x_t
        out = model(x_t, 1000 * t, labels, dropout_generator=generator).sample[:, : x0.shape[1]]  # learn_sigma: first C
        loss = flow_matching_loss(out, x0, noise, t, path=self.path, prediction=cfg.prediction)
        return {"loss": loss}

    def velocity_fn(self, model, labels: Optional[torch.Tensor], guidance_scale: float, guidance_interval=None):
        """``v(x, t)`` of a trained model (converted from its prediction type), with CFG."""
        num_classes = model.config.num_classes

        def model_fn(x, t, y):
            out = model(x, 1000 * t, y).sample[:, : x.shape[1]]
            if self.config.prediction != "velocity":
                out = self.path.convert(out, x, t, src=self.config.prediction, dst="velocity")
            return out

        if labels is None or not num_classes:
            return lambda x, t: model_fn(x, t, None)
        null = torch.full_like(labels, num_classes)
        channels = getattr(model.config, "guidance_channels", None)
        only = {} if channels is None else {"channels": channels}  # guide the first k channels (SiT)
        return classifier_free_guidance(model_fn, labels, null, guidance_scale, guidance_interval, **only)

    @torch.no_grad()
    def sample(self, model, num: int, generator: torch.Generator, labels=None, num_inference_steps=None, solver=None,
               guidance_scale=None) -> torch.Tensor:
        """``num`` images in [-1, 1] (classes cycled unless ``labels``), decoded if in latent space.

        Runs the exported pipeline's own loop (scheduler -> ``genmod.samplers.steppers``), so previews and
        ``genmod sample`` cannot diverge.
        """
        cfg = model.config
        device = next(model.parameters()).device
        if labels is None and cfg.num_classes:
            labels = torch.arange(num, device=device) % cfg.num_classes
        noise = torch.randn((num, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator,
                            device=generator.device).to(device)
        pipe = self.pipeline(model, solver=solver)
        pipe.set_progress_bar_config(disable=True)
        x = pipe(class_labels=labels if cfg.num_classes else None, batch_size=None if cfg.num_classes else num,
                 num_inference_steps=num_inference_steps or self.config.distill_steps or self.config.num_inference_steps,
                 latents=noise, output_type="latent",
                 guidance_scale=self.config.guidance_scale if guidance_scale is None else guidance_scale).images
        return self.decode(x).clamp(-1, 1)

    def pipeline(self, model, solver: Optional[str] = None, id2label: Optional[dict] = None):
        """A ``FlowMatchingPipeline`` whose scheduler steps ``solver`` on this family's path and prediction type.

        A K-step student (``--distill_steps K``) was trained only at the K uniform Euler times: its pipeline
        steps Euler and defaults to K steps (``default_num_inference_steps``)."""
        from genmod.flow.pipeline import FlowMatchingPipeline
        from genmod.flow.scheduler import FlowMatchSolverScheduler

        student = self.config.distill_steps or None
        scheduler = FlowMatchSolverScheduler(solver=solver or ("euler" if student else self.config.solver),
                                             path=self.config.path, prediction_type=self.config.prediction)
        return FlowMatchingPipeline(transformer=model, scheduler=scheduler, vae=self.tokenizer, id2label=id2label,
                                    default_num_inference_steps=student)

    def build_pipeline(self, model):
        """The export: every path x prediction type, with the dataset's class names."""
        _, _, _, class_names = self.data_shape()
        id2label = {i: name for i, name in enumerate(class_names)} if model.config.num_classes else None
        return self.pipeline(model, id2label=id2label)


register_family("flow", FlowFamily)
