"""Embeddings: patches (1D/2D/3D), sin-cos positions, rotary positions, timesteps and class labels.

Token order is raster order over the patch grid, slowest axis first: audio ``(t)``, images
``(h, w)``, video ``(t, h, w)``, so a video frame's tokens are contiguous (one block id per frame).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# patches


def _as_tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    out = (int(value),) * ndim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != ndim or any(v <= 0 for v in out):
        raise ValueError(f"{name}: expected {ndim} positive ints, got {value!r}")
    return out


def check_patch_grid(in_channels: int, sample_size: int, patch_size: int, hidden_size: int, depth: int,
                     num_heads: int, num_classes: int) -> None:
    """One-line errors for a DiT-style patch transformer's sizes (positive, divisible patches, 2D sin-cos width)."""
    for name, value in (("in_channels", in_channels), ("sample_size", sample_size), ("patch_size", patch_size),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
        if int(value) <= 0:
            raise ValueError(f"{name}: must be positive, got {value}")
    if sample_size % patch_size:
        raise ValueError(f"sample_size: {sample_size} is not divisible by patch_size {patch_size}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size: must be divisible by 4 for 2D sin-cos positions, got {hidden_size}")
    if num_classes < 0:
        raise ValueError(f"num_classes: must be >= 0, got {num_classes}")


def patchify(x: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Channels-first ``[B, C, *S]`` (S = 1, 2 or 3 spatial dims) -> tokens ``[B, N, prod(p) * C]``.

    Token features are ordered ``(p_1, ..., p_n, C)`` (DiT's ``nhwpqc``). Video ``[B, T, C, H, W]``
    goes in as ``x.transpose(1, 2)``.
    """
    ndim = x.dim() - 2
    if ndim not in (1, 2, 3):
        raise ValueError(f"x: expected [B, C, *spatial] with 1-3 spatial dims, got shape {tuple(x.shape)}")
    p = _as_tuple(patch_size, ndim, "patch_size")
    batch, channels, *spatial = x.shape
    if any(s % q for s, q in zip(spatial, p)):
        raise ValueError(f"x: spatial size {tuple(spatial)} is not divisible by patch_size {p}")
    grid = [s // q for s, q in zip(spatial, p)]
    shape = [batch, channels]
    for g, q in zip(grid, p):
        shape += [g, q]
    x = x.reshape(shape)
    # [B, C, g1, p1, g2, p2, ...] -> [B, g1, g2, ..., p1, p2, ..., C]
    perm = [0] + [2 + 2 * i for i in range(ndim)] + [3 + 2 * i for i in range(ndim)] + [1]
    return x.permute(perm).reshape(batch, math.prod(grid), math.prod(p) * channels)


def unpatchify(tokens: torch.Tensor, patch_size: int | Sequence[int], grid_size: Sequence[int]) -> torch.Tensor:
    """Inverse of ``patchify``: ``[B, N, prod(p) * C]`` -> ``[B, C, *(grid * p)]``."""
    ndim = len(grid_size)
    p = _as_tuple(patch_size, ndim, "patch_size")
    batch, num, feat = tokens.shape
    if num != math.prod(grid_size) or feat % math.prod(p):
        raise ValueError(f"tokens: shape {tuple(tokens.shape)} does not fit grid {tuple(grid_size)} with patch {p}")
    channels = feat // math.prod(p)
    x = tokens.reshape(batch, *grid_size, *p, channels)
    # [B, g1.., p1.., C] -> [B, C, g1, p1, g2, p2, ...]
    perm = [0, 1 + 2 * ndim]
    for i in range(ndim):
        perm += [1 + i, 1 + ndim + i]
    return x.permute(perm).reshape(batch, channels, *[g * q for g, q in zip(grid_size, p)])


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding by a strided convolution (ViT/DiT), 1D, 2D or 3D.

    ``ndim=1``: audio ``[B, C, T]``; ``ndim=2``: images ``[B, C, H, W]``; ``ndim=3``: video
    ``[B, T, C, H, W]`` (the dataset layout) with tubelets ``(pt, ph, pw)``; ``pt = 1`` embeds each
    frame on its own. Output ``[B, N, hidden_size]`` in raster order; ``grid_size(shape)`` gives the grid.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int | Sequence[int] = 2, ndim: int = 2, bias: bool = True):
        super().__init__()
        if ndim not in (1, 2, 3):
            raise ValueError(f"ndim: expected 1, 2 or 3, got {ndim}")
        self.ndim = ndim
        self.in_channels = in_channels
        self.patch_size = _as_tuple(patch_size, ndim, "patch_size")
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
        self.proj = conv(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(f"x: expected {self.ndim + 2} dims for a {self.ndim}D patch embedding, got shape {tuple(x.shape)}")
        return x.transpose(1, 2) if self.ndim == 3 else x

    def grid_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Patch grid of an input of this ``shape`` (``(t, h, w)`` for video)."""
        spatial = (shape[1], *shape[3:]) if self.ndim == 3 else tuple(shape[2:])
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(f"x: spatial size {tuple(spatial)} is not divisible by patch_size {self.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._channels_first(x)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is not divisible by patch_size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# sin-cos positions (Transformer, Vaswani et al. 2017 Sec. 3.5; 2D as in MAE / DiT)


def sincos_1d(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """``[N] -> [N, dim]``: ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = base^(-i / (dim/2))``."""
    if dim % 2:
        raise ValueError(f"dim: sin-cos embedding needs an even dim, got {dim}")
    omega = base ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.to(positions.device)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def _grid(sizes: Sequence[int], device=None) -> list[torch.Tensor]:
    axes = [torch.arange(s, dtype=torch.float64, device=device) for s in sizes]
    return [g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij")]


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """``[grid_h * grid_w, dim]`` in raster order; first half encodes the column, second the row (MAE/DiT)."""
    if dim % 4:
        raise ValueError(f"dim: 2D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows, cols = _grid((grid_h, grid_w))
    return torch.cat([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], dim=1)


def sincos_3d(grid_t: int, grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """``[T*H*W, dim]`` in ``(t, h, w)`` raster order: channels split ``[time | column | row]``.

    Column and row get ``2 * (dim // 6)`` channels each (DiT-style 2D part), time the rest.
    """
    spatial = 2 * (dim // 6)
    temporal = dim - 2 * spatial
    if dim % 2 or spatial % 2 or spatial == 0:
        raise ValueError(f"dim: 3D sin-cos embedding needs an even dim >= 12 with dim // 6 even, got {dim}")
    times, rows, cols = _grid((grid_t, grid_h, grid_w))
    return torch.cat([sincos_1d(times, temporal), sincos_1d(cols, spatial), sincos_1d(rows, spatial)], dim=1)


# --------------------------------------------------------------------------------------------
# rotary positions (RoFormer, Su et al. 2021, eq. 34; N-D by splitting head_dim over axes)


def rope_frequencies(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0, axes_dims: Sequence[int] | None = None,
    spacing: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin tables ``[..., N, head_dim / 2]`` for ``apply_rope``.

    1D (``axes_dims=None``): ``positions`` is ``[N]`` or ``[B, N]``; pair ``i`` turns by
    ``pos * base^(-2i / head_dim)`` (``spacing="llama"``, RoFormer / LLaMA) or ``pos * base^(-i / (head_dim/2 - 1))``
    (``spacing="latentlm"``: the exponents span [0, 1] evenly, as the released LatentLM's ``build_rel_pos``; the
    slowest pair turns by exactly ``pos / base``). N-D: ``positions`` is ``[..., N, A]`` (e.g. from
    ``grid_positions``: (row, col) or (t, row, col)) and ``axes_dims`` (A even parts summing to
    ``head_dim``) gives each axis its own share of the pairs, rotated by that axis' position.
    """
    if spacing not in ("llama", "latentlm"):
        raise ValueError(f"spacing: expected 'llama' or 'latentlm', got {spacing!r}")
    positions = positions.to(torch.float64)
    if axes_dims is None:
        axes_dims, positions = [head_dim], positions.unsqueeze(-1)
    axes_dims = [int(d) for d in axes_dims]
    if sum(axes_dims) != head_dim or any(d <= 0 or d % 2 for d in axes_dims):
        raise ValueError(f"axes_dims: need positive even parts summing to head_dim={head_dim}, got {axes_dims}")
    if positions.dim() < 2 or positions.shape[-1] != len(axes_dims):
        raise ValueError(f"positions: expected [..., N, {len(axes_dims)}] for {len(axes_dims)} axes, got {tuple(positions.shape)}")
    angles = []
    for axis, d in enumerate(axes_dims):
        pairs = torch.arange(d // 2, dtype=torch.float64, device=positions.device)
        inv_freq = base ** (-2 * pairs / d if spacing == "llama" else -pairs / max(d // 2 - 1, 1))
        angles.append(positions[..., axis : axis + 1] * inv_freq)
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def grid_positions(*sizes: int, device=None) -> torch.Tensor:
    """Integer coordinates ``[prod(sizes), len(sizes)]`` of a grid in raster order (slowest axis first)."""
    return torch.stack(_grid(sizes, device), dim=-1).long()


def split_head_dim(head_dim: int, num_axes: int) -> list[int]:
    """Split ``head_dim`` into ``num_axes`` even parts, as equal as possible (earlier axes get more)."""
    pairs = head_dim // 2
    if head_dim % 2 or pairs < num_axes:
        raise ValueError(f"head_dim: need an even head_dim with at least {num_axes} pairs, got {head_dim}")
    return [2 * (pairs // num_axes + (1 if a < pairs % num_axes else 0)) for a in range(num_axes)]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x_2i, x_2i+1)`` of ``x [B, H, N, D]`` by the angles in ``cos/sin``.

    ``cos``/``sin``: ``[N, D/2]`` or ``[B, N, D/2]`` (per-sample positions). Computed in float32.
    """
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if x.shape[-1] != 2 * cos.shape[-1] or x.shape[-2] != cos.shape[-2]:
        raise ValueError(f"rope: tables {tuple(cos.shape)} do not fit x {tuple(x.shape)} (need [N, D/2])")
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.device), sin.to(x.device)
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# timesteps and labels (DiT, Peebles & Xie 2023, Sec. 3.2)


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[..., dim]`` = ``[cos(t w_i), sin(t w_i)]``, ``w_i = max_period^(-i/(dim/2))``.

    ``timestep`` is the network timestep ``1000 * t`` (package convention), any shape.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of ``timestep = 1000 * t`` then a SiLU MLP (DiT). ``[B]`` -> ``[B, D]``, ``[B, T]`` -> ``[B, T, D]``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dtype``: the activations' dtype (diffusers' DiT casts to the hidden states' dtype), so layerwise
        casting (weights stored in fp8/fp16, computed in fp32/bf16) works; default the weights' dtype."""
        features = timestep_embedding(timestep, self.frequency_embedding_size)
        return self.mlp(features.to(dtype or self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with a null class (id ``num_classes``) for classifier-free guidance.

    In training, each label is replaced by the null id with probability ``dropout_prob``, decided by
    the passed ``generator`` (the trainer's seeded one) so that runs are reproducible.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.0):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes: must be positive, got {num_classes}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob: must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class_id(self) -> int:
        return self.num_classes

    def _check_ids(self, labels: torch.Tensor) -> None:
        """A one-line error for ids outside ``[0, num_classes]`` (``num_classes`` = null), on the host only.

        On an accelerator the check would stall the host every forward (and split a compiled graph), so
        there the pipelines' own check of ``class_labels`` (``GenmodPipeline.class_label_ids``) is the guard.
        """
        if labels.device.type != "cpu" or not labels.numel() or torch.compiler.is_compiling():
            return
        if int(labels.min()) < 0 or int(labels.max()) > self.num_classes:
            raise ValueError(f"class_labels: ids must be in [0, {self.num_classes}] ({self.num_classes} = null class), got {labels.tolist()}")

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null id with probability ``dropout_prob`` (draws from ``generator``)."""
        gen_device = generator.device if generator is not None else labels.device
        drop = torch.rand(labels.shape, generator=generator, device=gen_device).to(labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.null_class_id), labels)

    def forward(self, labels: torch.Tensor, generator: torch.Generator | None = None, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.embedding_table.weight.device).long()
        self._check_ids(labels)
        if self.training and self.dropout_prob > 0:
            labels = self.drop_labels(labels, generator)
        if force_drop is not None:
            labels = torch.where(force_drop.bool().to(labels.device), torch.full_like(labels, self.null_class_id), labels)
        return self.embedding_table(labels)
