"""Named training recipes: ``genmod train FAMILY --preset NAME`` (flags override the preset).

Each preset is ``genmod/presets/<family>/<name>.json``: config fields of that family (keys starting
with ``_`` are notes, e.g. ``_source``: where the recipe was measured). They are read by
``genmod.train.flags.parse_config`` through the same conversion chain as a saved config.
"""

from __future__ import annotations

import os

PRESETS_DIR = os.path.dirname(os.path.abspath(__file__))


def preset_files(family: str) -> dict[str, str]:
    """``{preset name: JSON path}`` shipped for ``family`` (empty when it has none)."""
    folder = os.path.join(PRESETS_DIR, family)
    if not os.path.isdir(folder):
        return {}
    return {name[:-5]: os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".json")}
