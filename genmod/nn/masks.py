"""Attention masks from block ids: one builder for every family.

Every token carries an integer *block id*: the VAR scale, the Diffusion Forcing frame, the
CausalFusion AR step, the LatentLM token position. A rule then says which key blocks a query block
may see. All masks here are boolean with ``True`` = "may attend" (the convention of
``torch.nn.functional.scaled_dot_product_attention``), shape ``[..., Lq, Lk]``.

Rules (``q`` = query block id, ``k`` = key block id):

* ``full``:                every query sees every key.
* ``causal``:              ``k <= q`` with the ids read as token positions (pass ``arange``);
                           this is ``block_causal`` with one token per block.
* ``block_causal``:        ``k <= q``: full attention inside a block, causal across blocks
                           (VAR scales, Diffusion Forcing frames).
* ``block_causal_strict``: ``k < q``: only earlier blocks (CausalFusion noisy -> clean).
* ``block_diagonal``:      ``k == q``: only the own block.
* a callable ``rule(q_ids[..., :, None], k_ids[..., None, :]) -> bool tensor`` for anything else.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

MASK_RULES = ("full", "causal", "block_causal", "block_causal_strict", "block_diagonal")

Rule = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def block_ids_from_sizes(sizes: Sequence[int], device=None) -> torch.Tensor:
    """Block ids ``[0]*sizes[0] + [1]*sizes[1] + ...``: e.g. VAR scales (1, 2, 3) -> sizes (1, 4, 9)."""
    if any(int(s) < 0 for s in sizes):
        raise ValueError(f"sizes: block sizes must be >= 0, got {list(sizes)}")
    sizes_t = torch.as_tensor([int(s) for s in sizes], dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes_t), device=device), sizes_t)


def _apply_rule(rule: Rule, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if callable(rule):
        out = rule(q, k)
        return torch.broadcast_to(out.bool(), torch.broadcast_shapes(q.shape, k.shape))
    if rule == "full":
        return torch.ones(torch.broadcast_shapes(q.shape, k.shape), dtype=torch.bool, device=q.device)
    if rule in ("causal", "block_causal"):
        return k <= q
    if rule == "block_causal_strict":
        return k < q
    if rule == "block_diagonal":
        return k == q
    raise ValueError(f"rule: expected one of {', '.join(MASK_RULES)} or a callable, got {rule!r}")


def block_mask(q_blocks: torch.Tensor, k_blocks: torch.Tensor | None = None, rule: Rule = "block_causal") -> torch.Tensor:
    """Boolean "may attend" mask ``[..., Lq, Lk]`` from block ids ``[..., Lq]`` and ``[..., Lk]``.

    ``k_blocks`` defaults to ``q_blocks`` (self-attention without a cache). With a KV cache, pass the
    ids of the new queries and of all keys (cached + new). Leading batch dims broadcast.
    """
    k_blocks = q_blocks if k_blocks is None else k_blocks
    for name, ids in (("q_blocks", q_blocks), ("k_blocks", k_blocks)):
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() < 1:
            raise ValueError(f"{name}: expected an integer tensor [..., L], got {getattr(ids, 'dtype', type(ids))}")
    return _apply_rule(rule, q_blocks[..., :, None], k_blocks[..., None, :])


def causal_mask(num_queries: int, num_keys: int | None = None, device=None) -> torch.Tensor:
    """Token-level causal mask where the queries are the *last* ``num_queries`` of ``num_keys`` positions.

    With a KV cache holding ``num_keys - num_queries`` tokens, query ``i`` sits at position
    ``offset + i`` and sees keys ``0 .. offset + i`` (bottom-right aligned, unlike SDPA's ``is_causal``).
    """
    num_keys = num_queries if num_keys is None else num_keys
    if num_keys < num_queries:
        raise ValueError(f"num_keys: must be >= num_queries ({num_queries}), got {num_keys}")
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device)
    return block_mask(q_pos, torch.arange(num_keys, device=device), "causal")


def mask_from_rules(
    q_kinds: torch.Tensor,
    q_blocks: torch.Tensor,
    k_kinds: torch.Tensor,
    k_blocks: torch.Tensor,
    rules: Mapping[tuple[int, int], Rule],
) -> torch.Tensor:
    """General mask over tokens that carry a *kind* and a *block id*.

    ``rules[(q_kind, k_kind)]`` is the block rule used between a query of ``q_kind`` and a key of
    ``k_kind``; kind pairs missing from ``rules`` may not attend. This composes masks such as
    CausalFusion's (condition / clean / noisy tokens, each with its AR step as block id).
    """
    q_kind, k_kind = q_kinds[..., :, None], k_kinds[..., None, :]
    q_blk, k_blk = q_blocks[..., :, None], k_blocks[..., None, :]
    shape = torch.broadcast_shapes(q_kind.shape, k_kind.shape, q_blk.shape, k_blk.shape)
    mask = torch.zeros(shape, dtype=torch.bool, device=q_blocks.device)
    for (qk, kk), rule in rules.items():
        pair = (q_kind == qk) & (k_kind == kk)
        mask = mask | (pair & _apply_rule(rule, q_blk, k_blk))
    return mask


# CausalFusion token kinds
COND, CLEAN, NOISY = 0, 1, 2

CAUSALFUSION_RULES: dict[tuple[int, int], Rule] = {
    (COND, COND): "full",  # class tokens see each other
    (CLEAN, COND): "full",  # everything sees the class tokens
    (NOISY, COND): "full",
    (CLEAN, CLEAN): "block_causal",  # clean step i sees clean steps <= i
    (NOISY, CLEAN): "block_causal_strict",  # noisy step s sees clean steps < s
    (NOISY, NOISY): "block_diagonal",  # noisy tokens see only their own step
}


def causalfusion_layout(num_cond_tokens: int, step_sizes: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kinds and block ids of CausalFusion's training sequence (Deng et al. 2024, Sec. 3, Fig. 3).

    Layout: ``[num_cond_tokens condition tokens | clean tokens of steps 0..N-2 | noisy tokens of
    steps 0..N-1]`` with ``N = len(step_sizes)``; the last step's clean tokens are left out since no
    query depends on them. Condition tokens get block id -1.
    """
    if num_cond_tokens < 0 or len(step_sizes) == 0 or any(int(s) <= 0 for s in step_sizes):
        raise ValueError(f"step_sizes: need >= 1 positive AR step sizes and num_cond_tokens >= 0, got {list(step_sizes)}, {num_cond_tokens}")
    clean_ids = block_ids_from_sizes(step_sizes[:-1], device)
    noisy_ids = block_ids_from_sizes(step_sizes, device)
    cond_ids = torch.full((num_cond_tokens,), -1, dtype=torch.long, device=device)
    kinds = torch.cat([torch.full_like(cond_ids, COND), torch.full_like(clean_ids, CLEAN), torch.full_like(noisy_ids, NOISY)])
    return kinds, torch.cat([cond_ids, clean_ids, noisy_ids])


def causalfusion_mask(num_cond_tokens: int, step_sizes: Sequence[int], device=None) -> torch.Tensor:
    """CausalFusion's generalized causal mask ``[L, L]`` (True = may attend) for ``causalfusion_layout``.

    Rule: condition tokens see only condition tokens; every token sees the condition tokens; a clean
    token of step i sees clean tokens of steps <= i; a noisy token of step s sees clean tokens of
    steps < s and the noisy tokens of step s only. N = 1 is plain (bidirectional) diffusion over the
    noisy tokens; one token per step is pure autoregression.
    """
    kinds, blocks = causalfusion_layout(num_cond_tokens, step_sizes, device)
    return mask_from_rules(kinds, blocks, kinds, blocks, CAUSALFUSION_RULES)


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention bias: 0 where ``mask`` is True, ``-inf`` elsewhere."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, float("-inf"))
