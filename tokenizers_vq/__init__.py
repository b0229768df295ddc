"""tokenizers_vq: shared quantizers and tokenizers (VQ / FSQ / multi-scale VQ / sigma-VAE)."""

from .quantizers import (  # noqa: F401
    FSQ,
    MultiScaleResidualVQ,
    QuantizerOutput,
    ResidualVQ,
    VectorQuantizer,
)
