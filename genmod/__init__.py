"""genmod: generative media modeling.

Shared tokenizers (``tokenizers_vq``) feed generator families (``genmod.flow`` and friends),
trained by one Accelerate trainer (``genmod.train``), sampled by solvers from ``samplers`` and
evaluated by ``evals``. The package-wide conventions are in ``docs/DESIGN.md``.
"""

__version__ = "0.1.0"
