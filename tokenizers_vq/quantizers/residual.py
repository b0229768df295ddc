"""Residual vector quantization (SoundStream, Zeghidour et al. 2021; Improved RVQGAN / DAC,
Kumar et al. 2023, for per-sample quantizer dropout)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import QuantizerBase, QuantizerOutput, check_last_dim, distributed_world
from .fsq import FSQ
from .vector_quantizer import VectorQuantizer


class ResidualVQ(QuantizerBase):
    """Stages of VQ (or FSQ) applied to successive residuals of a channel-last input ``(B, ..., dim)``.

    Stage s quantizes r_s, and r_{s+1} = r_s - sg(q_s): the subtracted value is detached so every
    stage's commitment loss still reaches the encoder (tokenizers.md §6.2; the EnCodec #25 bug).
    The output is z_q = q_0 + sum_{s>0} sg(q_s): value sum_s q_s, gradient that of stage 0's
    estimator (identity for STE, as DAC's cancelling residual path gives).

    FSQ stages (``kind="fsq"``, no projection) quantize r_s / (L-1)^-s and rescale, so later stages
    resolve finer residuals (Residual FSQ per-stage scale).

    Quantizer dropout (DAC §3.2): in training, with probability ``quantizer_dropout`` a sample uses
    only its first n ~ U{1..num_stages} stages; the draw comes from the ``generator`` passed to
    ``forward``. Dropped stages give index -1 and contribute neither output nor loss.

    ``indices`` have shape ``(B, ..., num_stages)``; the loss is the mean of the stage losses.
    """

    def __init__(
        self,
        dim: int,
        num_stages: int,
        codebook_size: int = 1024,
        kind: str = "vq",
        levels: Sequence[int] | None = None,
        quantizer_dropout: float = 0.0,
        stages: Sequence[nn.Module] | None = None,
        **vq_kwargs,
    ):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"ResidualVQ: num_stages must be >= 1, got {num_stages}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"ResidualVQ: quantizer_dropout must be in [0, 1], got {quantizer_dropout}")
        if kind not in ("vq", "fsq"):
            raise ValueError(f"ResidualVQ: kind must be 'vq' or 'fsq', got {kind!r}")
        self.dim = dim
        self.num_stages = num_stages
        self.kind = kind
        self.quantizer_dropout = quantizer_dropout
        if stages is not None:
            if len(stages) != num_stages:
                raise ValueError(f"ResidualVQ: got {len(stages)} stages for num_stages={num_stages}")
            self.stages = nn.ModuleList(stages)
        elif kind == "vq":
            self.stages = nn.ModuleList(VectorQuantizer(dim, codebook_size, **vq_kwargs) for _ in range(num_stages))
        else:
            if levels is None:
                raise ValueError("ResidualVQ: kind='fsq' needs levels=[...]")
            self.stages = nn.ModuleList(FSQ(levels, dim=dim) for _ in range(num_stages))
        scales = torch.ones(num_stages, dim)
        if kind == "fsq" and len(levels) == dim:
            level_t = torch.tensor(list(levels), dtype=torch.float32)
            scales = torch.stack([(level_t - 1) ** -s for s in range(num_stages)])
        self.register_buffer("stage_scales", scales, persistent=False)

    def _stage_call(self, s: int, residual: torch.Tensor, generator):
        stage = self.stages[s]
        scale = self.stage_scales[s]
        kwargs = {"generator": generator} if isinstance(stage, VectorQuantizer) else {}
        out = stage(residual / scale, **kwargs)
        return out.z_q * scale, out.indices, out.loss, out.stats

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None,
                num_stages: int | None = None) -> QuantizerOutput:
        """``num_stages`` (eval-time bitrate choice) uses only the first n stages for every sample."""
        check_last_dim(z, self.dim, "ResidualVQ")
        if z.ndim < 2:
            raise ValueError(f"ResidualVQ: z must be (B, ..., {self.dim}), got shape {tuple(z.shape)}")
        if num_stages is not None and not 1 <= num_stages <= self.num_stages:
            raise ValueError(f"ResidualVQ: num_stages must be in [1, {self.num_stages}], got {num_stages}")
        batch = z.shape[0]
        active = torch.full((batch,), num_stages or self.num_stages, dtype=torch.int64, device=z.device)
        if self.training and self.quantizer_dropout > 0:
            gen_device = generator.device if generator is not None else "cpu"
            drop = torch.rand(batch, generator=generator, device=gen_device) < self.quantizer_dropout
            draw = torch.randint(1, self.num_stages + 1, (batch,), generator=generator, device=gen_device)
            active = torch.where(drop, draw, active.to(gen_device)).to(z.device)

        residual = z.float()
        output = None
        all_indices, losses, stats = [], [], {}
        for s in range(self.num_stages):
            rows = (active > s).nonzero().squeeze(1)
            stage_indices = torch.full(z.shape[:-1], -1, dtype=torch.int64, device=z.device)
            # under DDP a process with no active rows still calls the stage (empty input), so the
            # stage's collective statistics are entered by every process and nothing hangs
            if rows.numel() == 0 and not (self.training and distributed_world()):
                all_indices.append(stage_indices)
                continue
            full = rows.numel() == batch
            q, idx, loss, st = self._stage_call(s, residual if full else residual[rows], generator)
            q = q.float()
            if full:
                q_full = q
                stage_indices = idx
            else:
                q_full = torch.zeros_like(residual).index_copy(0, rows, q)
                stage_indices = stage_indices.index_copy(0, rows, idx)
            residual = residual - q_full.detach()  # detached: later stages' commitment still trains the encoder
            output = q_full if output is None else output + q_full.detach()
            all_indices.append(stage_indices)
            if rows.numel() > 0:
                losses.append(loss)
            for key, value in st.items():
                stats[f"stage{s}/{key}"] = value
        indices = torch.stack(all_indices, dim=-1)
        stats["usage"] = torch.stack([stats[f"stage{s}/usage"] for s in range(self.num_stages)
                                      if f"stage{s}/usage" in stats]).mean()
        stats["perplexity"] = torch.stack([stats[f"stage{s}/perplexity"] for s in range(self.num_stages)
                                           if f"stage{s}/perplexity" in stats]).mean()
        stats["mean_active_stages"] = active.float().mean()
        loss = torch.stack(losses).mean()
        return QuantizerOutput(output.to(z.dtype), indices, loss, stats)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, ..., n)`` int64 indices (n <= num_stages; -1 = dropped stage) -> summed codes ``(B, ..., dim)``."""
        if indices.shape[-1] > self.num_stages:
            raise ValueError(f"ResidualVQ.indices_to_codes: last dim {indices.shape[-1]} exceeds num_stages={self.num_stages}")
        total = None
        for s in range(indices.shape[-1]):
            idx = indices[..., s]
            valid = idx >= 0
            codes = self.stages[s].indices_to_codes(idx.clamp_min(0)) * self.stage_scales[s]
            codes = codes * valid.unsqueeze(-1)
            total = codes if total is None else total + codes
        return total
