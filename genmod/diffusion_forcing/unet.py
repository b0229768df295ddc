"""DiffusionForcingUNet: a frame-causal video U-Net with one noise level per frame (Chen et al. 2024).

Diffusion Forcing (Sec. 3) needs a causal sequence model whose every frame carries its own noise
level. ``DiffusionForcingTransformer`` is one; this is the same model with a convolutional backbone,
because at CPU budgets a patch-4 DiT learns the appearance of the shapes far too slowly (its rollouts
fade, docs/RESULTS.md) while a conv U-Net learns it in ~1500 steps on still images. It is a video
diffusion U-Net factorised into space and time (VDM, Ho et al. 2022), made causal over frames:

* **space**: every frame goes through a 2D U-Net on its own (the frames are folded into the batch):
  diffusers ``ResnetBlock2D`` blocks with conv down/up sampling and skip connections. GroupNorm
  normalises one frame at a time, so no statistics cross frames;
* **per-frame conditioning**: each frame's ``c_t = TimestepEmbedder(1000 t_t) [+ label] [+ action]``
  (the transformer's embedders) modulates that frame's ResNet blocks by adaGN / FiLM
  (``GroupNorm(h) (1 + scale) + shift``, ADM's scale-shift norm);
* **time**: at the levels in ``temporal_attention_levels`` (and in the middle block) every spatial
  location attends over frames with a **causal** mask (a frame sees itself and earlier frames only)
  and 1D rotary positions over the frame index, so scores depend on frame offsets only. These are the
  only layers that mix frames, so future frames never change past outputs (``causal=False``: full
  attention over the window, DFoT's non-causal mode).

The temporal layers use ``genmod.nn.attention.Attention`` with the clean-context KV cache exactly
like the transformer: ``make_kv_caches()`` gives one ``KVCache`` per temporal layer, holding the
rotated keys/values of earlier frames (batch ``B * h * w``, one token per frame, hence
``tokens_per_frame == 1``); ``update_cache=True`` appends this call's frames; ``history_cut`` ``[B]``
hides frames ``< cut`` from frames ``>= cut``. Same ``forward`` signature and output as the transformer,
so the loss, samplers, pipeline and benchmark use either.
"""

from __future__ import annotations

import functools

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from genmod.diffusion_forcing.transformer import DiffusionForcingTransformer
from genmod.nn.attention import Attention, KVCache, check_backend, make_kv_caches
from genmod.nn.checkpointing import checkpoint_block
from genmod.nn.embeddings import LabelEmbedder, TimestepEmbedder, rope_frequencies
from genmod.nn.masks import block_mask


class CausalTemporalAttention(nn.Module):
    """Residual self-attention over frames at every spatial location: ``[B*T, C, h, w] -> same``."""

    def __init__(self, channels: int, head_dim: int, attention_backend: str = "sdpa"):
        super().__init__()
        # LayerNorm over channels per (frame, location): a GroupNorm over time would leak the future
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, channels // head_dim, attention_backend=attention_backend)
        nn.init.zeros_(self.attn.to_out.weight)  # starts as the identity: a per-frame image U-Net
        nn.init.zeros_(self.attn.to_out.bias)

    def forward(self, h, frames: int, mask, rope, kv_cache: KVCache | None, update_cache: bool) -> torch.Tensor:
        bt, c, height, width = h.shape
        batch, loc = bt // frames, height * width
        x = h.reshape(batch, frames, c, loc).permute(0, 3, 1, 2).reshape(batch * loc, frames, c)
        if mask is not None and mask.dim() == 3:  # per-sample mask [B, Lq, Lk] -> per sequence [B * h * w, ...]
            mask = mask.repeat_interleave(loc, dim=0)
        x = self.attn(self.norm(x), mask=mask, rope=rope, kv_cache=kv_cache, update_cache=update_cache)
        x = x.reshape(batch, loc, frames, c).permute(0, 2, 3, 1).reshape(bt, c, height, width)
        return h + x


def _check_unet_config(*, modality, in_channels, sample_size, block_out_channels, layers_per_block,
                       temporal_attention_levels, attention_head_dim, norm_num_groups, max_frames, num_classes,
                       action_dim, attention_backend) -> tuple[list[int], list[int]]:
    """Validate a ``DiffusionForcingUNet`` config; returns the level widths and the attention level indices."""
    if modality != "video":
        raise ValueError(f"modality: DiffusionForcingUNet models video frames only, got {modality!r} "
                         "(use DiffusionForcingTransformer for sequences)")
    channels = [int(c) for c in block_out_channels]
    levels = len(channels)
    if levels < 1 or any(c <= 0 for c in channels):
        raise ValueError(f"block_out_channels: need at least one positive width, got {block_out_channels}")
    if sample_size <= 0 or sample_size % 2 ** (levels - 1):
        raise ValueError(f"sample_size: {sample_size} is not divisible by 2^{levels - 1} ({levels} levels)")
    for name, value in (("in_channels", in_channels), ("layers_per_block", layers_per_block),
                        ("max_frames", max_frames), ("attention_head_dim", attention_head_dim)):
        if int(value) <= 0:
            raise ValueError(f"{name}: must be positive, got {value}")
    if attention_head_dim % 2:
        raise ValueError(f"attention_head_dim: must be even for rotary positions, got {attention_head_dim}")
    attn_levels = sorted({int(i) for i in temporal_attention_levels})
    if any(not 0 <= i < levels for i in attn_levels):
        raise ValueError(f"temporal_attention_levels: indices must be in [0, {levels}), got {temporal_attention_levels}")
    for i in attn_levels + [levels - 1]:
        if channels[i] % attention_head_dim:
            raise ValueError(f"attention_head_dim: {attention_head_dim} does not divide level {i}'s {channels[i]} channels")
    if any(c % norm_num_groups for c in channels):
        raise ValueError(f"norm_num_groups: {norm_num_groups} does not divide every width in {block_out_channels}")
    if num_classes < 0 or action_dim < 0:
        raise ValueError(f"num_classes/action_dim: must be >= 0, got {num_classes}, {action_dim}")
    check_backend(attention_backend)
    return channels, attn_levels


class _BlockFactory:
    """Builds the U-Net's two block kinds with the shared widths: adaGN ResNet blocks and causal temporal attention."""

    def __init__(self, cond_dim: int, groups: int, head_dim: int, backend: str):
        self.cond_dim, self.groups, self.head_dim, self.backend = cond_dim, groups, head_dim, backend

    def resnet(self, cin: int, cout: int) -> ResnetBlock2D:
        return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=self.cond_dim, groups=self.groups,
                             time_embedding_norm="scale_shift")

    def temporal(self, channels: int) -> CausalTemporalAttention:
        return CausalTemporalAttention(channels, self.head_dim, self.backend)


def _down_levels(make: _BlockFactory, channels, attn_levels, layers_per_block) -> tuple[nn.ModuleList, list[int]]:
    """Per level ``[resnet, (temporal)] x layers_per_block`` then a downsampler (not at the last level);
    also returns the channel count of every skip connection, in push order."""
    down, skips, cin = nn.ModuleList(), [channels[0]], channels[0]
    for i, c in enumerate(channels):
        level = nn.ModuleList()
        for _ in range(layers_per_block):
            level.append(make.resnet(cin, c))
            if i in attn_levels:
                level.append(make.temporal(c))
            cin = c
            skips.append(c)
        if i < len(channels) - 1:
            level.append(Downsample2D(c, use_conv=True, name="op"))  # "conv" would register the conv twice
            skips.append(c)
        down.append(level)
    return down, skips


def _up_levels(make: _BlockFactory, channels, attn_levels, layers_per_block, skips: list[int]) -> nn.ModuleList:
    """Per level ``[resnet(concat skip), (temporal)] x (layers_per_block + 1)`` then an upsampler (not at level 0)."""
    up, cin = nn.ModuleList(), channels[-1]
    for i, c in reversed(list(enumerate(channels))):
        level = nn.ModuleList()
        for _ in range(layers_per_block + 1):
            level.append(make.resnet(cin + skips.pop(), c))
            if i in attn_levels:
                level.append(make.temporal(c))
            cin = c
        if i > 0:
            level.append(Upsample2D(c, use_conv=True))
        up.append(level)
    return up


def _temporal_mask(frame_offset: int, frames: int, cached: int, history_cut, batch: int, device, causal: bool = True):
    """Frame-causal mask ``[Lq, Lk]`` (or ``[B, Lq, Lk]`` with ``history_cut``) over ``cached`` earlier frames
    and this call's frames, one token per frame; returns it and the query frame ids."""
    q_ids = torch.arange(frame_offset, frame_offset + frames, device=device)
    k_ids = torch.arange(frame_offset - cached, frame_offset + frames, device=device)
    mask = block_mask(q_ids, k_ids, "block_causal" if causal else "full")
    if history_cut is not None:  # frames < cut are invisible to frames >= cut
        cut = torch.as_tensor(history_cut, device=device).long().reshape(-1, 1, 1)
        if cut.shape[0] != batch:
            raise ValueError(f"history_cut: expected {batch} cut positions, got {cut.shape[0]}")
        mask = mask & ((k_ids[None, None, :] >= cut) | (q_ids[None, :, None] < cut))
    return mask, q_ids


class DiffusionForcingUNet(ModelMixin, ConfigMixin):
    """``forward(sample [B, T, C, H, W], timestep [B, T], ...) -> [B, T, C, H, W]`` (video only).

    Args:
        in_channels, sample_size: frame channels and square side.
        block_out_channels: channels per resolution (one 2x downsampling between consecutive levels).
        layers_per_block: ResNet blocks per level on the way down (one more on the way up).
        temporal_attention_levels: level indices (0 = full resolution) with causal temporal attention
            after every ResNet block; the middle block always has one.
        attention_head_dim: channels per temporal-attention head (must divide the level's channels).
        norm_num_groups: GroupNorm groups.
        max_frames: the training clip length; samplers use it as the attention window.
        num_classes: 0 = no labels; else ids ``0..num_classes-1`` plus the null id ``num_classes``.
        class_dropout_prob: label dropout for classifier-free guidance (training).
        action_dim: 0 = no actions; else per-frame actions ``[B, T, action_dim]``.
        rope_base: base of the temporal rotary positions; attention_backend: ``sdpa`` | ``xformers`` | ``math``.
        modality: only ``video`` (kept so code that reads ``config.modality`` treats both backbones alike).
        causal: ``True`` causal temporal attention (DF v1.5); ``False`` full attention over the window (DFoT).
    """

    _supports_gradient_checkpointing = True  # resnets and temporal attention through genmod.nn.checkpoint_block

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 16,
        block_out_channels: tuple = (32, 64, 64),
        layers_per_block: int = 1,
        temporal_attention_levels: tuple = (1, 2),
        attention_head_dim: int = 32,
        norm_num_groups: int = 8,
        max_frames: int = 8,
        num_classes: int = 0,
        class_dropout_prob: float = 0.0,
        action_dim: int = 0,
        rope_base: float = 10000.0,
        attention_backend: str = "sdpa",
        modality: str = "video",
        causal: bool = True,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        channels, attn_levels = _check_unet_config(
            modality=modality, in_channels=in_channels, sample_size=sample_size, block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, temporal_attention_levels=temporal_attention_levels,
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, max_frames=max_frames,
            num_classes=num_classes, action_dim=action_dim, attention_backend=attention_backend,
        )
        # per-frame condition c_t = t-embedding [+ label] [+ action], as in the transformer
        cond_dim = 4 * channels[0]  # ADM's time-embedding width
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = LabelEmbedder(num_classes, cond_dim, class_dropout_prob) if num_classes > 0 else None
        self.action_embedder = nn.Linear(action_dim, cond_dim) if action_dim > 0 else None
        make = _BlockFactory(cond_dim, norm_num_groups, attention_head_dim, attention_backend)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down, skips = _down_levels(make, channels, attn_levels, layers_per_block)
        cin = channels[-1]
        self.mid = nn.ModuleList([make.resnet(cin, cin), make.temporal(cin), make.resnet(cin, cin)])
        self.up = _up_levels(make, channels, attn_levels, layers_per_block, skips)
        self.norm_out = nn.GroupNorm(norm_num_groups, channels[0])
        self.conv_out = nn.Conv2d(channels[0], in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # ------------------------------------------------------------------------------------------
    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def temporal_layers(self) -> list[CausalTemporalAttention]:
        """The frame-mixing layers in call order (down, middle, up): cache ``i`` belongs to layer ``i``."""
        return [m for m in self.modules() if isinstance(m, CausalTemporalAttention)]

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return (self.config.in_channels, self.config.sample_size, self.config.sample_size)

    @property
    def tokens_per_frame(self) -> int:
        """Cache entries per frame: temporal attention caches one token per frame (and location, in the batch)."""
        return 1

    def make_kv_caches(self) -> list[KVCache]:
        """One empty cache per temporal-attention layer, for ``forward(..., kv_caches=...)``."""
        return make_kv_caches(len(self.temporal_layers))

    # the per-frame condition c_t [B, T, D] is built exactly as in the transformer (same embedders, same checks)
    _frame_condition = DiffusionForcingTransformer._frame_condition

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
        if sample.dim() != 5 or tuple(sample.shape[2:]) != expected:
            raise ValueError(f"sample: expected [B, T, {', '.join(map(str, expected))}], got shape {tuple(sample.shape)}")
        batch, frames = sample.shape[:2]
        layers = self.temporal_layers
        if kv_caches is not None and len(kv_caches) != len(layers):
            raise ValueError(f"kv_caches: expected {len(layers)} caches (one per temporal-attention layer), got {len(kv_caches)}")
        # 1. per-frame condition c_t [B * T, D]: frame t of clip b is image b * T + t
        cond = self._frame_condition(timestep, class_labels, actions, batch, frames, sample.device, dropout_generator,
                                     sample.dtype)
        cond = cond.to(sample.dtype).flatten(0, 1)
        # 2. frame-causal mask over cached + current frames, and the rotary positions of the current frames
        cached = len(kv_caches[0]) if kv_caches else 0
        mask, q_ids = _temporal_mask(frame_offset, frames, cached, history_cut, batch, sample.device, self.config.causal)
        rope = rope_frequencies(q_ids, self.config.attention_head_dim, base=self.config.rope_base)  # all levels share it
        caches = iter(kv_caches if kv_caches is not None else [None] * len(layers))

        def run(module, h):  # resnets and attention recomputed in backward under gradient checkpointing
            if isinstance(module, ResnetBlock2D):
                return checkpoint_block(self.gradient_checkpointing, module, h, cond)
            if isinstance(module, CausalTemporalAttention):
                cache = next(caches)
                return checkpoint_block(self.gradient_checkpointing and cache is None, functools.partial(
                    module, frames=frames, mask=mask, rope=rope, kv_cache=cache, update_cache=update_cache), h)
            return module(h)  # down/up sampler

        # 3. the U-Net over all frames folded into the batch
        h, skips = self._down(self.conv_in(sample.flatten(0, 1)), run)
        for module in self.mid:
            h = run(module, h)
        h = self._up(h, skips, run)
        out = self.conv_out(nn.functional.silu(self.norm_out(h))).reshape(sample.shape)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _down(self, h: torch.Tensor, run) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder levels; returns the features and the skips (one per resnet(+attention) and downsampler)."""
        skips = [h]
        for level in self.down:
            for module in level:
                h = run(module, h)
                if isinstance(module, CausalTemporalAttention):
                    skips[-1] = h  # the skip is the output of the resnet + attention pair
                else:
                    skips.append(h)
        return h, skips

    def _up(self, h: torch.Tensor, skips: list[torch.Tensor], run) -> torch.Tensor:
        """Decoder levels: every resnet takes the last unused skip concatenated on channels."""
        for level in self.up:
            for module in level:
                if isinstance(module, ResnetBlock2D):
                    h = torch.cat([h, skips.pop()], dim=1)
                h = run(module, h)
        return h
