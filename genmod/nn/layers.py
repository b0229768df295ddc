"""Transformer layers shared by the families: norms, MLPs, adaLN-Zero (DiT), pre-norm (LLaMA) blocks,
the final adaLN layer and the per-token MLP diffusion head (MAR / LatentLM).

Conditioning vectors ``c`` may be per sample ``[B, D]`` or per token ``[B, N, D]`` (Diffusion
Forcing gives every frame its own noise level), everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genmod.nn.attention import Attention, KVCache
from genmod.nn.embeddings import PatchEmbed, TimestepEmbedder
from genmod.nn.norms import RMSNorm, make_norm

__all__ = [
    "RMSNorm", "LayerNormNoAffine", "make_norm", "Mlp", "SwiGLU", "swiglu_hidden_size", "make_mlp", "modulate",
    "drop_path", "DropPath", "AdaLNZeroBlock", "PreNormBlock", "CausalBlock", "FinalLayer", "DiffusionHead",
    "xavier_init_", "fused_xavier_",
]


class LayerNormNoAffine(nn.LayerNorm):
    """LayerNorm without learned scale/bias (DiT, VAR: the adaLN modulation supplies them)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps, elementwise_affine=False)


class Mlp(nn.Module):
    """Two-layer MLP ``fc2(act(fc1(x)))``, GELU-tanh by default (ViT/DiT)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, act: str = "gelu_tanh", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        acts = {"gelu_tanh": lambda: nn.GELU(approximate="tanh"), "gelu": nn.GELU, "silu": nn.SiLU}
        if act not in acts:
            raise ValueError(f"act: expected one of {', '.join(acts)}, got {act!r}")
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = acts[act]()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    """Gated MLP ``w3(silu(w1 x) * w2 x)`` (Shazeer 2020, eq. 6; LLaMA)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def swiglu_hidden_size(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 64) -> int:
    """SwiGLU width with the parameters of a ``mlp_ratio`` MLP: ``2/3 * ratio * dim`` rounded down to ``multiple_of``."""
    return max(multiple_of, int(dim * mlp_ratio * 2 / 3 / multiple_of) * multiple_of)


MLPS = ("gelu", "swiglu", "silu")


def make_mlp(kind: str, dim: int, mlp_ratio: float = 4.0, out_dim: int | None = None, bias: bool = True) -> nn.Module:
    """``gelu`` (GELU-tanh MLP), ``silu`` (SiLU MLP, MAR head) or ``swiglu`` (parameter-matched width)."""
    if kind == "gelu":
        return Mlp(dim, int(dim * mlp_ratio), out_dim, act="gelu_tanh", bias=bias)
    if kind == "silu":
        return Mlp(dim, int(dim * mlp_ratio), out_dim, act="silu", bias=bias)
    if kind == "swiglu":
        return SwiGLU(dim, swiglu_hidden_size(dim, mlp_ratio, multiple_of=min(64, max(8, dim // 4))), out_dim, bias=bias)
    raise ValueError(f"mlp: expected one of {', '.join(MLPS)}, got {kind!r}")


def _per_token(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # a per-sample [B, D] parameter acting on tokens [B, N, D] broadcasts over N
    return param.unsqueeze(1) if param.dim() == x.dim() - 1 else param


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT Sec. 3.2): ``x * (1 + scale) + shift``; shift/scale ``[B, D]`` or per token ``[B, N, D]``."""
    return x * (1 + _per_token(scale, x)) + _per_token(shift, x)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): zero a sample's residual branch with probability ``drop_prob``, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    gen_device = generator.device if generator is not None else x.device
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = (torch.rand(shape, generator=generator, device=gen_device) < keep).to(device=x.device, dtype=x.dtype)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of ``drop_path`` (draws from the global RNG, which the trainer checkpoints)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_path: probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


def _zero_(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def fused_xavier_(linears: list[nn.Linear]) -> None:
    """One xavier-uniform draw for the stacked ``[sum(out), in]`` weight of linears that read the same input,
    split among them: each gets the fused bound ``sqrt(6 / (in + sum(out)))`` (DiT's timm ``Attention``
    holds q, k, v as one ``qkv = Linear(D, 3D)``, so its q/k/v start at ``sqrt(6 / 4D)``, not ``sqrt(6 / 2D)``)."""
    sizes = [linear.out_features for linear in linears]
    first = linears[0].weight
    weight = torch.empty(sum(sizes), first.shape[1], device=first.device, dtype=first.dtype)
    nn.init.xavier_uniform_(weight)
    with torch.no_grad():
        for linear, part in zip(linears, weight.split(sizes)):
            linear.weight.copy_(part)


def _projection_groups(attention: Attention) -> list[list[nn.Linear]]:
    """The fused linears of the reference codes: ``qkv`` (self-attention), or ``q`` and ``kv`` (cross-attention)."""
    if attention.is_cross:
        return [[attention.to_q], [attention.to_k, attention.to_v]]
    return [[attention.to_q, attention.to_k, attention.to_v]]


def xavier_init_(module: nn.Module) -> None:
    """DiT's base init (``initialize_weights``, Peebles & Xie 2023): xavier-uniform weights and zero biases for
    every ``nn.Linear`` inside ``module``, the q/k/v projections of each :class:`Attention` drawn as DiT's one
    fused ``qkv`` matrix (:func:`fused_xavier_`)."""
    fused = set()
    for m in module.modules():  # an Attention comes before its projections
        if isinstance(m, Attention):
            for group in _projection_groups(m):
                fused_xavier_(group)
                fused.update(id(linear) for linear in group)
        if isinstance(m, nn.Linear):
            if id(m) not in fused:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def dit_init_(model: nn.Module) -> None:
    """DiT's initialisation (Peebles & Xie 2023, Sec. 3.2) of a model with ``x_embedder``, ``t_embedder``,
    optional ``y_embedder``, adaLN-Zero ``blocks`` and a ``final_layer``: xavier linears, the patch conv
    as a linear, N(0, 0.02) embeddings, zero adaLN modulation and output (every block starts as identity)."""
    xavier_init_(model)
    if isinstance(model.x_embedder, PatchEmbed):
        w = model.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(model.x_embedder.proj.bias)
    if getattr(model, "y_embedder", None) is not None:
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[1].weight)
        nn.init.zeros_(block.adaLN_modulation[1].bias)
    for layer in (model.final_layer.adaLN_modulation[1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)

class AdaLNZeroBlock(nn.Module):
    """DiT block with adaLN-Zero (Peebles & Xie 2023, Sec. 3.2, Fig. 3).

    ``x += g1 * attn(modulate(LN(x), b1, s1)); [x += cross_attn(LN(x), context)]; x += g2 * mlp(modulate(LN(x), b2, s2))``
    with ``(b1, s1, g1, b2, s2, g2) = Linear(SiLU(c))`` zero-initialised, so the block starts as
    the identity. Also VAR's block (``l2_norm_qk=True, qkv_bias="qv"``, drop-path).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cond_dim: int | None = None,
        mlp: str = "gelu",
        qkv_bias: bool | str = True,
        qk_norm: str | None = None,
        l2_norm_qk: bool = False,
        cross_attention_dim: int | None = None,
        attention_backend: str = "sdpa",
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = LayerNormNoAffine(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, l2_norm_qk=l2_norm_qk, attention_backend=attention_backend)
        self.cross_attn = None
        if cross_attention_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = Attention(dim, num_heads, qk_norm=qk_norm, cross_attention_dim=cross_attention_dim, attention_backend=attention_backend)
        self.norm2 = LayerNormNoAffine(dim)
        self.mlp = make_mlp(mlp, dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))
        _zero_(self.adaLN_modulation[1])

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        update_cache: bool = True,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = self.attn(modulate(self.norm1(x), shift1, scale1), mask=mask, rope=rope, kv_cache=kv_cache, causal=causal, update_cache=update_cache)
        x = x + self.drop_path(_per_token(gate1, h) * h)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("context: this block has cross-attention and needs a context")
            x = x + self.drop_path(self.cross_attn(self.norm_cross(x), context=context, mask=context_mask))
        h = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + self.drop_path(_per_token(gate2, h) * h)


class PreNormBlock(nn.Module):
    """Pre-norm transformer block ``x += attn(norm(x)); x += mlp(norm(x))`` (GPT-2 / LLaMA layout).

    CausalFusion uses ``norm="layernorm", mlp="gelu", qk_norm="layernorm"`` with a block mask;
    LatentLM uses ``CausalBlock`` (RMSNorm, SwiGLU, RoPE, causal).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        norm_affine: bool = True,
        mlp: str = "gelu",
        bias: bool = True,
        qk_norm: str | None = None,
        num_kv_heads: int | None = None,
        cross_attention_dim: int | None = None,
        attention_backend: str = "sdpa",
        drop_path: float = 0.0,
        qkv_bias: bool | str | None = None,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, dim, affine=norm_affine)
        qkv_bias = bias if qkv_bias is None else qkv_bias  # CausalFusion: no q/k/v biases, biased projection and MLP
        self.attn = Attention(dim, num_heads, num_kv_heads=num_kv_heads, qkv_bias=qkv_bias, out_bias=bias, qk_norm=qk_norm, attention_backend=attention_backend)
        self.cross_attn = None
        if cross_attention_dim is not None:
            self.norm_cross = make_norm(norm, dim, affine=norm_affine)
            self.cross_attn = Attention(dim, num_heads, qkv_bias=bias, out_bias=bias, qk_norm=qk_norm, cross_attention_dim=cross_attention_dim, attention_backend=attention_backend)
        self.norm2 = make_norm(norm, dim, affine=norm_affine)
        self.mlp = make_mlp(mlp, dim, mlp_ratio, bias=bias)
        self.drop_path = DropPath(drop_path)
        self.default_causal = False

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        causal: bool | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        update_cache: bool = True,
    ) -> torch.Tensor:
        causal = self.default_causal if causal is None else causal
        x = x + self.drop_path(self.attn(self.norm1(x), mask=mask, rope=rope, kv_cache=kv_cache, causal=causal, update_cache=update_cache))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("context: this block has cross-attention and needs a context")
            x = x + self.drop_path(self.cross_attn(self.norm_cross(x), context=context, mask=context_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CausalBlock(PreNormBlock):
    """LLaMA-style causal block (LatentLM backbone): RMSNorm without affine, SwiGLU, no biases, RoPE via ``rope``.

    Token-causal by default (bottom-right aligned with a KV cache); pass ``mask`` for other layouts.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, num_kv_heads: int | None = None,
                 attention_backend: str = "sdpa", drop_path: float = 0.0, norm_affine: bool = False):
        super().__init__(dim, num_heads, mlp_ratio, norm="rmsnorm", norm_affine=norm_affine, mlp="swiglu", bias=False,
                         num_kv_heads=num_kv_heads, attention_backend=attention_backend, drop_path=drop_path)
        self.default_causal = True


class FinalLayer(nn.Module):
    """DiT's output layer: ``Linear(modulate(LN(x), shift, scale))`` with ``(shift, scale) = Linear(SiLU(c))``; all zero-initialised."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None = None, norm: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm, dim, affine=False)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))
        _zero_(self.adaLN_modulation[1])
        _zero_(self.linear)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class _HeadResBlock(nn.Module):
    """Residual MLP block with adaLN (shift, scale, gate), zero-initialised gate (MAR ``ResBlock``)."""

    def __init__(self, width: int, mlp: str, mlp_ratio: float, norm: str):
        super().__init__()
        self.norm = make_norm(norm, width, affine=False)
        self.mlp = make_mlp(mlp, width, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """Per-token MLP denoiser ``f(x_t, timestep, z) -> target`` (MAR "diffusion loss", Li et al. 2024
    Sec. 3.3; LatentLM next-token diffusion head, Sun et al. 2024 Sec. 2.2).

    ``x_t [..., in_channels]`` is a noisy token, ``timestep [...]`` its ``1000 * t`` (one per token),
    ``condition [..., cond_dim]`` the backbone's state for that token. The timestep embedding and the
    projected condition are summed into ``y``, which drives adaLN in ``depth`` residual MLP blocks and
    the final layer (both zero-initialised, so the head starts at 0). MAR: ``mlp="silu",
    norm="layernorm", mlp_ratio=1``; LatentLM: ``mlp="swiglu", norm="rmsnorm"``.
    """

    def __init__(self, in_channels: int, cond_dim: int, width: int = 256, depth: int = 3, out_channels: int | None = None,
                 mlp: str = "silu", mlp_ratio: float = 1.0, norm: str = "layernorm"):
        super().__init__()
        self.in_channels = in_channels
        self.cond_dim = cond_dim
        self.input_proj = nn.Linear(in_channels, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(_HeadResBlock(width, mlp, mlp_ratio, norm) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels or in_channels, norm=norm)
        xavier_init_(self)
        for mlp_layer in self.time_embed.mlp:
            if isinstance(mlp_layer, nn.Linear):
                nn.init.normal_(mlp_layer.weight, std=0.02)
        for block in self.blocks:
            _zero_(block.adaLN_modulation[1])
        _zero_(self.final_layer.adaLN_modulation[1])
        _zero_(self.final_layer.linear)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"x: expected last dim {self.in_channels}, got shape {tuple(x.shape)}")
        if condition.shape[-1] != self.cond_dim or condition.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"condition: expected shape {tuple(x.shape[:-1]) + (self.cond_dim,)}, got {tuple(condition.shape)}")
        lead = x.shape[:-1]
        timestep = torch.as_tensor(timestep, device=x.device, dtype=torch.float32)
        timestep = timestep.expand(lead).reshape(-1)
        h = self.input_proj(x.reshape(-1, x.shape[-1]))
        y = self.time_embed(timestep, h.dtype) + self.cond_embed(condition.reshape(-1, self.cond_dim).to(h.dtype))
        for block in self.blocks:
            h = block(h, y)
        return self.final_layer(h, y).reshape(*lead, -1)
