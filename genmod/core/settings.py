"""Frozen settings dataclasses: one helper every sampler uses to let keywords override single fields.

A sampler takes ``settings: XSettings | None = None`` plus ``**options``; ``with_options`` returns the
settings with those fields replaced (``dataclasses.replace``, so ``__post_init__`` validates again) and
names an unknown keyword in a one-line error.
"""

from __future__ import annotations

from dataclasses import fields, replace


def with_options(settings, options: dict, where: str):
    """``settings`` (a frozen dataclass) with the fields named in ``options`` replaced; ``where`` names the caller."""
    names = {f.name for f in fields(settings)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"{where}: unknown option {unknown[0]!r} (not a field of {type(settings).__name__})")
    return replace(settings, **options) if options else settings
