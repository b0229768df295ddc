"""genmod: generative media modeling.

Shared tokenizers (``genmod.tokenizers_vq``) feed generator families (``genmod.flow`` and friends),
trained by one Accelerate trainer (``genmod.train``), sampled by solvers from ``genmod.samplers`` and
evaluated by ``genmod.evals``. ``samplers/``, ``evals/`` and ``tokenizers_vq/`` stand at the top of the
repository and install inside this package (pyproject ``package-dir``), so no generic top-level name
is installed. The layers and conventions are in ``docs/DESIGN.md``.
"""

__version__ = "0.1.0"
