"""Quantizers sharing one interface: ``forward(z) -> QuantizerOutput(z_q, indices, loss, stats)`` and
``indices_to_codes(indices) -> z_q``."""

from .base import QuantizerBase, QuantizerOutput, channel_first_to_last, channel_last_to_first
from .fsq import FSQ
from .multiscale import DEFAULT_SCALES, MultiScaleResidualVQ
from .residual import ResidualVQ
from .search import kmeans, nearest_codes
from .vector_quantizer import VectorQuantizer, rotation_trick, straight_through

__all__ = [
    "DEFAULT_SCALES",
    "FSQ",
    "MultiScaleResidualVQ",
    "QuantizerBase",
    "QuantizerOutput",
    "ResidualVQ",
    "VectorQuantizer",
    "channel_first_to_last",
    "channel_last_to_first",
    "kmeans",
    "nearest_codes",
    "rotation_trick",
    "straight_through",
]
