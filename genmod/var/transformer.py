"""VARTransformer: next-scale prediction over a multi-scale token pyramid (Tian et al. 2024, Sec. 3.2-3.3, Fig. 4).

Sequence layout (``L = sum_k h_k w_k`` tokens, scales coarse to fine, raster order inside a scale):

* scale 0 = the start (SOS) tokens: class embedding + ``pos_start`` (VAR's ``sos``);
* scale k >= 1 = ``word_embed(f_hat_{k-1} area-downsampled to scale k)``, the teacher-forcing input of
  ``MultiScaleResidualVQ.scales_to_teacher_forcing_inputs`` (sampling builds the same input with
  ``next_autoregressive_input``);
* every token adds a learned absolute position (``pos_1LC``, one per token of every scale) and a
  level embedding of its scale index.

``depth`` blocks of adaLN self-attention conditioned on the class embedding, block-causal by scale
(a token sees its own and all coarser scales, ``genmod.nn.masks.block_mask(..., "block_causal")``);
q/k are l2-normalised with a learned per-head temperature capped at 100 (Sec. 4 "normalised
attention"; ``genmod.nn.Attention(l2_norm_qk=True, qkv_bias="qv")``). An adaLN layer precedes the
linear head over the ``vocab_size`` codes. Sizes follow VAR's depth rule: width ``64 * depth``,
``depth`` heads, MLP ratio 4, drop-path ``0.1 * depth / 24`` (linearly increasing over blocks).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from genmod.nn.attention import Attention, KVCache, check_backend, make_kv_caches
from genmod.nn.checkpointing import checkpoint_block
from genmod.nn.embeddings import LabelEmbedder
from genmod.nn.layers import LayerNormNoAffine, Mlp, drop_path
from genmod.nn.masks import block_ids_from_sizes, block_mask


def parse_scales(scales: Sequence) -> list[tuple[int, int]]:
    """Scales as ``(h, w)`` pairs from ints (square) or pairs; increasing sizes, each >= 1."""
    parsed = []
    for s in scales:
        hw = (int(s), int(s)) if isinstance(s, (int, float)) else tuple(int(v) for v in s)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"scales: each scale must be an int or an (h, w) pair >= 1, got {s!r}")
        parsed.append(hw)
    if not parsed:
        raise ValueError("scales: need at least one scale")
    return parsed


@dataclass
class VARTransformerOutput(BaseOutput):
    """``logits``: ``[B, L, vocab_size]`` over all tokens of all scales."""

    logits: torch.Tensor


class VARBlock(nn.Module):
    """VAR's ``AdaLNSelfAttn`` block (Tian et al. 2024, App. / official ``basic_var.py``).

    ``(g1, g2, s1, s2, b1, b2) = Linear(SiLU(cond))``;
    ``x += drop_path(g1 * attn(LN(x) (1 + s1) + b1))``; ``x += drop_path(g2 * mlp(LN(x) (1 + s2) + b2))``.
    LayerNorm without affine parameters; drop-path draws from the passed generator (trainer rule).
    ``shared_adaln`` (VAR-d36, official ``--saln``): no per-block ``ada_lin``; ``cond`` is the shared
    ``[B, 1, 6, C]`` modulation and the block adds its own learned ``ada_gss [1, 1, 6, C]``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, cond_dim: int, drop_path_prob: float,
                 attention_backend: str, shared_adaln: bool = False):
        super().__init__()
        self.dim = dim
        self.drop_path_prob = drop_path_prob
        self.norm = LayerNormNoAffine(dim)
        self.attn = Attention(dim, num_heads, qkv_bias="qv", l2_norm_qk=True, attention_backend=attention_backend)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act="gelu_tanh")
        if shared_adaln:  # VAR --saln: the transformer's shared_ada_lin output plus this block's offsets
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six ``[B, 1, C]`` adaLN terms: from ``cond [B, D]``, or with shared adaLN from the shared
        ``[B, 1, 6, C]`` terms plus ``ada_gss``."""
        if hasattr(self, "ada_gss"):
            return (self.ada_gss + cond).unbind(2)
        return self.ada_lin(cond).unsqueeze(1).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond)
        h = self.attn(self.norm(x) * (1 + scale1) + shift1, mask=mask, kv_cache=kv_cache)
        x = x + drop_path(h * gamma1, self.drop_path_prob, self.training, generator)
        h = self.mlp(self.norm(x) * (1 + scale2) + shift2)
        return x + drop_path(h * gamma2, self.drop_path_prob, self.training, generator)


class AdaLNBeforeHead(nn.Module):
    """``LN(x) (1 + scale) + shift`` with ``(scale, shift) = Linear(SiLU(cond))`` before VAR's logit head."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = LayerNormNoAffine(dim)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class VARTransformer(ModelMixin, ConfigMixin):
    """Class-conditional next-scale predictor ``forward(class_labels [B], teacher_forcing_inputs [B, L - L0, Cvae]) -> logits [B, L, V]``.

    Args:
        vocab_size, latent_channels: the tokenizer's codebook size V and code dim Cvae.
        scales: the tokenizer's scale schedule, ints (square) or ``[h, w]`` pairs, coarse to fine.
        num_classes: class ids ``0..num_classes-1``; ``num_classes`` is the null class (CFG).
        depth: VAR's single size knob; ``width = 64 * depth``, ``num_heads = depth`` and
            ``drop_path_rate = 0.1 * depth / 24`` unless given explicitly (tiny test models).
        mlp_ratio: 4 in VAR. class_dropout_prob: label -> null probability in training (VAR 0.1).
        init_adaln, init_adaln_gamma, init_head: VAR's init multipliers (``aln``, ``alng``, head x0.02).
        shared_adaln: VAR's shared adaLN (``--saln``, VAR-d36): one ``shared_ada_lin`` = SiLU -> Linear(C, 6C)
            for all blocks, each block adding its own ``ada_gss``; the head's adaLN stays separate.
    """

    _no_split_modules = ["VARBlock"]
    _supports_gradient_checkpointing = True  # blocks through genmod.nn.checkpoint_block (drop-path replayed)

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        scales: Sequence = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        num_classes: int = 1000,
        depth: int = 16,
        width: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        drop_path_rate: float | None = None,
        class_dropout_prob: float = 0.1,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-3,
        init_head: float = 0.02,
        attention_backend: str = "sdpa",
        shared_adaln: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        for name, value in (("vocab_size", vocab_size), ("latent_channels", latent_channels),
                            ("num_classes", num_classes), ("depth", depth)):
            if int(value) <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")
        width = 64 * depth if width is None else width
        num_heads = depth if num_heads is None else num_heads
        drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        if width % num_heads:
            raise ValueError(f"width: {width} is not divisible by num_heads {num_heads}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate: must be in [0, 1), got {drop_path_rate}")
        check_backend(attention_backend)
        self.scale_sizes = parse_scales(scales)
        self.tokens_per_scale = [h * w for h, w in self.scale_sizes]
        self.num_tokens = sum(self.tokens_per_scale)
        self.first_tokens = self.tokens_per_scale[0]
        self.scale_starts = [sum(self.tokens_per_scale[:k]) for k in range(len(self.scale_sizes) + 1)]
        self.width = width

        self.word_embed = nn.Linear(latent_channels, width)
        self.class_embed = LabelEmbedder(num_classes, width, class_dropout_prob)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_tokens, width))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_tokens, width))  # VAR's pos_1LC
        self.level_embed = nn.Embedding(len(self.scale_sizes), width)
        self.register_buffer("block_ids", block_ids_from_sizes(self.tokens_per_scale), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        if shared_adaln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.blocks = nn.ModuleList(VARBlock(width, num_heads, mlp_ratio, width, rates[i], attention_backend, shared_adaln)
                                    for i in range(depth))
        self.head_norm = AdaLNBeforeHead(width, width)
        self.head = nn.Linear(width, vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        """VAR ``init_weights``: trunc-normal std sqrt(1/(3C)) for linears, embeddings and positions;
        head x ``init_head``; adaLN scale/shift rows x ``init_adaln``, gamma rows x ``init_adaln_gamma``;
        attention output and fc2 / sqrt(2 depth)."""
        cfg = self.config
        std = math.sqrt(1 / (3 * self.width))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_embed):
            nn.init.trunc_normal_(p, std=std)
        with torch.no_grad():
            self.head.weight.mul_(cfg.init_head)
            self.head_norm.ada_lin[1].weight.mul_(cfg.init_adaln)
            for block in self.blocks:
                block.attn.to_out.weight.div_(math.sqrt(2 * cfg.depth))
                block.mlp.fc2.weight.div_(math.sqrt(2 * cfg.depth))
                if cfg.shared_adaln:  # ada_gss [1, 1, 6, C]: gammas are the first two of the six
                    block.ada_gss[:, :, 2:].mul_(cfg.init_adaln)
                    block.ada_gss[:, :, :2].mul_(cfg.init_adaln_gamma)
                    continue
                weight = block.ada_lin[1].weight
                weight[2 * self.width:].mul_(cfg.init_adaln)
                weight[:2 * self.width].mul_(cfg.init_adaln_gamma)

    # ------------------------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.scale_sizes)

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def attention_mask(self, num_tokens: int | None = None) -> torch.Tensor:
        """Boolean ``[n, n]`` block-causal mask by scale over the first ``n`` tokens (True = may attend)."""
        ids = self.block_ids[: num_tokens or self.num_tokens]
        return block_mask(ids, ids, "block_causal")

    def condition(self, class_labels: torch.Tensor, dropout_generator: torch.Generator | None = None) -> torch.Tensor:
        """Class embedding ``[B, C]`` (null id = unconditional); labels dropped in training via the generator.

        The first activation, in the model's compute dtype (``self.dtype``: the compute dtype under layerwise
        casting, where the embedding table keeps its storage dtype); every later cast follows the activations."""
        return self.class_embed(class_labels, generator=dropout_generator).to(self.dtype)

    def embed_scale(self, k: int, cond: torch.Tensor, scale_input: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of scale ``k``: SOS for k = 0, else ``word_embed(scale_input [B, h_k w_k, Cvae])``;
        plus the scale's positions and level embedding."""
        start, end = self.scale_starts[k], self.scale_starts[k + 1]
        if k == 0:
            x = cond.unsqueeze(1) + self.pos_start.to(cond.dtype)
        else:
            if scale_input is None or scale_input.shape[1:] != (end - start, self.config.latent_channels):
                got = None if scale_input is None else tuple(scale_input.shape)
                raise ValueError(f"scale_input: scale {k} needs [B, {end - start}, {self.config.latent_channels}], got {got}")
            x = self.word_embed(scale_input.to(cond.dtype))
        return x + self.pos_embed[:, start:end].to(x.dtype) + self.level_embed(self.block_ids[start:end]).to(x.dtype)

    def embed_sequence(self, cond: torch.Tensor, teacher_forcing_inputs: torch.Tensor | None, num_scales: int | None = None) -> torch.Tensor:
        """Embeddings of the first ``num_scales`` scales from the concatenated inputs of scales 1..K-1."""
        num_scales = self.num_scales if num_scales is None else num_scales
        parts = [self.embed_scale(0, cond)]
        for k in range(1, num_scales):
            lo, hi = self.scale_starts[k] - self.first_tokens, self.scale_starts[k + 1] - self.first_tokens
            parts.append(self.embed_scale(k, cond, teacher_forcing_inputs[:, lo:hi]))
        return torch.cat(parts, dim=1)

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor, kv_caches: list[KVCache] | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Blocks and head on token embeddings ``x`` -> logits ``[B, n, V]``.

        Without caches ``x`` is a prefix of whole scales (block-causal mask). With caches ``x`` is the
        next scale's tokens; it sees every cached (coarser) token and its own scale, so no mask is needed.
        """
        mask = None
        if kv_caches is None:
            if x.shape[1] not in self.scale_starts[1:]:
                raise ValueError(f"x: {x.shape[1]} tokens is not a prefix of whole scales {self.scale_starts[1:]}")
            mask = self.attention_mask(x.shape[1])
        elif len(kv_caches) != len(self.blocks):
            raise ValueError(f"kv_caches: need {len(self.blocks)} caches (one per block), got {len(kv_caches)}")
        block_cond = cond
        if self.config.shared_adaln:
            block_cond = self.shared_ada_lin(cond).view(-1, 1, 6, self.width)
        for i, block in enumerate(self.blocks):
            cache = None if kv_caches is None else kv_caches[i]
            x = checkpoint_block(self.gradient_checkpointing and cache is None,
                                 functools.partial(block, mask=mask, kv_cache=cache, generator=generator), x, block_cond,
                                 generator=generator)
        return self.head(self.head_norm(x, cond)).float()

    def forward(
        self,
        class_labels: torch.Tensor,
        teacher_forcing_inputs: torch.Tensor,
        return_dict: bool = True,
        dropout_generator: torch.Generator | None = None,
    ) -> VARTransformerOutput | tuple[torch.Tensor]:
        """Teacher-forced logits over all scales (the training forward, VAR ``forward``).

        ``class_labels``: ``[B]`` ids in ``[0, num_classes]``; in training mode each is dropped to the
        null id with ``class_dropout_prob`` and drop-path is applied, both drawn from ``dropout_generator``.
        ``teacher_forcing_inputs``: ``[B, L - L0, latent_channels]``.
        """
        expected = (self.num_tokens - self.first_tokens, self.config.latent_channels)
        if teacher_forcing_inputs.dim() != 3 or tuple(teacher_forcing_inputs.shape[1:]) != expected:
            raise ValueError(f"teacher_forcing_inputs: expected [B, {expected[0]}, {expected[1]}], got {tuple(teacher_forcing_inputs.shape)}")
        labels = torch.as_tensor(class_labels, device=teacher_forcing_inputs.device).long().reshape(-1)
        if labels.shape[0] != teacher_forcing_inputs.shape[0]:
            raise ValueError(f"class_labels: expected {teacher_forcing_inputs.shape[0]} labels, got {labels.shape[0]}")
        cond = self.condition(labels, dropout_generator)
        x = self.embed_sequence(cond, teacher_forcing_inputs)
        logits = self.run_blocks(x, cond, generator=dropout_generator)
        return VARTransformerOutput(logits=logits) if return_dict else (logits,)

    def new_kv_caches(self) -> list[KVCache]:
        """One empty KV cache per block, for scale-by-scale sampling."""
        return make_kv_caches(len(self.blocks))


def var_loss(logits: torch.Tensor, indices: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """VAR's training loss: token cross-entropy averaged with uniform weights 1/L over all tokens of all
    scales (``loss_weight = 1/L``; no per-scale re-weighting), then over the batch."""
    return F.cross_entropy(logits.flatten(0, 1).float(), indices.flatten().long(), label_smoothing=label_smoothing)
