"""Discrete vocabulary and sequence layout of LatentLM (Sun et al. 2024, Sec. 2.1: one sequence mixes
discrete tokens and continuous latent spans delimited by special begin/end tokens).

The vocabulary needs no download: six special ids, the 256 UTF-8 bytes, then one id per class::

    0 <pad>  1 <bos>  2 <eos>  3 <bol> (begin of latents)  4 <eol> (end of latents)  5 <null> (dropped class)
    6 .. 261 bytes 0..255      262 .. 262 + num_classes - 1 class tokens

Layouts used by the family and the pipeline (``LATENT`` marks the span of ``L`` latent vectors)::

    generation (text -> latents):  <bos> text <bol> LATENT <eol> <eos>
    captioning (latents -> text):  <bos> <bol> LATENT <eol> text <eos>
    class-conditional:             <bos> <class or null> <bol> LATENT <eol> <eos>

The captioning layout's latent span follows ``<bos> <bol>`` with no text, which is exactly the
generation layout with an empty prompt: the null condition of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

PAD, BOS, EOS, BOL, EOL, NULL = range(6)
BYTE_OFFSET = 6
NUM_SPECIAL = 6
LATENT = "latent"  # marks a latent span inside a segment list

Segment = Union[Sequence[int], str]


class LatentLMTokenizer:
    """Byte-level text + class tokens + specials (see the module docstring for the id layout)."""

    def __init__(self, num_classes: int = 0, max_text_length: int = 64):
        if num_classes < 0:
            raise ValueError(f"num_classes: must be >= 0, got {num_classes}")
        self.num_classes = int(num_classes)
        self.max_text_length = int(max_text_length)

    @property
    def vocab_size(self) -> int:
        return BYTE_OFFSET + 256 + self.num_classes

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ids (truncated to ``max_text_length`` bytes)."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected a str, got {type(text).__name__}")
        return [BYTE_OFFSET + b for b in text.encode("utf-8")[: self.max_text_length]]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes up to the first ``<eos>``/``<bol>``; other specials and class ids are skipped."""
        out = bytearray()
        for i in (int(v) for v in ids):
            if i in (EOS, BOL):
                break
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                out.append(i - BYTE_OFFSET)
        return out.decode("utf-8", errors="replace")

    def class_token(self, label: int) -> int:
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"class_labels: ids must be in [0, {self.num_classes}), got {label}")
        return BYTE_OFFSET + 256 + int(label)

    def is_byte(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= BYTE_OFFSET) & (ids < BYTE_OFFSET + 256)


@dataclass
class PackedBatch:
    """A batch of mixed sequences: ``tokens [B, T]`` (PAD at latent and padding positions),
    ``latents [B, T, D]`` (zeros off latent positions), ``is_latent [B, T]``, ``valid [B, T]``
    (False at padding), ``positions [B, T]`` (RoPE positions, 0 at the first real element)."""

    tokens: torch.Tensor
    latents: torch.Tensor
    is_latent: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor


def pack_sequences(segments: list[list[Segment]], latents: torch.Tensor | None, latent_channels: int,
                   left_pad: bool = False, device=None) -> PackedBatch:
    """Lay out one sequence per sample from its segments (id lists and ``LATENT`` spans).

    ``latents [B, L, D]`` fills each sample's ``LATENT`` span (one span per sample at most). Right
    padding for training (a causal model never sees it), left padding for prompts at sampling time.
    """
    batch = len(segments)
    rows = []
    for b, segs in enumerate(segments):
        ids, lat = [], []
        for seg in segs:
            if isinstance(seg, str):
                if seg != LATENT or latents is None:
                    raise ValueError(f"segments: sample {b} has a latent span but no latents were given")
                ids += [PAD] * latents.shape[1]
                lat += [True] * latents.shape[1]
            else:
                ids += [int(i) for i in seg]
                lat += [False] * len(seg)
        rows.append((ids, lat))
    length = max(len(ids) for ids, _ in rows)
    tokens = torch.full((batch, length), PAD, dtype=torch.long)
    is_latent = torch.zeros(batch, length, dtype=torch.bool)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b, (ids, lat) in enumerate(rows):
        start = length - len(ids) if left_pad else 0
        tokens[b, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        is_latent[b, start:start + len(ids)] = torch.tensor(lat, dtype=torch.bool)
        valid[b, start:start + len(ids)] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    tokens, is_latent, valid, positions = (t.to(device) for t in (tokens, is_latent, valid, positions))
    seq_latents = torch.zeros(batch, length, latent_channels, device=device,
                              dtype=latents.dtype if latents is not None else torch.float32)
    if latents is not None and bool(is_latent.any()):
        has_span = is_latent.any(1)
        seq_latents[is_latent] = latents.to(device)[has_span].reshape(-1, latent_channels)
    return PackedBatch(tokens, seq_latents, is_latent, valid, positions)
