"""Atomic training checkpoints (docs/DESIGN.md §3).

Layout::

    OUTPUT/checkpoints/
        step-00000100/
            model/               diffusers save_pretrained (config.json + safetensors)
            ema/                 the EMA weights, same format (when EMA is on)
            training_state.pt    optimizer, lr scheduler, grad scaler, RNG states (plain tensors)
            rng_rank1.pt ...     RNG states of the other processes (multi-process runs)
            trainer_state.json   step, epoch, data position, samples seen, family
            train_config.json    the full config
            manifest.json        every other file's relative path, size and sha256 (written last)
        latest                   text file naming the newest complete checkpoint

A checkpoint is written into ``.tmp-step-00000100`` in the same folder, every file is fsynced, and
the folder is renamed with ``os.replace``: a process killed mid-write leaves no ``step-*`` folder
and ``latest`` still names the previous complete one. ``latest`` is replaced atomically too.
``manifest.json`` is written last into the staging folder, so a checkpoint damaged afterwards (a
truncated or edited file) is found by :func:`checkpoint_integrity`; checkpoints written before manifests
existed are accepted as "unverified" when their weights are well-formed safetensors.
Everything in ``training_state.pt`` loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from genmod.core.files import CorruptFileError, check_weights_folder, read_manifest, verify_manifest, write_manifest

__all__ = ["CheckpointError", "checkpoint_name", "prepare_staging", "save_rank_rng", "write_checkpoint",
           "find_checkpoint", "list_checkpoints", "prune_checkpoints", "load_training_state", "load_weights",
           "get_rng_state", "set_rng_state", "read_trainer_state", "checkpoint_integrity"]

STEP_DIR = re.compile(r"^step-(\d{8})$")
REQUIRED_FILES = ("trainer_state.json", "training_state.pt", "train_config.json", "model/config.json")


class CheckpointError(FileNotFoundError):
    """A missing, incomplete or corrupt checkpoint; the message names the path."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(os.fspath(output_dir), "checkpoints")


# --------------------------------------------------------------------------------------------
# RNG states as plain tensors / numbers (no pickled objects)


def get_rng_state() -> dict:
    """torch / cuda / numpy / python RNG states of this process, weights_only-loadable."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Writing


def _fsync_tree(path: str) -> None:
    """fsync every file and folder under ``path`` so the rename publishes durable data."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def prepare_staging(output_dir: str, step: int) -> str:
    """Main process: a fresh, empty ``.tmp-step-XXXXXXXX`` folder next to the checkpoints."""
    root = checkpoints_root(output_dir)
    os.makedirs(root, exist_ok=True)
    staging = os.path.join(root, f".tmp-{checkpoint_name(step)}")
    if os.path.exists(staging):  # left by a run killed mid-write
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def save_rank_rng(staging: str, rank: int) -> None:
    """Any process other than the main one: its RNG states into the staging folder."""
    torch.save(get_rng_state(), os.path.join(staging, f"rng_rank{rank}.pt"))


def _save_model(model: torch.nn.Module, folder: str) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, safe_serialization=True)
    else:  # a plain nn.Module: weights only
        from safetensors.torch import save_model

        os.makedirs(folder, exist_ok=True)
        save_model(model, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"_class_name": type(model).__name__}, f)


def write_checkpoint(staging: str, step: int, *, model: torch.nn.Module, ema_model: torch.nn.Module | None,
                     training_state: dict, trainer_state: dict, config, keep_last: int = 0) -> str:
    """Main process: fill ``staging``, fsync, rename to ``step-XXXXXXXX``, update ``latest``, prune.

    ``training_state`` must hold only tensors / numbers / strings / lists / dicts.
    """
    from .config import save_config

    root = os.path.dirname(staging)
    name = checkpoint_name(step)
    final = os.path.join(root, name)
    _save_model(model, os.path.join(staging, "model"))
    if ema_model is not None:
        _save_model(ema_model, os.path.join(staging, "ema"))
    torch.save(training_state, os.path.join(staging, "training_state.pt"))
    with open(os.path.join(staging, "trainer_state.json"), "w") as f:
        json.dump({**trainer_state, "integrity": "manifest.json"}, f, indent=2)
    save_config(config, os.path.join(staging, "train_config.json"))
    write_manifest(staging)  # last: it covers every other file, the other ranks' RNG files included
    _fsync_tree(staging)

    if os.path.exists(final):  # same step written before by a run that was later resumed from earlier
        trash = os.path.join(root, f".trash-{name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(root)
    _atomic_write_text(os.path.join(root, "latest"), name + "\n")
    if keep_last > 0:
        prune_checkpoints(os.path.dirname(root), keep_last)
    return final


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the ``step-*`` folders, oldest first (staging folders excluded)."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        match = STEP_DIR.match(entry)
        if match and os.path.isdir(os.path.join(root, entry)):
            found.append((int(match.group(1)), os.path.join(root, entry)))
    return sorted(found)


def prune_checkpoints(output_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    root = checkpoints_root(output_dir)
    latest_name = None
    latest_file = os.path.join(root, "latest")
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            latest_name = f.read().strip()
    checkpoints = list_checkpoints(output_dir)
    removed = []
    for _, path in checkpoints[:-keep_last] if keep_last > 0 else []:
        if os.path.basename(path) == latest_name:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for stale in glob.glob(os.path.join(root, ".trash-*")):
        shutil.rmtree(stale, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------------------------
# Finding and reading


def _validate(path: str) -> str:
    for rel in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(path, rel)):
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (missing {rel})")
    if not glob.glob(os.path.join(path, "model", "*.safetensors")):
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (no model/*.safetensors)")
    try:
        read_trainer_state(path)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt (trainer_state.json: {err})") from None
    checkpoint_integrity(path)
    return path


def checkpoint_integrity(path: str) -> str:
    """``"ok"`` when every file matches ``manifest.json``; ``"unverified"`` for a checkpoint written before
    manifests whose weights are well formed; raises :class:`CheckpointError` naming what is wrong otherwise."""
    try:
        files = read_manifest(path)
        if files is None:
            if "integrity" in read_trainer_state(path):  # written with a manifest that is now gone
                raise CorruptFileError("manifest.json is missing")
            for sub in ("model", "ema"):
                if os.path.isdir(os.path.join(path, sub)):
                    check_weights_folder(os.path.join(path, sub))
            return "unverified"
        problems = verify_manifest(path)
    except CorruptFileError as err:
        raise CheckpointError(f"checkpoint {path} is corrupt ({err})") from None
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt ({'; '.join(problems[:3])})")
    return "ok"


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("no integer 'step'")
    return state


def find_checkpoint(output_dir: str, which: str = "latest") -> str:
    """Path of a complete checkpoint.

    ``which="latest"``: the one ``OUTPUT/checkpoints/latest`` names. Otherwise ``which`` is a path:
    a checkpoint folder, or an output / ``checkpoints`` folder whose latest is taken.
    Raises :class:`CheckpointError` naming the path when it is missing or incomplete.
    """
    if which != "latest":
        path = os.fspath(which)
        if not os.path.exists(path):
            raise CheckpointError(f"no checkpoint at {path}")
        if os.path.isfile(os.path.join(path, "trainer_state.json")) or STEP_DIR.match(os.path.basename(path.rstrip("/"))):
            return _validate(path)
        if os.path.isfile(os.path.join(path, "latest")):  # a checkpoints/ folder
            return find_checkpoint(os.path.dirname(os.path.abspath(path)), "latest")
        if os.path.isdir(os.path.join(path, "checkpoints")):
            return find_checkpoint(path, "latest")
        raise CheckpointError(f"{path} is not a checkpoint folder (no trainer_state.json, no checkpoints/latest)")
    root = checkpoints_root(output_dir)
    latest_file = os.path.join(root, "latest")
    if not os.path.isfile(latest_file):
        raise CheckpointError(f"no checkpoint in {output_dir} ({latest_file} is missing)")
    with open(latest_file) as f:
        name = f.read().strip()
    if not STEP_DIR.match(name):
        raise CheckpointError(f"{latest_file} is corrupt (names {name!r}, expected step-XXXXXXXX)")
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{latest_file} names {path}, which does not exist")
    return _validate(path)


def load_training_state(path: str) -> dict:
    """``training_state.pt`` of a checkpoint (weights_only: no pickled objects)."""
    file = os.path.join(path, "training_state.pt")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files
        raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from None


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file(s) in a ``model/`` or ``ema/`` folder."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except Exception as err:
            raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from None
    return tensors


GENERATOR_COMPONENTS = ("transformer", "unet", "model")


def _component_folder(path: str, model: torch.nn.Module) -> str:
    """The folder holding ``model``'s weights: ``path`` itself, or the pipeline component of ``model``'s class."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    for name in GENERATOR_COMPONENTS:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] == type(model).__name__:
            return os.path.join(path, name)
    components = {k: v[1] for k, v in index.items() if isinstance(v, list) and len(v) == 2}
    hint = " (flow: pass --backbone dit for a FlowTransformer)" if "FlowTransformer" in components.values() else ""
    raise CheckpointError(f"--init_weights: {path} has no {type(model).__name__} component (it holds {components}); "
                          f"pass the flags of the run that made it{hint}")


def _config_differences(folder: str, model: torch.nn.Module) -> list[str]:
    """``key: saved != configured`` for the architecture fields where the folder's config.json and ``model`` differ."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file) or not hasattr(model, "config"):
        return []
    with open(config_file) as f:
        saved = json.load(f)
    ours = json.loads(json.dumps(dict(model.config), default=list))  # tuples as lists, as saved
    return [f"{key}: {saved[key]!r} != {ours[key]!r}" for key in sorted(ours)
            if key in saved and not key.startswith("_") and saved[key] != ours[key]]


def load_initial_weights(model: torch.nn.Module, path: str) -> str:
    """Load ``--init_weights`` (a model folder or a pipeline folder) into ``model`` strictly; returns the folder read.

    A mismatch is one line naming the first differing config fields (the flags to pass) or the key counts.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"--init_weights: {path} is not a folder")
    folder = _component_folder(path, model)
    state = load_weights(folder)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        differences = _config_differences(folder, model)
        detail = ("; ".join(differences[:3]) + " (pass the same flags as the run that made it)") if differences \
            else str(err).strip().splitlines()[0]
        raise CheckpointError(f"--init_weights: {folder} does not fit the configured {type(model).__name__}: {detail}") from None
    return folder
