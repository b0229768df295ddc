"""Reading released checkpoints safely and writing pipeline folders atomically.

* ``load_state_dict(path)``: ``.safetensors`` through safetensors; ``.pt/.pth/.ckpt/.bin`` through
  ``torch.load(weights_only=True)`` only. A file that needs code execution to unpickle is refused in
  one line that says so (never retried unsafely). ``key`` picks a sub-dict (``"ema"``, ``"model"``,
  ``"state_dict"``) when the file holds several.
* ``resolve_file(spec, repo_file)``: a local path, or ``hub:REPO_ID/FILE`` downloaded through
  ``huggingface_hub`` when it is installed and online; offline the error names the file to fetch by
  hand and where to pass it.
* ``check_keys(...)``: the one-line "wrong model" error (missing / unexpected counts and the KIND
  that the keys look like).
* ``atomic_output(out)``: a context manager that yields a staging folder beside ``out`` and renames it
  into place only when the import finished, so nothing half-written stays at ``--out``.
"""

from __future__ import annotations

import os
import pickle
from typing import Iterable, Optional

import torch

from genmod.core.files import atomic_dir, check_safetensors

HUB_PREFIX = "hub:"


class ImportError_(ValueError):
    """A user-facing import error (one line)."""


def guess_kind(keys, fingerprints) -> Optional[str]:
    """The KIND whose fingerprint (a key fragment only its checkpoints have) appears in ``keys``, or None.

    ``fingerprints``: ``((fragment, KIND), ...)`` in the order to try, each importer listing the others.
    """
    return next((kind for fragment, kind in fingerprints if any(fragment in key for key in keys)), None)


def read_official(spec: str, what: str, download: str, key=None) -> tuple[str, dict]:
    """``(path, state dict)`` of a released checkpoint given as a path or ``hub:`` id; a missing local file is
    one line saying where to ``download`` it. ``key`` picks the sub-dict (``"ema"``, ``"model"``, ...)."""
    if not spec.startswith(HUB_PREFIX) and not os.path.isfile(spec):
        raise ImportError_(f"{what}: no such file {spec!r}; {download} and pass its path")
    path = resolve_file(spec, what)
    return path, load_state_dict(path, key=key)


def resolve_file(spec: str, what: str = "checkpoint") -> str:
    """A local file for ``spec``: an existing path, or ``hub:ORG/REPO/PATH/IN/REPO`` fetched through huggingface_hub."""
    if not spec.startswith(HUB_PREFIX):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"{what}: no such file {spec!r}")
        return spec
    repo_and_file = spec[len(HUB_PREFIX):]
    parts = repo_and_file.split("/")
    if len(parts) < 3:
        raise ValueError(f"{what}: expected hub:ORG/REPO/FILE, got {spec!r}")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    manual = (f"download https://huggingface.co/{repo_id}/resolve/main/{filename} by hand and pass its local path "
              f"instead of {spec!r}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError_(f"{what}: huggingface_hub is not installed; {manual}") from None
    try:
        return hf_hub_download(repo_id, filename)
    except Exception as err:  # offline, 404, auth: one line with the manual route
        raise ImportError_(f"{what}: could not download {filename} from {repo_id} ({type(err).__name__}); {manual}") from None


def load_state_dict(path: str, key: Optional[str | Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, read without executing code; ``key`` (or the first present of several) picks a sub-dict."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        check_safetensors(path)  # truncated or foreign: one line naming the file
        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ImportError_(f"{path}: refused: unpickling it would execute code ({_first_line(err)}); "
                               f"only weights-only checkpoints are read") from None
        except Exception as err:
            detail = f"{type(err).__name__}: {_first_line(err)}" if _first_line(err) else f"{type(err).__name__}, empty or cut file"
            raise ImportError_(f"{path}: not a readable checkpoint ({detail})") from None
    keys = [key] if isinstance(key, str) else list(key or [])
    for name in keys:
        if isinstance(state, dict) and isinstance(state.get(name), dict):
            state = state[name]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ImportError_(f"{path}: expected a state dict of tensors (under one of {keys or 'the top level'}), found {found}")
    return state


def _first_line(err: Exception) -> str:
    """The first line of an error's message (at most 120 characters; empty messages stay empty)."""
    return (str(err).strip().splitlines() or [""])[0][:120]


def check_keys(path: str, kind: str, expected: Iterable[str], found: Iterable[str], guess: Optional[str] = None) -> None:
    """One line when ``found`` keys are not ``expected``: how many missing / unexpected, and the KIND they look like."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not missing and not unexpected:
        return
    hint = f"; it looks like a {guess} checkpoint (genmod import {guess} ...)" if guess and guess != kind else ""
    example = (missing or unexpected)[0]
    raise ImportError_(f"{path}: not a {kind} checkpoint: {len(missing)} keys missing, {len(unexpected)} unexpected "
                       f"(e.g. {example!r}){hint}")


def atomic_output(out: str):
    """The folder ``--out`` written through a staging folder beside it (:func:`genmod.core.files.atomic_dir`):
    it replaces ``out`` only when the import finished, so nothing half-written stays."""
    return atomic_dir(out, replace=True, manifest=True)
