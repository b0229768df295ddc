"""DiffusionForcingTransformer: a frame-causal DiT with one noise level per frame (Chen et al. 2024).

Diffusion Forcing (Sec. 3.1-3.2) trains a causal sequence model whose every token carries its own
noise level ``k_t``. The paper's model is an RNN; here it is a transformer (as the issue asks):

* a frame is ``[C, H, W]`` (video, patchified into ``(H/p) (W/p)`` tokens with fixed 2D sin-cos
  positions) or a ``[D]`` vector (sequences, one token per frame);
* attention is **block-causal over frames** (``genmod.nn.masks.block_mask``, block id = frame):
  patches of a frame see each other, a frame sees only earlier frames, so future frames never change
  past outputs; ``causal=False`` attends over the whole window instead (DFoT, Song et al. 2025);
* time enters as 1D rotary positions over the frame index (RoFormer), so a score depends only on the
  frame offset: a sliding window or a KV cache of earlier frames needs no re-indexing;
* each frame's condition ``c_t = TimestepEmbedder(1000 t_t) [+ label] [+ Linear(action_t)]``
  modulates its tokens through adaLN-Zero (DiT), i.e. ``timestep`` is ``[B, T]``.

``kv_caches`` (one ``genmod.nn.KVCache`` per block) hold the keys/values of earlier (clean) frames;
``update_cache=True`` appends the frames of this call. ``history_cut`` (``[B]``) hides frames
``< cut`` from frames ``>= cut`` (history dropped, for history guidance of the "drop" kind).
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from genmod.nn.attention import KVCache, check_backend, make_kv_caches
from genmod.nn.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, rope_frequencies, sincos_2d, unpatchify
from genmod.nn.layers import AdaLNZeroBlock, FinalLayer, dit_init_
from genmod.nn.masks import block_mask

MODALITIES = ("video", "sequence")


def _check_sizes(modality, in_channels, sample_size, patch_size, hidden_size, depth, num_heads, max_frames,
                 num_classes, action_dim) -> None:
    """One-line errors for sizes the transformer cannot be built with."""
    if modality not in MODALITIES:
        raise ValueError(f"modality: expected one of {', '.join(MODALITIES)}, got {modality!r}")
    for name, value in (("in_channels", in_channels), ("hidden_size", hidden_size), ("depth", depth),
                        ("num_heads", num_heads), ("max_frames", max_frames)):
        if int(value) <= 0:
            raise ValueError(f"{name}: must be positive, got {value}")
    if modality == "video":
        if sample_size <= 0 or patch_size <= 0 or sample_size % patch_size:
            raise ValueError(f"sample_size: {sample_size} must be positive and divisible by patch_size {patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size: must be divisible by 4 for 2D sin-cos positions, got {hidden_size}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"num_heads: hidden_size {hidden_size} / num_heads {num_heads} must be an even head size")
    if num_classes < 0 or action_dim < 0:
        raise ValueError(f"num_classes/action_dim: must be >= 0, got {num_classes}, {action_dim}")


class DiffusionForcingTransformer(ModelMixin, ConfigMixin):
    """``forward(sample [B, T, C, H, W] | [B, T, D], timestep [B, T], ...) -> same shape``.

    Args:
        modality: ``video`` (frames ``[C, H, W]``) or ``sequence`` (frames ``[D]``, ``D = in_channels``).
        in_channels, sample_size, patch_size: frame channels, square side and patch side (video).
        hidden_size, depth, num_heads, mlp_ratio: transformer sizes.
        max_frames: the training clip length; samplers use it as the attention window.
        num_classes: 0 = no labels; else ids ``0..num_classes-1`` plus the null id ``num_classes``.
        class_dropout_prob: label dropout for classifier-free guidance (training).
        action_dim: 0 = no actions; else per-frame actions ``[B, T, action_dim]``.
        rope_base: base of the temporal rotary positions.
        attention_backend: ``sdpa`` | ``xformers`` | ``math``; qk_norm: None | ``layernorm`` | ``rmsnorm``.
        causal: ``True`` block-causal over frames (DF v1.5 video); ``False`` full attention over the window
            (DFoT's default and the DF planning transformer), where every frame sees every other frame.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AdaLNZeroBlock"]

    @register_to_config
    def __init__(
        self,
        modality: str = "video",
        in_channels: int = 3,
        sample_size: int = 16,
        patch_size: int = 4,
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        max_frames: int = 8,
        num_classes: int = 0,
        class_dropout_prob: float = 0.0,
        action_dim: int = 0,
        rope_base: float = 10000.0,
        attention_backend: str = "sdpa",
        qk_norm: str | None = None,
        causal: bool = True,
    ):
        super().__init__()
        _check_sizes(modality, in_channels, sample_size, patch_size, hidden_size, depth, num_heads, max_frames,
                     num_classes, action_dim)
        check_backend(attention_backend)
        self.gradient_checkpointing = False
        self.head_dim = hidden_size // num_heads

        if modality == "video":
            self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size, ndim=2)
            grid = sample_size // patch_size
            self.register_buffer("pos_embed", sincos_2d(grid, grid, hidden_size).unsqueeze(0), persistent=False)
            out_dim = patch_size * patch_size * in_channels
        else:
            self.x_embedder = nn.Linear(in_channels, hidden_size)
            self.register_buffer("pos_embed", torch.zeros(1, 1, hidden_size), persistent=False)
            out_dim = in_channels
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.action_embedder = nn.Linear(action_dim, hidden_size) if action_dim > 0 else None
        self.blocks = nn.ModuleList(
            AdaLNZeroBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, attention_backend=attention_backend)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, out_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        dit_init_(self)

    # ------------------------------------------------------------------------------------------
    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Shape of one frame: ``(C, H, W)`` for video, ``(D,)`` for sequences."""
        cfg = self.config
        if cfg.modality == "video":
            return (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        return (cfg.in_channels,)

    @property
    def tokens_per_frame(self) -> int:
        cfg = self.config
        return (cfg.sample_size // cfg.patch_size) ** 2 if cfg.modality == "video" else 1

    def make_kv_caches(self) -> list[KVCache]:
        """One empty cache per block, for ``forward(..., kv_caches=...)``."""
        return make_kv_caches(len(self.blocks))

    def _embed_frames(self, sample: torch.Tensor) -> torch.Tensor:
        batch, frames = sample.shape[:2]
        if self.config.modality == "video":
            tokens = self.x_embedder(sample.flatten(0, 1)) + self.pos_embed.to(sample.dtype)
            return tokens.reshape(batch, frames * self.tokens_per_frame, -1)
        return self.x_embedder(sample)

    def _frame_condition(self, timestep, class_labels, actions, batch, frames, device, dropout_generator, dtype=None):
        timestep = torch.as_tensor(timestep, device=device, dtype=torch.float32)
        if timestep.dim() == 0:
            timestep = timestep.expand(batch, frames)
        elif timestep.dim() == 1 and timestep.shape[0] == batch:
            timestep = timestep[:, None].expand(batch, frames)
        if timestep.shape != (batch, frames):
            raise ValueError(f"timestep: expected per-frame levels of shape ({batch}, {frames}), got {tuple(timestep.shape)}")
        c = self.t_embedder(timestep, dtype)  # [B, T, D], in the activations' dtype
        if self.y_embedder is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.null_class_id, dtype=torch.long, device=device)
            class_labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            if class_labels.shape != (batch,):
                raise ValueError(f"class_labels: expected {batch} labels, got shape {tuple(class_labels.shape)}")
            c = c + self.y_embedder(class_labels, generator=dropout_generator)[:, None]
        elif class_labels is not None:
            raise ValueError("class_labels: this model has no classes (num_classes=0)")
        if self.action_embedder is not None:
            if actions is None:
                raise ValueError(f"actions: this model needs per-frame actions [B, T, {self.config.action_dim}]")
            if actions.shape != (batch, frames, self.config.action_dim):
                raise ValueError(f"actions: expected shape {(batch, frames, self.config.action_dim)}, got {tuple(actions.shape)}")
            c = c + self.action_embedder(actions.to(c.dtype))
        elif actions is not None:
            raise ValueError("actions: this model takes no actions (action_dim=0)")
        return c

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        frame_offset: int = 0,
        kv_caches: list[KVCache] | None = None,
        update_cache: bool = False,
        history_cut: torch.Tensor | None = None,
        return_dict: bool = True,
        dropout_generator: torch.Generator | None = None,
    ):
        """Predict every frame of ``sample`` given its per-frame ``timestep = 1000 * t`` ``[B, T]``.

        ``frame_offset``: temporal position of the first frame (the frames in ``kv_caches`` come just
        before it). ``history_cut`` ``[B]``: frames at positions ``< cut`` are invisible to frames ``>= cut``.
        """
        expected = self.frame_shape
        if sample.dim() != 2 + len(expected) or tuple(sample.shape[2:]) != expected:
            raise ValueError(f"sample: expected [B, T, {', '.join(map(str, expected))}], got shape {tuple(sample.shape)}")
        batch, frames = sample.shape[:2]
        device, per = sample.device, self.tokens_per_frame
        x = self._embed_frames(sample)
        c = self._frame_condition(timestep, class_labels, actions, batch, frames, device, dropout_generator,
                                  x.dtype).to(x.dtype)
        c = c.repeat_interleave(per, dim=1)  # per-token modulation [B, T * P, D]

        cached_frames = 0 if not kv_caches else len(kv_caches[0]) // per
        q_frames = torch.arange(frame_offset, frame_offset + frames, device=device)
        k_frames = torch.arange(frame_offset - cached_frames, frame_offset + frames, device=device)
        q_ids, k_ids = q_frames.repeat_interleave(per), k_frames.repeat_interleave(per)
        mask = block_mask(q_ids, k_ids, "block_causal" if self.config.causal else "full")
        if history_cut is not None:
            cut = torch.as_tensor(history_cut, device=device).long().reshape(-1, 1, 1)
            mask = mask & ((k_ids[None, None, :] >= cut) | (q_ids[None, :, None] < cut))
        rope = rope_frequencies(q_ids, self.head_dim, base=self.config.rope_base)
        if kv_caches is not None and len(kv_caches) != len(self.blocks):
            raise ValueError(f"kv_caches: expected {len(self.blocks)} caches (one per block), got {len(kv_caches)}")
        for i, block in enumerate(self.blocks):
            cache = kv_caches[i] if kv_caches is not None else None
            if torch.is_grad_enabled() and self.gradient_checkpointing and cache is None:
                x = self._gradient_checkpointing_func(block, x, c, mask, rope)
            else:
                x = block(x, c, mask=mask, rope=rope, kv_cache=cache, update_cache=update_cache)
        x = self.final_layer(x, c)
        if self.config.modality == "video":
            p, side = self.config.patch_size, self.config.sample_size // self.config.patch_size
            out = unpatchify(x.reshape(batch * frames, per, -1), p, (side, side)).reshape(sample.shape)
        else:
            out = x
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
