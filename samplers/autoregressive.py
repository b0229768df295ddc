"""Sampling token ids from logits (VAR, LatentLM and other autoregressive generators).

Temperature scaling, top-k filtering, nucleus / top-p filtering (Holtzman et al. 2020, Sec. 3.1: the
smallest set of tokens whose probability mass reaches p; the most likely token always stays) and
greedy decoding. Works on logits of any shape ``[..., V]``; draws come from a passed generator.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to ``-inf`` (both filters may be combined)."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
        if top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")
        if top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits.float(), dim=-1)
            mass_before = probs.cumsum(-1) - probs  # probability of all strictly more likely tokens
            drop_sorted = mass_before >= top_p  # the token that crosses p is kept; the first never drops
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ids of shape ``logits.shape[:-1]`` (int64). ``temperature = 0`` or ``greedy`` takes the argmax."""
    if not torch.is_tensor(logits) or logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError("logits: expected a tensor of shape [..., vocab_size] with vocab_size >= 1")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if greedy or temperature == 0:
        filter_logits(logits, top_k, top_p)  # still validates the arguments
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
    if generator is not None and generator.device != probs.device:
        ids = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    else:
        ids = torch.multinomial(probs, 1, generator=generator)
    return ids.reshape(logits.shape[:-1])
