"""One-line checks of command-line values shared by the ``genmod`` verbs (issue 15).

Each raises ``ValueError("--flag: must be ..., got ...")`` naming the flag, so ``genmod`` prints it
as one line with exit status 2 before any work starts.
"""

from __future__ import annotations

import math

__all__ = ["check_count", "check_finite", "check_device", "check_name"]


def check_count(flag: str, value, low: int = 1, high: int | None = None) -> None:
    """An integer in ``[low, high]`` (``high=None``: no upper bound); None passes."""
    if value is None:
        return
    if value < low:
        raise ValueError(f"{flag}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{flag}: must be <= {high}, got {value}")


def check_finite(flag: str, value, low: float | None = None, strict: bool = False) -> None:
    """A finite float, ``> low`` (``strict``) or ``>= low``; None passes."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"{flag}: must be a finite number, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{flag}: must be {'>' if strict else '>='} {low}, got {value}")


def check_device(flag: str, device: str) -> str:
    """A torch device string that exists on this machine (``cuda`` without a GPU is one line)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag}: not a device, got {device!r} (cpu, cuda, cuda:N, mps)") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{flag}: {device!r} is not available here ({torch.cuda.device_count()} CUDA devices); use cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag}: unsupported device {device!r} (cpu, cuda, cuda:N, mps)")
    return device


def check_name(flag: str, name: str) -> str:
    """A plain file-name component: not empty, no path separator, not ``.``/``..``, no NUL."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise ValueError(f"{flag}: must be a plain name (no '/', not empty), got {name!r}")
    return name
