"""Multi-head attention with masks, a KV cache, RoPE and the normalisations the families need.

Backends (``attention_backend``): ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``,
the default), ``xformers`` (``xformers.ops.memory_efficient_attention``, optional) and ``math`` (an
explicit softmax, the reference the tests compare against). ``Attention`` is a diffusers
``AttentionModuleMixin``, so diffusers' ``model.set_attention_backend(name)`` / ``reset_attention_backend()``
and ``enable_xformers_memory_efficient_attention()`` reach every genmod model: ``native`` is ``sdpa``,
``_native_math`` is ``math``, ``xformers`` is ours, and any other diffusers backend (``flash``, ``sage``, ...)
runs through diffusers' attention dispatcher. Masks are boolean (True = may attend,
from ``genmod.nn.masks``) or additive float biases, broadcastable to ``[B, H, Lq, Lk]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from torch import nn

from genmod.nn.embeddings import apply_rope
from genmod.nn.masks import causal_mask
from genmod.nn.norms import make_norm

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
QK_NORMS = (None, "layernorm", "rmsnorm")


# diffusers' AttentionBackendName values that are one of ours; the rest go through its dispatcher
FROM_DIFFUSERS = {"native": "sdpa", "_native_math": "math", "xformers": "xformers"}
DISPATCH_PREFIX = "diffusers:"


def check_backend(backend: str) -> str:
    """Validate ``attention_backend``; ``xformers`` must be importable."""
    if backend.startswith(DISPATCH_PREFIX):
        return backend
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend: expected one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as err:
            raise ImportError("attention_backend='xformers' needs the xformers package: pip install 'genmod[xformers]'") from err
    return backend


def _to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _expand_mask(mask: torch.Tensor) -> torch.Tensor:
    # [Lq, Lk] / [B, Lq, Lk] -> broadcastable [B|1, H|1, Lq, Lk]
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[:, None]
    if mask.dim() == 4:
        return mask
    raise ValueError(f"mask: expected [Lq, Lk], [B, Lq, Lk] or [B, H, Lq, Lk], got shape {tuple(mask.shape)}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "sdpa",
    is_causal: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for ``q [B, H, Lq, D]``, ``k, v [B, H, Lk, D]``.

    ``mask``: boolean (True = may attend) or additive, ``[Lq, Lk]``, ``[B, Lq, Lk]`` or ``[B, H, Lq, Lk]``.
    ``scale`` defaults to ``1 / sqrt(D)``. ``is_causal`` (``Lq == Lk``, no ``mask``) is the token-causal mask.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if is_causal:
        if mask is not None or q.shape[-2] != k.shape[-2]:
            raise ValueError("is_causal: needs Lq == Lk and no mask (build a mask with genmod.nn.masks.causal_mask)")
        if backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True)
        mask = causal_mask(q.shape[-2], device=q.device)
    if mask is not None:
        mask = _expand_mask(mask)
        if mask.shape[-2:] != (q.shape[-2], k.shape[-2]):
            raise ValueError(f"mask: last dims {tuple(mask.shape[-2:])} must be (Lq, Lk) = {(q.shape[-2], k.shape[-2])}")
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if backend.startswith(DISPATCH_PREFIX):
        return _dispatch(q, k, v, mask, scale, is_causal, backend[len(DISPATCH_PREFIX):])
    if backend == "math":
        logits = (q.float() @ k.float().transpose(-2, -1)) * scale
        if mask is not None:
            logits = logits + _to_bias(mask, torch.float32)
        return (logits.softmax(dim=-1) @ v.float()).to(q.dtype)
    if backend == "xformers":
        check_backend(backend)
        import xformers.ops as xops

        bias = None
        if mask is not None:
            # xformers wants a dense [B, H, Lq, Lk] bias whose row stride is a multiple of 8: fill a padded buffer, slice a view
            batch, heads, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            buffer = q.new_zeros(batch, heads, lq, (lk + 7) // 8 * 8)
            buffer[..., :lk] = _to_bias(mask, q.dtype)
            bias = buffer[..., :lk]
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)
    raise ValueError(f"attention_backend: expected one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")


def _dispatch(q, k, v, mask, scale, is_causal, name: str) -> torch.Tensor:
    """diffusers' attention dispatcher (layout ``[B, L, H, D]``) with one of its backends."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                is_causal=is_causal, scale=scale, backend=name)
    return out.transpose(1, 2)


class _BackendChoice:
    """Where diffusers' ``set_attention_backend`` writes its choice (``processor._attention_backend``; None:
    the layer's own ``attention_backend``). genmod attention has no processors beyond this."""

    _attention_backend = None
    _parallel_config = None


class KVCache:
    """Keys and values of one attention layer, appended block by block during AR sampling.

    ``extend(k, v)`` appends the new block (``[B, H, L_new, D]``, RoPE already applied) and returns
    everything cached so far; ``commit=False`` returns the same without keeping the new block (e.g.
    denoising steps of a frame that is not final yet). ``crop(max_len)`` keeps the last tokens
    (sliding window); ``repeat_batch`` / ``select_batch`` reshape the batch (CFG doubling).

    Without autograd the cache writes into a buffer whose capacity doubles when full, so a rollout of
    L tokens copies O(L) instead of O(L^2) elements; with autograd it concatenates (no in-place writes).
    """

    def __init__(self):
        self._key: torch.Tensor | None = None  # [B, H, capacity, D]
        self._value: torch.Tensor | None = None
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @property
    def key(self) -> torch.Tensor | None:
        return None if self._key is None else self._key[..., : self._length, :]

    @key.setter
    def key(self, key: torch.Tensor | None) -> None:  # replace the cached keys (e.g. a batch slice)
        self._key, self._length = key, 0 if key is None else key.shape[-2]

    @property
    def value(self) -> torch.Tensor | None:
        return None if self._value is None else self._value[..., : self._length, :]

    @value.setter
    def value(self, value: torch.Tensor | None) -> None:
        self._value = value

    def extend(self, key: torch.Tensor, value: torch.Tensor, commit: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if self._length and (key.shape[:2] != self._key.shape[:2] or key.shape[-1] != self._key.shape[-1]):
            raise ValueError(f"kv_cache: new keys {tuple(key.shape)} do not match cached {tuple(self.key.shape)}")
        new_length = self._length + key.shape[-2]
        if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
            if self._length:
                key, value = torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2)
            if commit:
                self._key, self._value, self._length = key, value, new_length
            return key, value
        stale = self._key is None or self._key.dtype != key.dtype or self._key.shape[:2] != key.shape[:2] or self._key.shape[-1] != key.shape[-1]
        if stale or new_length > self._key.shape[-2]:
            capacity = max(new_length, 2 * (0 if stale else self._key.shape[-2]), 16)
            grown_key = key.new_empty(*key.shape[:-2], capacity, key.shape[-1])
            grown_value = value.new_empty(*value.shape[:-2], capacity, value.shape[-1])
            if self._length:
                grown_key[..., : self._length, :] = self.key
                grown_value[..., : self._length, :] = self.value
            self._key, self._value = grown_key, grown_value
        # uncommitted blocks are written past the committed length and overwritten later
        self._key[..., self._length : new_length, :] = key
        self._value[..., self._length : new_length, :] = value
        if commit:
            self._length = new_length
        return self._key[..., :new_length, :], self._value[..., :new_length, :]

    def _compact(self, key: torch.Tensor | None, value: torch.Tensor | None) -> None:
        self._key, self._value = key, value
        self._length = 0 if key is None else key.shape[-2]

    def crop(self, max_length: int) -> None:
        """Keep only the last ``max_length`` cached tokens."""
        if max_length <= 0:
            self.reset()
        elif self._length > max_length:
            self._compact(self.key[..., -max_length:, :].clone(), self.value[..., -max_length:, :].clone())

    def reset(self) -> None:
        self._compact(None, None)

    def select_batch(self, index: torch.Tensor | slice) -> None:
        if self._length:
            self._compact(self.key[index], self.value[index])

    def repeat_batch(self, times: int) -> None:
        if self._length:
            self._compact(self.key.repeat(times, 1, 1, 1), self.value.repeat(times, 1, 1, 1))


def make_kv_caches(num_layers: int) -> list[KVCache]:
    """One empty ``KVCache`` per layer."""
    return [KVCache() for _ in range(num_layers)]


def _qk_norm(kind: str | None, head_dim: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind not in QK_NORMS:
        raise ValueError(f"qk_norm: expected None, 'layernorm' or 'rmsnorm', got {kind!r}")
    return make_norm(kind, head_dim)


class Attention(nn.Module, AttentionModuleMixin):
    """Multi-head self- or cross-attention.

    Args:
        dim: model width; ``num_heads`` heads of ``dim // num_heads``.
        num_kv_heads: grouped-query attention (LLaMA); default ``num_heads``.
        qkv_bias: ``True``, ``False`` or ``"qv"`` (biases on q and v, none on k: VAR).
        qk_norm: ``None``, ``"layernorm"`` or ``"rmsnorm"`` on ``head_dim`` (CausalFusion).
        l2_norm_qk: VAR's normalised attention: q, k L2-normalised, q times a learned per-head
            temperature ``exp(min(log s, log 100))`` (``s`` initialised to 4), softmax scale 1.
        cross_attention_dim: width of the ``context`` for cross-attention (keys/values from it).
        attention_backend: ``sdpa``, ``xformers`` or ``math``.

    ``forward(x, context=None, mask=None, rope=None, kv_cache=None, causal=False, update_cache=True)``:
    ``rope = (cos, sin)`` for the positions of ``x`` (self-attention); ``kv_cache`` prepends the
    cached keys, so ``mask`` is ``[Lq, L_cached + Lq]``; ``causal=True`` builds a bottom-right
    aligned token-causal mask when ``mask`` is None.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        qkv_bias: bool | str = True,
        out_bias: bool = True,
        qk_norm: str | None = None,
        l2_norm_qk: bool = False,
        cross_attention_dim: int | None = None,
        attention_backend: str = "sdpa",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: dim {dim} is not divisible by num_heads {num_heads}")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
        if qkv_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias: expected True, False or 'qv', got {qkv_bias!r}")
        if l2_norm_qk and qk_norm is not None:
            raise ValueError("qk_norm: choose either qk_norm or l2_norm_qk, not both")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.is_cross = cross_attention_dim is not None
        self.backend = check_backend(attention_backend)
        self.processor = _BackendChoice()
        kv_dim = self.num_kv_heads * self.head_dim
        linear_bias = qkv_bias is True
        self.to_q = nn.Linear(dim, dim, bias=linear_bias)
        self.to_k = nn.Linear(cross_attention_dim or dim, kv_dim, bias=linear_bias)
        self.to_v = nn.Linear(cross_attention_dim or dim, kv_dim, bias=linear_bias or qkv_bias == "qv")
        if qkv_bias == "qv":  # VAR: no bias on k (it cancels in softmax without normalisation anyway)
            self.to_q.bias = nn.Parameter(torch.zeros(dim))
        self.to_out = nn.Linear(dim, dim, bias=out_bias)
        self.norm_q = _qk_norm(qk_norm, self.head_dim)
        self.norm_k = _qk_norm(qk_norm, self.head_dim)
        self.l2_norm_qk = l2_norm_qk
        if l2_norm_qk:
            self.log_temperature = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_log_temperature = math.log(100.0)

    @property
    def active_backend(self) -> str:
        """The backend this layer runs: diffusers' choice (``set_attention_backend``) or its own."""
        chosen = self.processor._attention_backend
        if chosen is None:
            return self.backend
        name = getattr(chosen, "value", chosen)
        return FROM_DIFFUSERS.get(name, DISPATCH_PREFIX + name)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """diffusers' xformers toggle: ``xformers`` (an ImportError naming the package if it is missing) or ``sdpa``."""
        if attention_op is not None:
            raise ValueError("attention_op: genmod attention takes no xformers operator; pass None")
        self.backend, self.processor._attention_backend = check_backend("xformers" if valid else "sdpa"), None

    def set_attention_slice(self, slice_size) -> None:
        raise NotImplementedError("slice_size: genmod attention has no sliced mode (it uses scaled_dot_product_attention)")

    def set_processor(self, processor) -> None:
        raise NotImplementedError("processor: genmod attention has no attention processors; use set_attention_backend")

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)  # [B, H, L, D]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        causal: bool = False,
        update_cache: bool = True,
    ) -> torch.Tensor:
        if self.is_cross and context is None:
            raise ValueError("context: this attention layer is cross-attention and needs a context")
        if not self.is_cross and context is not None:
            raise ValueError("context: this attention layer is self-attention (set cross_attention_dim to use a context)")
        if rope is not None and self.is_cross:
            raise ValueError("rope: rotary positions are for self-attention only")
        source = x if context is None else context
        q = self.norm_q(self._heads(self.to_q(x), self.num_heads))
        k = self.norm_k(self._heads(self.to_k(source), self.num_kv_heads))
        v = self._heads(self.to_v(source), self.num_kv_heads)
        scale = None
        if self.l2_norm_qk:
            temperature = self.log_temperature.clamp(max=self.max_log_temperature).exp()
            q = F.normalize(q, dim=-1) * temperature.to(q.dtype)
            k = F.normalize(k, dim=-1)
            scale = 1.0
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v, commit=update_cache)
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        is_causal, backend = False, self.active_backend
        if causal and mask is None and q.shape[-2] > 1:  # a single newest query sees every key: no mask
            if q.shape[-2] == k.shape[-2] and backend == "sdpa":
                is_causal = True  # lets SDPA pick its fused causal kernels
            else:
                mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        out = attention(q, k, v, mask=mask, scale=scale, backend=backend, is_causal=is_causal)
        return self.to_out(out.transpose(1, 2).flatten(2))
