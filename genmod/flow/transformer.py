"""FlowTransformer: a DiT / SiT velocity network for images or latents (Peebles & Xie 2023; Ma et al. 2024).

Patchify -> fixed 2D sin-cos positions -> ``depth`` adaLN-Zero blocks conditioned on
``c = TimestepEmbedder(timestep) + LabelEmbedder(class)`` -> adaLN final layer -> unpatchify.
``timestep`` is ``1000 * t`` (t = 1 noise, package convention); the output is whatever the flow
family trains it for (the velocity by default). The null class id ``num_classes`` is the
unconditional input for classifier-free guidance.

``time_convention="sit"`` runs released SiT weights (Ma et al. 2024, Sec. 2: ``x_t = t x + (1 - t) eps``,
t = 0 noise) behind the package boundary: the embedder is fed SiT's raw ``1 - t`` and the first
``in_channels`` outputs (SiT's ``x - eps`` velocity) are negated, so callers still see docs/DESIGN.md §1.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from genmod.nn.attention import check_backend
from genmod.nn.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, check_patch_grid, sincos_2d, unpatchify
from genmod.nn.layers import AdaLNZeroBlock, FinalLayer, dit_init_

TIME_CONVENTIONS = ("genmod", "sit")


class FlowTransformer(ModelMixin, ConfigMixin):
    """DiT-style transformer ``forward(sample [B, C, H, W], timestep [B], class_labels [B]) -> [B, C', H, W]``.

    Args:
        in_channels, sample_size: channels and side of the (square) input the positions are built for;
            other sizes divisible by ``patch_size`` also work (positions are recomputed).
        patch_size, hidden_size, depth, num_heads, mlp_ratio: DiT sizes (DiT-S/2: 384, 12, 6, 4).
        num_classes: 0 = unconditional; otherwise ids ``0..num_classes-1`` plus null id ``num_classes``.
        class_dropout_prob: training-time label dropout for CFG (decided by ``dropout_generator``).
        learn_sigma: DiT's extra ``in_channels`` output channels (a variance; unused by flow matching: the
            pipeline, the scheduler and the loss use the first ``in_channels``).
        time_convention: ``genmod`` (the embedder sees ``timestep = 1000 t``) or ``sit`` (it sees ``1 - t`` and
            the velocity channels are negated: released SiT weights).
        guidance_channels: classifier-free guidance on the first k output channels only (the rest stay
            conditional), as SiT's ``forward_with_cfg`` guides 3 of 4; None = all.
        attention_backend: ``sdpa`` | ``xformers`` | ``math``; qk_norm: None | ``layernorm`` | ``rmsnorm``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AdaLNZeroBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        attention_backend: str = "sdpa",
        qk_norm: str | None = None,
        time_convention: str = "genmod",
        guidance_channels: int | None = None,
    ):
        super().__init__()
        check_patch_grid(in_channels, sample_size, patch_size, hidden_size, depth, num_heads, num_classes)
        check_backend(attention_backend)
        if time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention: expected one of {', '.join(TIME_CONVENTIONS)}, got {time_convention!r}")
        if guidance_channels is not None and not 0 < guidance_channels <= in_channels:
            raise ValueError(f"guidance_channels: must be in [1, {in_channels}] or None, got {guidance_channels}")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size, ndim=2)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        grid = sample_size // patch_size
        self.register_buffer("pos_embed", sincos_2d(grid, grid, hidden_size).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            AdaLNZeroBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, attention_backend=attention_backend)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        dit_init_(self)

    @property
    def null_class_id(self) -> int:
        """Label id of the unconditional (null) class used by classifier-free guidance."""
        return self.config.num_classes

    def _positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        side = self.config.sample_size // self.config.patch_size
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        return sincos_2d(grid_h, grid_w, self.config.hidden_size).unsqueeze(0).to(self.pos_embed.device)

    def _condition(self, timestep, class_labels, batch: int, device, dropout_generator, dtype=None) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=device, dtype=torch.float32)
        if timestep.dim() == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep: expected a scalar or shape ({batch},), got {tuple(timestep.shape)}")
        if self.config.time_convention == "sit":  # SiT's embedder input: raw t_SiT = 1 - t in [0, 1]
            timestep = 1.0 - timestep / 1000.0
        c = self.t_embedder(timestep, dtype)
        if self.y_embedder is None:
            if class_labels is not None:
                raise ValueError("class_labels: this model is unconditional (num_classes=0)")
            return c
        if class_labels is None:  # unconditional request on a conditional model = the null class
            class_labels = torch.full((batch,), self.null_class_id, dtype=torch.long, device=device)
        class_labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels: expected {batch} labels, got shape {tuple(class_labels.shape)}")
        return c + self.y_embedder(class_labels, generator=dropout_generator)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        dropout_generator: torch.Generator | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict for ``sample`` ``[B, C, H, W]`` at network ``timestep = 1000 * t`` (``[B]`` or scalar).

        ``class_labels``: ``[B]`` ids in ``[0, num_classes]`` (``num_classes`` = null); ``None`` on a
        conditional model means unconditional. In training mode labels are dropped to the null id with
        ``class_dropout_prob``, drawn from ``dropout_generator``.
        """
        if sample.dim() != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample: expected [B, {self.config.in_channels}, H, W], got shape {tuple(sample.shape)}")
        batch, _, height, width = sample.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"sample: size {height}x{width} is not divisible by patch_size {p}")
        x = self.x_embedder(sample) + self._positions(height // p, width // p).to(sample.dtype)
        c = self._condition(timestep, class_labels, batch, sample.device, dropout_generator, x.dtype).to(x.dtype)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)
        out = unpatchify(x, p, (height // p, width // p))
        if self.config.time_convention == "sit":  # SiT predicts x - eps; the package velocity is eps - x
            channels = self.config.in_channels
            out = torch.cat([-out[:, :channels], out[:, channels:]], dim=1)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
