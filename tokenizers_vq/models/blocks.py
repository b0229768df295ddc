"""Convolutional encoder / decoder building blocks shared by every tokenizer.

Images: the taming-VQGAN / LDM layout (Esser et al. 2021, Rombach et al. 2022): conv_in, per level
``num_res_blocks`` ResNet blocks (GroupNorm + SiLU) and a stride-2 downsample, a middle block with
optional self-attention at the lowest resolution, GroupNorm + SiLU + conv_out. The downsampling factor
is ``2 ** (len(ch_mult) - 1)``: ``(1, 2, 4)`` -> x4, ``(1, 1, 2, 4)`` -> x8, ``(1, 1, 2, 2, 4)`` -> x16.
Two options of the LDM / VAR VQVAE (Rombach et al. 2022, App. / ``attn_resolutions``; Tian et al. 2024,
Sec. 3.2 tokenizer): ``attn_levels`` puts a self-attention block after every ResNet block of those
levels, and ``quant_conv_kernel`` adds a ``quant_conv`` after the encoder and a ``post_quant_conv``
before the decoder (k x k, same channels). Their defaults add no module (earlier models unchanged).

Audio: a SEANet / DAC style 1D stack on waveforms (Defossez et al. 2022; Kumar et al. 2023): residual
units with dilations (1, 3, 9) followed by a strided conv per stride; strides ``(2, 4, 5, 8)`` give a
hop of 320 samples. The decoder mirrors it with transposed convolutions.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``channels``."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    raise ValueError(f"dims must be 1 or 2, got {dims}")


class ResnetBlock(nn.Module):
    """Pre-activation ResNet block: (GroupNorm, SiLU, conv) x 2 with a 1x1 skip when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        kernel = 3
        pad = dilation * (kernel - 1) // 2
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv_nd(dims, in_channels, out_channels, kernel, padding=pad, dilation=dilation)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dims, out_channels, out_channels, kernel, padding=1)
        self.skip = conv_nd(dims, in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head spatial self-attention over all positions (VQGAN's AttnBlock), via SDPA."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.flatten(2)  # (B, C, N)
        q, k, v = self.qkv(self.norm(flat)).chunk(3, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(out.transpose(1, 2)).reshape(shape)


def latent_conv(channels: int, kernel: int):
    """The VQVAE's ``quant_conv`` / ``post_quant_conv``: a k x k conv on the latent (k odd), or None for k = 0."""
    if kernel == 0:
        return None
    if kernel < 0 or kernel % 2 == 0:
        raise ValueError(f"quant_conv_kernel: must be 0 (none) or an odd kernel size, got {kernel}")
    return nn.Conv2d(channels, channels, kernel, padding=kernel // 2)


class Encoder2d(nn.Module):
    """Image encoder, downsampling by ``2 ** (len(ch_mult) - 1)``; ``attn_levels`` / ``quant_conv_kernel``:
    see the module docstring (``quant_conv`` is applied last)."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 64,
                 ch_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int = 1, attention: bool = False,
                 attn_levels: Sequence[int] = (), quant_conv_kernel: int = 0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        layers: list[nn.Module] = []
        channels = base_channels
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(channels, base_channels * mult))
                channels = base_channels * mult
                if level in attn_levels:
                    layers.append(SelfAttention(channels))
            if level != len(ch_mult) - 1:
                # asymmetric pad + stride-2 conv halves even sizes exactly
                layers.append(nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2)))
        self.down = nn.Sequential(*layers)
        mid = [ResnetBlock(channels, channels)]
        if attention:
            mid.append(SelfAttention(channels))
        mid.append(ResnetBlock(channels, channels))
        self.mid = nn.Sequential(*mid)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.quant_conv = latent_conv(out_channels, quant_conv_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h if self.quant_conv is None else self.quant_conv(h)


class Decoder2d(nn.Module):
    """Image decoder, the mirror of :class:`Encoder2d` (nearest-neighbour x2 upsample + conv);
    ``post_quant_conv`` (``quant_conv_kernel`` > 0) is applied first."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 64,
                 ch_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int = 1, attention: bool = False,
                 attn_levels: Sequence[int] = (), quant_conv_kernel: int = 0):
        super().__init__()
        channels = base_channels * ch_mult[-1]
        self.post_quant_conv = latent_conv(in_channels, quant_conv_kernel)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        mid = [ResnetBlock(channels, channels)]
        if attention:
            mid.append(SelfAttention(channels))
        mid.append(ResnetBlock(channels, channels))
        self.mid = nn.Sequential(*mid)
        layers: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(channels, base_channels * ch_mult[level]))
                channels = base_channels * ch_mult[level]
                if level in attn_levels:
                    layers.append(SelfAttention(channels))
            if level != 0:
                layers.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                            nn.Conv2d(channels, channels, 3, padding=1)))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Encoder1d(nn.Module):
    """Waveform encoder: per stride, dilated residual units then a strided conv (kernel 2*stride).

    ``full_rate_blocks=False`` drops the residual units of the first level (the ones that run at the
    waveform's sample rate), so it is conv_in + one strided conv, a learned overlapping patchify; with
    a large first stride (``(8, 5, 4, 2)``) this roughly halves the cost of a CPU training step."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 32,
                 strides: Sequence[int] = (2, 4, 5, 8), attention: bool = False, full_rate_blocks: bool = True):
        super().__init__()
        self.conv_in = nn.Conv1d(in_channels, base_channels, 7, padding=3)
        layers: list[nn.Module] = []
        channels = base_channels
        for level, stride in enumerate(strides):
            if level > 0 or full_rate_blocks:
                layers += [ResnetBlock(channels, channels, dims=1, dilation=d) for d in (1, 3, 9)]
            layers.append(nn.Sequential(nn.SiLU(), nn.Conv1d(channels, channels * 2, 2 * stride, stride=stride,
                                                             padding=math.ceil(stride / 2))))
            channels *= 2
        self.down = nn.Sequential(*layers)
        self.mid = nn.Sequential(SelfAttention(channels)) if attention else nn.Identity()
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv1d(channels, out_channels, 3, padding=1)
        self.hop = math.prod(strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.hop:
            raise ValueError(f"audio length {x.shape[-1]} must be a multiple of the hop {self.hop}")
        h = self.down(self.conv_in(x))[..., : x.shape[-1] // self.hop]
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder1d(nn.Module):
    """Waveform decoder: transposed strided convs (kernel 2*stride) each followed by dilated residual units
    (none after the last one, at the sample rate, when ``full_rate_blocks=False``; see :class:`Encoder1d`).

    ``istft_levels = k > 0`` replaces the last k upsampling levels by a Vocos-style inverse-STFT head
    (Siuzdak 2023, "Vocos", Sec. 3.1-3.2): at hop ``H = prod`` of those strides a conv predicts, per frame,
    log-magnitude ``m`` and phase ``p`` of ``n_fft = 4 H`` bins-worth of spectrum,
    ``S = exp(m) (cos p + i sin p)`` (magnitude clipped at 100), and ``torch.istft`` (Hann window,
    hop H) overlap-adds it into the waveform: no transposed-conv aliasing and no convolutions at the
    sample rate."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 32,
                 strides: Sequence[int] = (2, 4, 5, 8), attention: bool = False, full_rate_blocks: bool = True,
                 istft_levels: int = 0):
        super().__init__()
        if not 0 <= istft_levels < len(strides):
            raise ValueError(f"istft_levels={istft_levels} must be in [0, {len(strides) - 1}] for strides {tuple(strides)}")
        channels = base_channels * 2 ** len(strides)
        self.conv_in = nn.Conv1d(in_channels, channels, 7, padding=3)
        self.mid = nn.Sequential(SelfAttention(channels)) if attention else nn.Identity()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        up_strides = tuple(reversed(strides))[: len(strides) - istft_levels]
        for level, stride in enumerate(up_strides):
            self.ups.append(nn.Sequential(group_norm(channels), nn.SiLU(),
                                          nn.ConvTranspose1d(channels, channels // 2, 2 * stride, stride=stride,
                                                             padding=stride // 2 + stride % 2,
                                                             output_padding=stride % 2)))
            channels //= 2
            last = level == len(strides) - 1
            self.blocks.append(nn.Identity() if last and not full_rate_blocks else
                               nn.Sequential(*[ResnetBlock(channels, channels, dims=1, dilation=d) for d in (1, 3, 9)]))
        self.norm_out = group_norm(channels)
        self.out_channels = out_channels
        self.istft_hop = math.prod(tuple(reversed(strides))[len(up_strides):])
        self.n_fft = 4 * self.istft_hop if istft_levels else 0
        head = out_channels * (self.n_fft + 2) if istft_levels else out_channels
        self.conv_out = nn.Conv1d(channels, head, 7, padding=3)
        self.strides = tuple(strides)
        self.up_strides = up_strides

    def istft(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, C_out * (n_fft + 2), frames)`` -> waveform ``(B, C_out, frames * hop)``."""
        batch, _, frames = h.shape
        h = F.pad(h, (0, 1), mode="replicate")  # frames + 1 centred frames span exactly frames * hop samples
        log_mag, phase = h.float().reshape(batch * self.out_channels, self.n_fft + 2, frames + 1).chunk(2, dim=1)
        mag = log_mag.exp().clamp(max=1e2)
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        window = torch.hann_window(self.n_fft, device=h.device)
        wave = torch.istft(spec, self.n_fft, self.istft_hop, self.n_fft, window=window, center=True,
                           length=frames * self.istft_hop)
        return wave.reshape(batch, self.out_channels, -1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        length = z.shape[-1]
        for up, block, stride in zip(self.ups, self.blocks, self.up_strides):
            length *= stride
            h = block(up(h)[..., :length])
        out = self.conv_out(F.silu(self.norm_out(h)))
        return self.istft(out) if self.n_fft else out
