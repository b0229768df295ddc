"""CausalFusionTransformer: one decoder-only transformer from pure diffusion to pure autoregression.

Deng et al. 2024, "Causal Diffusion Transformers for Generative Modeling" (CausalFusion, arXiv 2412.12095):
the data is factorised over token subsets (AR steps) and over noise levels at once. The network is a
plain pre-LN transformer (not adaLN) with in-context conditioning:

* ``num_cond_tokens`` class tokens (``LabelEmbedder`` reshaped to several tokens, plus learned
  positions; the null class id ``num_classes`` for classifier-free guidance);
* clean tokens of earlier AR steps and noisy tokens of the current step share one input projection
  and one learned position table (initialised 2D sin-cos); **only the noisy tokens** add the
  timestep embedding of ``timestep = path.network_timestep(t)`` (``1000 t`` on continuous paths, the
  integer DDPM step n of ``alpha_bar[n]`` on ``ddpm_*`` paths, as the official code feeds it);
* QK-LayerNorm in every attention, GELU-tanh MLP, final LayerNorm + zero-initialised Linear;
* the generalized causal mask of ``genmod.nn.masks`` (the paper's generalized causal attention): condition tokens see each
  other; clean tokens are block-causal over AR steps; noisy tokens of step s see the clean tokens of
  steps < s and the noisy tokens of step s only.

Token-level entry points serve training (``forward_tokens`` with the full teacher-forced layout),
uncached sampling (the same with the clean prefix and one noisy step) and cached sampling
(``prefill_condition`` then ``forward_cached``: the clean prefix lives in per-layer ``KVCache``s).
``forward`` is the image-level wrapper: with one AR step it is an ordinary diffusion transformer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from genmod.nn.attention import KVCache, check_backend, make_kv_caches
from genmod.nn.embeddings import LabelEmbedder, TimestepEmbedder, check_patch_grid, patchify, sincos_2d, unpatchify
from genmod.nn.layers import PreNormBlock, xavier_init_
from genmod.nn.masks import CAUSALFUSION_RULES, block_ids_from_sizes, mask_from_rules

COND, CLEAN, NOISY = 0, 1, 2  # token kinds of genmod.nn.masks
TIME_CONVENTIONS = ("genmod", "ddpm_index")


def causalfusion_sequence_layout(num_cond_tokens: int, clean_step_sizes: Sequence[int], noisy_step_sizes: Sequence[int],
                                 noisy_first_step: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kinds and AR-step ids of ``[cond | clean steps 0..K-1 | noisy steps f..f+M-1]``.

    Training (teacher-forced layout): clean sizes = all steps but the last, noisy sizes = all steps, ``f = 0``
    (then this equals ``genmod.nn.masks.causalfusion_layout``). Uncached sampling of step ``s``:
    clean sizes = steps ``0..s-1``, noisy sizes = ``[size_s]``, ``f = s``.
    """
    cond = torch.full((num_cond_tokens,), -1, dtype=torch.long, device=device)
    clean = block_ids_from_sizes(list(clean_step_sizes), device)
    noisy = block_ids_from_sizes(list(noisy_step_sizes), device) + noisy_first_step
    kinds = torch.cat([torch.full_like(cond, COND), torch.full_like(clean, CLEAN), torch.full_like(noisy, NOISY)])
    return kinds, torch.cat([cond, clean, noisy])


def _check_config(in_channels, sample_size, patch_size, hidden_size, depth, num_heads, num_classes, num_cond_tokens,
                  attention_backend, norm_eps, time_convention) -> None:
    """One-line errors for ``CausalFusionTransformer`` arguments."""
    check_patch_grid(in_channels, sample_size, patch_size, hidden_size, depth, num_heads, num_classes)
    if num_cond_tokens < (1 if num_classes else 0):
        raise ValueError(f"num_cond_tokens: a class-conditional model needs >= 1, got {num_cond_tokens}")
    check_backend(attention_backend)
    if time_convention not in TIME_CONVENTIONS:
        raise ValueError(f"time_convention: expected one of {', '.join(TIME_CONVENTIONS)}, got {time_convention!r}")
    if not norm_eps > 0:
        raise ValueError(f"norm_eps: must be positive, got {norm_eps}")


class CausalFusionTransformer(ModelMixin, ConfigMixin):
    """Decoder-only diffusion transformer over patch tokens with a generalized causal mask.

    Args:
        in_channels, sample_size, patch_size: image (or latent) channels, side and patch size;
            tokens are ``patch_size^2 * in_channels`` values, ``(sample_size / patch_size)^2`` of them.
        hidden_size, depth, num_heads, mlp_ratio: transformer sizes (CausalFusion-L: 1024, 24, 16, 4).
        num_classes: 0 = unconditional (learned condition tokens); else ids ``0..num_classes-1`` and the
            null id ``num_classes``.
        num_cond_tokens: class tokens per sample (the paper uses 64 for 256 image tokens).
        class_dropout_prob: training-time label dropout for CFG (decided by ``dropout_generator``).
        attention_backend: ``sdpa`` | ``xformers`` | ``math``.
        norm_eps: epsilon of every LayerNorm (blocks, q/k norms, head); the official release uses 1e-5.
        qkv_bias: biases on the q/k/v projections (the official fused ``qkv`` Linear has none).
        time_convention: provenance only, ``genmod`` or ``ddpm_index`` (weights trained on the integer DDPM
            step n, as the official release; set by the importer). The t-embedder sees ``timestep`` as given
            in both: the one place that maps package time to the network's timestep is the caller's
            ``path.network_timestep(t)`` (the step n on ``ddpm_*`` paths, issue 21).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PreNormBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        patch_size: int = 4,
        hidden_size: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        num_cond_tokens: int = 4,
        class_dropout_prob: float = 0.1,
        attention_backend: str = "sdpa",
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        time_convention: str = "genmod",
    ):
        super().__init__()
        _check_config(in_channels, sample_size, patch_size, hidden_size, depth, num_heads, num_classes, num_cond_tokens,
                      attention_backend, norm_eps, time_convention)
        self.gradient_checkpointing = False
        self.grid_size = sample_size // patch_size
        self.num_tokens = self.grid_size**2
        self.token_dim = patch_size * patch_size * in_channels

        self.x_proj = nn.Linear(self.token_dim, hidden_size)  # shared by clean and noisy tokens
        self.pos_embed = nn.Parameter(sincos_2d(self.grid_size, self.grid_size, hidden_size).unsqueeze(0))
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes:
            self.y_embedder = LabelEmbedder(num_classes, num_cond_tokens * hidden_size, class_dropout_prob)
            self.cond_tokens = None
        else:
            self.y_embedder = None
            self.cond_tokens = nn.Parameter(torch.zeros(1, num_cond_tokens, hidden_size))
        self.cond_pos_embed = nn.Parameter(torch.zeros(1, num_cond_tokens, hidden_size))
        self.blocks = nn.ModuleList(
            PreNormBlock(hidden_size, num_heads, mlp_ratio, norm="layernorm", mlp="gelu", qk_norm="layernorm",
                         attention_backend=attention_backend, qkv_bias=bool(qkv_bias))
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(hidden_size, eps=1e-6)
        self.proj_out = nn.Linear(hidden_size, self.token_dim)
        for module in self.modules():  # one epsilon for every LayerNorm (blocks, q/k norms, head)
            if isinstance(module, nn.LayerNorm):
                module.eps = float(norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier linears, N(0, 0.02) class table / condition positions / t-MLP, zero output layer."""
        xavier_init_(self)
        nn.init.normal_(self.cond_pos_embed, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        else:
            nn.init.normal_(self.cond_tokens, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def null_class_id(self) -> int:
        """Label id of the unconditional (null) class used by classifier-free guidance."""
        return self.config.num_classes

    # -- embeddings -------------------------------------------------------------------------------
    def embed_condition(self, class_labels, batch: int, dropout_generator: torch.Generator | None = None) -> torch.Tensor:
        """Condition tokens ``[B, num_cond_tokens, D]``; ``class_labels=None`` on a conditional model = null class."""
        device = self.pos_embed.device
        if self.y_embedder is None:
            if class_labels is not None:
                raise ValueError("class_labels: this model is unconditional (num_classes=0)")
            return (self.cond_tokens + self.cond_pos_embed).expand(batch, -1, -1)
        if class_labels is None:
            class_labels = torch.full((batch,), self.null_class_id, dtype=torch.long, device=device)
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if labels.shape != (batch,):
            raise ValueError(f"class_labels: expected {batch} labels, got shape {tuple(labels.shape)}")
        tokens = self.y_embedder(labels, generator=dropout_generator).view(batch, self.config.num_cond_tokens, -1)
        return tokens + self.cond_pos_embed

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """Project ``tokens [B, n, token_dim]`` at raster ``positions [B, n]``; add the t-embedding when noisy."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"tokens: expected [B, n, {self.token_dim}], got shape {tuple(tokens.shape)}")
        if positions.shape != tokens.shape[:2]:
            raise ValueError(f"positions: expected shape {tuple(tokens.shape[:2])}, got {tuple(positions.shape)}")
        h = self.x_proj(tokens) + self.pos_embed[0][positions.long()].to(tokens.dtype)
        if timestep is not None:
            timestep = torch.as_tensor(timestep, device=tokens.device, dtype=torch.float32)
            if timestep.dim() == 0:
                timestep = timestep.expand(tokens.shape[0])
            if timestep.shape != (tokens.shape[0],):
                raise ValueError(f"timestep: expected a scalar or shape ({tokens.shape[0]},), got {tuple(timestep.shape)}")
            h = h + self.t_embedder(timestep, h.dtype).to(h.dtype)[:, None]
        return h

    def _blocks(self, h: torch.Tensor, mask=None, kv_caches: list[KVCache] | None = None, commit: bool = True) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            cache = None if kv_caches is None else kv_caches[i]
            if torch.is_grad_enabled() and self.gradient_checkpointing and cache is None:
                h = self._gradient_checkpointing_func(block, h, mask)
            else:
                h = block(h, mask=mask, kv_cache=cache, update_cache=commit)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.norm_out(h))

    # -- token-level forward passes ---------------------------------------------------------------
    def forward_tokens(
        self,
        noisy_tokens: torch.Tensor,
        noisy_positions: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        clean_tokens: torch.Tensor | None = None,
        clean_positions: torch.Tensor | None = None,
        clean_step_sizes: Sequence[int] = (),
        noisy_step_sizes: Sequence[int] | None = None,
        noisy_first_step: int = 0,
        dropout_generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predictions for ``noisy_tokens`` from ``[cond | clean tokens | noisy tokens]`` under the generalized causal mask.

        Tokens are in AR order (step by step); ``*_positions [B, n]`` are their raster indices.
        ``clean_step_sizes`` / ``noisy_step_sizes`` give the AR step of every token (noisy steps are
        numbered from ``noisy_first_step``). Returns ``[B, n_noisy, token_dim]``.
        """
        batch, num_noisy = noisy_tokens.shape[:2]
        noisy_step_sizes = [num_noisy] if noisy_step_sizes is None else [int(s) for s in noisy_step_sizes]
        clean_step_sizes = [int(s) for s in clean_step_sizes]
        if sum(noisy_step_sizes) != num_noisy:
            raise ValueError(f"noisy_step_sizes: sum {sum(noisy_step_sizes)} differs from {num_noisy} noisy tokens")
        num_clean = sum(clean_step_sizes)
        parts = [self.embed_condition(class_labels, batch, dropout_generator).to(noisy_tokens.dtype)]
        if num_clean:
            if clean_tokens is None or clean_tokens.shape[:2] != (batch, num_clean):
                got = None if clean_tokens is None else tuple(clean_tokens.shape)
                raise ValueError(f"clean_tokens: expected [{batch}, {num_clean}, {self.token_dim}] for clean_step_sizes {clean_step_sizes}, got {got}")
            parts.append(self.embed_tokens(clean_tokens, clean_positions))
        parts.append(self.embed_tokens(noisy_tokens, noisy_positions, timestep))
        kinds, blocks = causalfusion_sequence_layout(parts[0].shape[1], clean_step_sizes, noisy_step_sizes, noisy_first_step,
                                                     device=noisy_tokens.device)
        mask = mask_from_rules(kinds, blocks, kinds, blocks, CAUSALFUSION_RULES)
        h = self._blocks(torch.cat(parts, dim=1), mask=mask)
        return self._head(h[:, -num_noisy:])

    def prefill_condition(self, class_labels, batch: int, kv_caches: list[KVCache] | None = None) -> list[KVCache]:
        """Push the condition tokens into fresh (or given empty) per-layer KV caches (they see only each other)."""
        kv_caches = make_kv_caches(len(self.blocks)) if kv_caches is None else kv_caches
        if any(len(c) for c in kv_caches):
            raise ValueError("kv_caches: prefill_condition needs empty caches")
        cond = self.embed_condition(class_labels, batch)
        if cond.shape[1]:
            self._blocks(cond, kv_caches=kv_caches, commit=True)
        return kv_caches

    def forward_cached(self, tokens: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                       timestep: torch.Tensor | None = None, commit: bool = False) -> torch.Tensor | None:
        """Run one AR step's tokens against the cached prefix (condition + clean tokens of earlier steps).

        Noisy tokens (``timestep`` given, ``commit=False``) see the cache and each other: the mask rows
        of the current noisy step. Clean tokens (``timestep=None``, ``commit=True``) see the cache and
        each other and are appended to it: block-causal clean rows. Returns predictions for noisy
        tokens, None after a clean commit (nothing reads the clean tokens' outputs).
        """
        h = self._blocks(self.embed_tokens(tokens, positions, timestep), kv_caches=kv_caches, commit=commit)
        return None if timestep is None else self._head(h)

    # -- image-level forward ----------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        clean_sample: torch.Tensor | None = None,
        token_order: torch.Tensor | None = None,
        step_sizes: Sequence[int] | None = None,
        return_dict: bool = True,
        dropout_generator: torch.Generator | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Teacher-forced training forward on images ``[B, C, H, W]`` (the dual-factorization training input).

        ``sample`` is the noisy image at ``timestep = path.network_timestep(t)`` (one per sample), ``clean_sample`` the
        clean one; tokens are visited in ``token_order [B, L]`` (raster when None) and split into AR steps
        of ``step_sizes`` (one step when None: plain diffusion, no clean tokens needed). The sequence is
        ``[cond | clean tokens of steps 0..N-2 | noisy tokens of all N steps]``; the output is the
        prediction for every noisy token, returned in image layout.
        """
        cfg = self.config
        expected = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if sample.dim() != 4 or tuple(sample.shape[1:]) != expected:
            raise ValueError(f"sample: expected [B, {', '.join(map(str, expected))}], got shape {tuple(sample.shape)}")
        batch, length = sample.shape[0], self.num_tokens
        step_sizes = [length] if step_sizes is None else [int(s) for s in step_sizes]
        if sum(step_sizes) != length or any(s <= 0 for s in step_sizes):
            raise ValueError(f"step_sizes: need positive sizes summing to {length} tokens, got {step_sizes}")
        if token_order is None:
            token_order = torch.arange(length, device=sample.device).expand(batch, -1)
        token_order = token_order.to(sample.device).long()
        if token_order.shape != (batch, length):
            raise ValueError(f"token_order: expected shape ({batch}, {length}), got {tuple(token_order.shape)}")
        gather = token_order[..., None].expand(-1, -1, self.token_dim)
        noisy = patchify(sample, cfg.patch_size).gather(1, gather)
        num_clean = length - step_sizes[-1]
        clean = None
        if num_clean:
            if clean_sample is None or clean_sample.shape != sample.shape:
                raise ValueError(f"clean_sample: {len(step_sizes)} AR steps need the clean image shaped like sample")
            clean = patchify(clean_sample, cfg.patch_size).gather(1, gather)[:, :num_clean]
        out = self.forward_tokens(noisy, token_order, timestep, class_labels, clean, token_order[:, :num_clean],
                                  step_sizes[:-1], step_sizes, 0, dropout_generator)
        raster = torch.empty_like(out).scatter_(1, gather, out)
        image = unpatchify(raster, cfg.patch_size, (self.grid_size, self.grid_size))
        return Transformer2DModelOutput(sample=image) if return_dict else (image,)
