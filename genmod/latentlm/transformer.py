"""LatentLMTransformer: one causal decoder over discrete tokens and continuous latents (Sun et al. 2024,
"Multimodal Latent Language Modeling with Next-Token Diffusion", Sec. 2.1-2.2).

Backbone (Sec. 2.2; code ``models/Transformer.py``): a LLaMA-style causal decoder (RMSNorm without
affine, SwiGLU, interleaved RoPE, no biases, optional grouped-query attention). A sequence mixes
discrete ids (text bytes, class ids, the begin/end-of-latent markers; ``genmod.latentlm.text``) and
continuous latent vectors (sigma-VAE patches in raster order, or audio frames in time order): a
discrete position enters through the token embedding, a latent position through a linear embedding
of its (clean, normalised) latent vector.

The final state ``h_i`` at position ``i`` predicts element ``i + 1``:

* a discrete next element through the LM head (logits, cross-entropy), and
* a continuous next element through the next-token diffusion head (Sec. 2.2): an adaLN MLP
  ``DiffusionHead(x_t, path.network_timestep(t), c_i)`` conditioned on ``c_i = Linear(RMSNorm(h_i))`` (the code's
  ``ConditionLayer``) and the timestep embedding, with SwiGLU + RMSNorm blocks as in LatentLM.

Sequences may be left-padded (``key_mask``) with per-sample ``positions``, which is how prompts of
different lengths share one batch and one KV cache at sampling time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from genmod.nn.attention import KVCache, check_backend, make_kv_caches
from genmod.nn.checkpointing import checkpoint_block
from genmod.nn.embeddings import rope_frequencies
from genmod.nn.layers import CausalBlock, DiffusionHead
from genmod.nn.norms import RMSNorm

PREDICTIONS = ("velocity", "epsilon", "x0")


@dataclass
class LatentLMOutput(BaseOutput):
    """``hidden_states [B, T, C]`` (after the final RMSNorm) and LM ``logits [B, T, vocab]``."""

    hidden_states: torch.Tensor
    logits: torch.Tensor


class LatentLMTransformer(ModelMixin, ConfigMixin):
    """Causal transformer + LM head + next-token diffusion head.

    Args:
        latent_channels: size D of one latent vector (the sigma-VAE's latent channels).
        latent_grid: the latent layout of one item, ``[h, w]`` (image) or ``[frames]`` (audio).
        latent_patch_size: images only; one token holds a ``p x p`` patch of latent vectors
            (``D p^2`` numbers, as DiT/MAR patchify), so a span has ``h w / p^2`` tokens.
        vocab_size: discrete vocabulary (``LatentLMTokenizer(num_classes).vocab_size``).
        num_classes: class tokens in the vocabulary (0 for text-only models).
        hidden_size, depth, num_heads, num_kv_heads, mlp_ratio: the decoder (LatentLM-B: 768, 24, 12, -, 4).
        head_width, head_depth, head_mlp_ratio: the diffusion head (paper: depth 3-12 adaLN MLP blocks).
        path, prediction: the head's diffusion path (``genmod.core.paths``) and its output type.
        modality: ``image`` or ``audio`` (how latents map to tokens and back).
        max_text_length: longest text (bytes) the tokenizer keeps.
        rope_base, rope_spacing: RoPE base and frequency spacing: ``llama`` (``base^(-2i/d)``, the default) or
            ``latentlm`` (``base^(-i/(d/2-1))``, the released LatentLM's; needed to run its weights).
    """

    _supports_gradient_checkpointing = True  # decoder blocks through genmod.nn.checkpoint_block
    _no_split_modules = ["CausalBlock"]

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 8,
        latent_grid: tuple = (8, 8),
        latent_patch_size: int = 1,
        vocab_size: int = 262,
        num_classes: int = 0,
        hidden_size: int = 256,
        depth: int = 6,
        num_heads: int = 4,
        num_kv_heads: Optional[int] = None,
        mlp_ratio: float = 4.0,
        head_width: int = 256,
        head_depth: int = 3,
        head_mlp_ratio: float = 4.0,
        rope_base: float = 10000.0,
        path: str = "cosine",
        prediction: str = "velocity",
        modality: str = "image",
        max_text_length: int = 64,
        attention_backend: str = "sdpa",
        rope_spacing: str = "llama",
    ):
        super().__init__()
        self.gradient_checkpointing = False
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if modality not in ("image", "audio"):
            raise ValueError(f"modality: expected 'image' or 'audio', got {modality!r}")
        if rope_spacing not in ("llama", "latentlm"):
            raise ValueError(f"rope_spacing: expected 'llama' or 'latentlm', got {rope_spacing!r}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"num_heads: hidden_size {hidden_size} / num_heads {num_heads} must be an even integer")
        patches_fit = modality == "image" and not any(int(s) % latent_patch_size for s in latent_grid)
        if latent_patch_size < 1 or (latent_patch_size > 1 and not patches_fit):
            raise ValueError(f"latent_patch_size: {latent_patch_size} must be 1, or divide the image latent grid {list(latent_grid)}")
        check_backend(attention_backend)
        self.token_embed = nn.Embedding(vocab_size, hidden_size)
        self.latent_embed = nn.Linear(self.token_dim, hidden_size)
        self.blocks = nn.ModuleList(
            CausalBlock(hidden_size, num_heads, mlp_ratio, num_kv_heads=num_kv_heads, attention_backend=attention_backend)
            for _ in range(depth)
        )
        self.norm = RMSNorm(hidden_size, elementwise_affine=False)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        # ConditionLayer: RMSNorm + Linear from the decoder state to the head's condition c_i
        self.condition = nn.Linear(hidden_size, hidden_size, bias=False)
        self.diffusion_head = DiffusionHead(self.token_dim, hidden_size, width=head_width, depth=head_depth,
                                            mlp="swiglu", mlp_ratio=head_mlp_ratio, norm="rmsnorm")
        self._init_weights()

    def _init_weights(self) -> None:
        for module in [self.latent_embed, self.lm_head, self.condition, *self.blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    @property
    def num_latent_tokens(self) -> int:
        n = 1
        for s in self.config.latent_grid:
            n *= int(s) // self.config.latent_patch_size
        return n

    @property
    def token_dim(self) -> int:
        """Numbers in one latent token: ``latent_channels * latent_patch_size ** 2`` (images)."""
        return self.config.latent_channels * self.config.latent_patch_size ** len(self.config.latent_grid)

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_heads

    # -- latents <-> tokens ------------------------------------------------------------------------
    def latents_to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` (image, patches in raster order) or ``(B, D, T)`` (audio, time order) -> ``(B, L, token_dim)``."""
        expected = (self.config.latent_channels, *self.config.latent_grid)
        if tuple(latents.shape[1:]) != tuple(expected):
            raise ValueError(f"latents: expected shape (B, {', '.join(map(str, expected))}), got {tuple(latents.shape)}")
        p = self.config.latent_patch_size
        if p == 1:
            return latents.flatten(2).transpose(1, 2)
        b, d, h, w = latents.shape
        patches = latents.reshape(b, d, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, h/p, w/p, D, p, p]
        return patches.reshape(b, (h // p) * (w // p), d * p * p)

    def tokens_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`latents_to_tokens`."""
        d, grid, p = self.config.latent_channels, self.config.latent_grid, self.config.latent_patch_size
        if p == 1:
            return tokens.transpose(1, 2).reshape(tokens.shape[0], d, *grid)
        h, w = (int(s) for s in grid)
        patches = tokens.reshape(tokens.shape[0], h // p, w // p, d, p, p).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(tokens.shape[0], d, h, w)

    # -- decoder -------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, latents: Optional[torch.Tensor], is_latent: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embedding at discrete positions, ``Linear(latent)`` at latent positions."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected [B, T] ids, got shape {tuple(tokens.shape)}")
        x = self.token_embed(tokens.clamp(0, self.config.vocab_size - 1))
        if is_latent is not None and bool(is_latent.any()):
            if latents is None or latents.shape[:2] != tokens.shape:
                raise ValueError(f"latents: expected [B, T, D] aligned with tokens {tuple(tokens.shape)}, got "
                                 f"{None if latents is None else tuple(latents.shape)}")
            x = torch.where(is_latent[..., None], self.latent_embed(latents.to(x.dtype)), x)
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        latents: Optional[torch.Tensor] = None,
        is_latent: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        key_mask: Optional[torch.Tensor] = None,
        kv_caches: Optional[list[KVCache]] = None,
        return_dict: bool = True,
    ):
        """Run the decoder on ``T`` new elements (appended to ``kv_caches`` when given).

        Args:
            tokens: ``[B, T]`` ids (any value at latent positions).
            latents: ``[B, T, D]`` latent vectors (read where ``is_latent``).
            is_latent: ``[B, T]`` bool.
            positions: ``[B, T]`` or ``[T]`` RoPE positions (default: cached length + arange).
            key_mask: ``[B, cached + T]`` bool, False at (left-)padding keys; None = all valid.
            kv_caches: one ``KVCache`` per layer for incremental decoding.
        """
        batch, length = tokens.shape
        past = len(kv_caches[0]) if kv_caches else 0
        if positions is None:
            positions = torch.arange(past, past + length, device=tokens.device)
        cos, sin = rope_frequencies(positions, self.head_dim, base=self.config.rope_base,
                                    spacing=self.config.rope_spacing)
        mask = None
        if key_mask is not None:
            if key_mask.shape != (batch, past + length):
                raise ValueError(f"key_mask: expected shape {(batch, past + length)}, got {tuple(key_mask.shape)}")
            query_index = torch.arange(past, past + length, device=tokens.device)
            key_index = torch.arange(past + length, device=tokens.device)
            causal = key_index[None, :] <= query_index[:, None]
            # a padded query still sees itself, so no row is fully masked (no NaN from softmax)
            mask = (causal[None] & key_mask[:, None, :].bool()) | (key_index[None, None, :] == query_index[None, :, None])
        x = self.embed(tokens, latents, is_latent)
        for i, block in enumerate(self.blocks):
            cache = kv_caches[i] if kv_caches else None
            x = checkpoint_block(self.gradient_checkpointing and cache is None,
                                 functools.partial(block, mask=mask, rope=(cos, sin), kv_cache=cache, causal=True), x)
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        if not return_dict:
            return hidden, logits
        return LatentLMOutput(hidden_states=hidden, logits=logits)

    def make_kv_caches(self) -> list[KVCache]:
        return make_kv_caches(self.config.depth)

    # -- diffusion head ------------------------------------------------------------------------------
    def head(self, x_t: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The next-token diffusion head's output (``prediction`` type) for noisy ``x_t [..., D]`` at
        ``timestep = path.network_timestep(t) [...]`` (``1000 t``; the DDPM step n on ``ddpm_*`` paths),
        conditioned on decoder states ``hidden [..., C]``."""
        return self.diffusion_head(x_t, timestep, self.condition(hidden))
