"""``genmod import KIND CHECKPOINT [CHECKPOINT ...] --out PIPELINE_DIR [options]``.

KIND is a row of :data:`genmod.importers.IMPORTERS`; each importer module adds its own options
through ``add_arguments(parser)`` and runs as ``run(args) -> pipeline folder``.
"""

from __future__ import annotations

import argparse
import importlib

from genmod.core.files import check_output_path
from genmod.importers import IMPORTERS


def _load(kind: str):
    if kind not in IMPORTERS:
        known = ", ".join(sorted(IMPORTERS)) or "none"
        raise ValueError(f"KIND: unknown importer {kind!r} (known: {known})")
    module, function = IMPORTERS[kind][0].split(":")
    return importlib.import_module(module), function


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: genmod import KIND CHECKPOINT [CHECKPOINT ...] --out PIPELINE_DIR [options]\n\nkinds:")
        for kind, (_, help_text) in sorted(IMPORTERS.items()):
            print(f"  {kind:<22} {help_text}")
        return 0
    kind = argv[0]
    module, function = _load(kind)
    parser = argparse.ArgumentParser(prog=f"genmod import {kind}", description=IMPORTERS[kind][1])
    parser.add_argument("checkpoints", nargs="+", help="local files, or hub:ORG/REPO/FILE (downloaded when online)")
    parser.add_argument("--out", required=True, help="the pipeline folder to write (replaced only when the import succeeds)")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    check_output_path(args.out, folder=True)  # before any checkpoint is read
    out = getattr(module, function)(args)
    print(f"wrote {out}")
    return 0
