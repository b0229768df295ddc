"""Checking a run's files: the newest intact checkpoint to resume from, and ``genmod verify RUN_DIR``.

* :func:`find_resumable`: ``--resume latest`` takes the checkpoint ``checkpoints/latest`` names, or,
  when that one is broken (a file truncated or changed since its manifest was written, the manifest
  gone), the newest intact one before it; the broken ones are returned for the one-line warnings.
* :func:`verify_run` / :func:`main`: one line per checkpoint, ``latest``, ``final_model/`` and the exported
  ``pipeline/`` folder (ok / unverified / what is wrong; folders against their ``manifest.json``), or one
  line for a pipeline folder given itself (``genmod export-diffusers`` / ``genmod import`` output); exit 0
  when all are intact, 2 otherwise.
"""

from __future__ import annotations

import argparse
import os

from genmod.core.files import MANIFEST, CorruptFileError, check_weights_folder, read_json_object, verify_manifest

from .checkpoint import STEP_DIR, CheckpointError, checkpoints_root, find_checkpoint, list_checkpoints

__all__ = ["find_resumable", "verify_run", "main"]


def _latest_step(output_dir: str) -> int | None:
    """The step ``checkpoints/latest`` names; None when the file is missing or unreadable."""
    try:
        with open(os.path.join(checkpoints_root(output_dir), "latest")) as f:
            match = STEP_DIR.match(f.read().strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(match.group(1)) if match else None


def find_resumable(output_dir: str) -> tuple[str, list[str]]:
    """``(path, broken)``: the newest intact checkpoint at or before the one ``latest`` names, and the
    one-line reasons of the newer ones skipped. Raises :class:`CheckpointError` when none is intact."""
    latest = _latest_step(output_dir)
    candidates = [(step, path) for step, path in list_checkpoints(output_dir) if latest is None or step <= latest]
    broken = []
    for _, path in reversed(candidates):
        try:
            return find_checkpoint(output_dir, path), broken
        except CheckpointError as err:
            broken.append(str(err))
    if broken:
        raise CheckpointError(f"no intact checkpoint in {output_dir}: {broken[0]}"
                              + (f" (and {len(broken) - 1} older ones broken)" if len(broken) > 1 else ""))
    raise CheckpointError(f"no checkpoint in {output_dir}")


def _checkpoint_lines(run_dir: str) -> list[tuple[bool, str]]:
    lines = []
    for _, path in list_checkpoints(run_dir):
        try:
            find_checkpoint(run_dir, path)  # required files, then every file against the manifest
        except CheckpointError as err:
            lines.append((False, f"{path}: BROKEN: {(str(err).splitlines() or [''])[0]}"))
            continue
        verified = os.path.isfile(os.path.join(path, MANIFEST))
        lines.append((True, f"{path}: ok" if verified else f"{path}: unverified (no manifest: written before "
                                                                   "manifests; its weights are well formed)"))
    latest = os.path.join(checkpoints_root(run_dir), "latest")
    if lines and not os.path.isfile(latest):
        lines.append((False, f"{latest}: BROKEN: missing (--resume latest takes the newest intact checkpoint)"))
    if os.path.isfile(latest):
        step = _latest_step(run_dir)
        names = {os.path.basename(path) for _, path in list_checkpoints(run_dir)}
        fine = step is not None and f"step-{step:08d}" in names
        lines.append((fine, f"{latest}: names step-{step:08d}" if fine else f"{latest}: BROKEN: names no checkpoint"))
    return lines


def _model_folder_line(folder: str) -> tuple[bool, str]:
    """A pipeline folder (structure: :func:`~genmod.pipelines.base.check_pipeline_folder`) or a model folder
    (config.json and weights); then its ``manifest.json`` when it has one."""
    try:
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            from genmod.pipelines.base import check_pipeline_folder

            check_pipeline_folder(folder)
        else:
            read_json_object(os.path.join(folder, "config.json"))
            check_weights_folder(folder)
        problems = verify_manifest(folder) if os.path.isfile(os.path.join(folder, MANIFEST)) else None
    except (CorruptFileError, OSError) as err:
        return False, f"{folder}: BROKEN: {(str(err).splitlines() or [''])[0]}"
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return False, f"{folder}: BROKEN: " + "; ".join(problems[:3]) + more
    return True, f"{folder}: ok" if problems is not None else f"{folder}: ok (no manifest: structure checked)"


def verify_run(run_dir: str) -> list[tuple[bool, str]]:
    """``(intact, line)`` per checkpoint, ``latest`` and the ``pipeline`` folder of a training output folder."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if os.path.isfile(os.path.join(run_dir, "model_index.json")):  # a pipeline folder itself (exported, imported)
        return [_model_folder_line(run_dir)]
    lines = _checkpoint_lines(run_dir)
    for name in ("final_model", "pipeline"):
        if os.path.isdir(os.path.join(run_dir, name)):
            lines.append(_model_folder_line(os.path.join(run_dir, name)))
    if not lines:
        raise ValueError(f"{run_dir}: no checkpoints, no final_model/ and no pipeline/ folder to verify")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``genmod verify RUN_DIR``."""
    parser = argparse.ArgumentParser(prog="genmod verify", description="check a run's checkpoints (against their "
                                     "manifests) and its pipeline folder; exit 0 when all are intact, 2 otherwise")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    lines = verify_run(args.run_dir)
    for _, line in lines:
        print(line)
    return 0 if all(intact for intact, _ in lines) else 2
