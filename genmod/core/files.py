"""File integrity: safetensors structure, refusing pickles, sha256 manifests of folders.

* :func:`check_safetensors`: the header parses and the tensors' byte ranges end exactly at the end
  of the file (a truncated or foreign file fails), without reading the tensors.
* :func:`check_weights_folder`: a model folder holds ``.safetensors`` weights, all well formed; a
  folder holding only pickled weights (``.bin``, ``.pt``, ...) is refused, never unpickled.
* :func:`write_manifest` / :func:`verify_manifest`: ``manifest.json`` lists every file of a folder
  (relative path, size, sha256); verifying names each missing, resized or changed file.

* :func:`atomic_path` / :func:`atomic_write` / :func:`atomic_dir`: outputs are written under a temporary
  name in their own folder and renamed when complete, so an interrupted writer leaves the previous file
  (or nothing) and no temporary file; :func:`check_output_path` turns an unwritable output path into a
  one-line :class:`OutputPathError`.

Every error is a :class:`CorruptFileError` or :class:`OutputPathError` (both ``ValueError``) whose
one-line message names the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import struct

__all__ = ["CorruptFileError", "MANIFEST", "PICKLE_SUFFIXES", "check_safetensors", "check_weights_folder",
           "file_sha256", "write_manifest", "read_manifest", "verify_manifest", "OutputPathError", "check_output_path",
           "atomic_path", "atomic_write", "atomic_dir", "read_json_object", "load_model_folder"]

MANIFEST = "manifest.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100 * 1024 * 1024


class CorruptFileError(ValueError):
    """A truncated, foreign or refused file; the message names it."""


def check_safetensors(path: str) -> None:
    """Raise :class:`CorruptFileError` unless ``path`` is a complete safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER):
            raise CorruptFileError(f"{path}: truncated or not a safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise CorruptFileError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors header")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise CorruptFileError(f"{path}: truncated or corrupt safetensors file ({size} bytes, its header needs {expected})")


def check_weights_folder(folder: str) -> list[str]:
    """The ``.safetensors`` files of a model folder, each checked; pickled weights alone are refused."""
    names = sorted(os.listdir(folder))
    tensors = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
    pickles = [os.path.join(folder, n) for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles and not tensors:
        raise CorruptFileError(f"{pickles[0]}: pickled weights are refused (loading them can run code); "
                               "genmod loads only .safetensors")
    for path in tensors:
        check_safetensors(path)
    return tensors


def read_json_object(path: str) -> dict:
    """A JSON file holding an object; a missing, unreadable or non-object file is a one-line error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: invalid JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_model_folder(folder: str, load, config: str = "config.json", weights: bool = True):
    """``load()`` of a model folder, after checking it: ``config`` is a JSON object, the weights are complete
    ``.safetensors`` (never a pickle; ``weights=False`` for weight-less folders such as schedulers). Whatever
    the loader then raises (a config value of the wrong type, weights of another shape or another model)
    becomes one :class:`CorruptFileError` naming the folder."""
    read_json_object(os.path.join(folder, config))
    if weights and not check_weights_folder(folder):
        raise CorruptFileError(f"{folder}: no .safetensors weights")
    try:
        model = load()
    except (OSError, RuntimeError, TypeError, ValueError, KeyError, AttributeError, NotImplementedError) as err:
        if isinstance(err, (CorruptFileError, OutputPathError)):
            raise
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        if isinstance(err, NotImplementedError) and "meta tensor" in detail:
            detail = "its weights do not fit its config.json (tensors missing or foreign)"
        raise CorruptFileError(f"{folder}: cannot be loaded ({type(err).__name__}: {detail})") from None
    check_no_missing_weights(model, folder)
    return model


def check_no_missing_weights(model, folder: str) -> None:
    """diffusers leaves the tensors a weights file lacks on the meta device (a foreign or partial file): one line."""
    state = model.state_dict() if hasattr(model, "state_dict") and callable(model.state_dict) else {}
    missing = [key for key, value in state.items() if getattr(value, "is_meta", False)]
    if missing:
        raise CorruptFileError(f"{folder}: its weights lack {len(missing)} tensors of the model its config.json "
                               f"describes (e.g. {missing[0]!r}); a foreign or partial file")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def write_manifest(folder: str) -> str:
    """Write ``folder/manifest.json`` (every other file: size and sha256); returns its path."""
    files = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": file_sha256(os.path.join(folder, rel))}
             for rel in _files(folder)}
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_manifest(folder: str) -> dict | None:
    """The manifest's ``files`` table; None when the folder has none; a corrupt one raises."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError
        return files
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CorruptFileError(f"{path}: corrupt manifest") from None


def verify_manifest(folder: str) -> list[str]:
    """Problems of ``folder`` against its manifest (empty: intact); raises when there is no manifest."""
    files = read_manifest(folder)
    if files is None:
        raise CorruptFileError(f"{os.path.join(folder, MANIFEST)}: missing")
    problems = []
    for rel, entry in sorted(files.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != entry.get("size"):
            problems.append(f"{rel} has {os.path.getsize(path)} bytes, the manifest says {entry.get('size')}")
        elif file_sha256(path) != entry.get("sha256"):
            problems.append(f"{rel} does not match its sha256")
    return problems


# ---------------------------------------------------------------------------------------------
# Atomic outputs

_COUNTER = itertools.count()


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names it."""


def _writable(folder: str) -> bool:
    """Writable, and not marked read-only (no write bit), which even root respects here."""
    return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)


def check_output_path(path, folder: bool = False) -> str:
    """``path`` as a string, or a one-line :class:`OutputPathError` when it cannot be written: a folder
    where a file goes (or a file where a folder goes), a parent that is a file, a read-only folder.
    Missing parent folders are fine (writers create them)."""
    path = os.fspath(path)
    if not path:
        raise OutputPathError("empty output path")
    if not folder and os.path.isdir(path):
        raise OutputPathError(f"{path}: is a folder; give a file name")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{path}: is a file, not a folder")
    nearest = path if folder and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise OutputPathError(f"{path}: cannot be written, {nearest} is a file, not a folder")
    if not _writable(nearest):
        raise OutputPathError(f"{path}: cannot be written, folder {nearest} is read-only")
    return path


def _temp_sibling(path: str, tag: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.{tag}-{os.getpid()}-{next(_COUNTER)}{ext}")


def _make_folder(folder: str, path: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"{path}: cannot create its folder ({err.strerror})") from None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same extension, so writers that pick a format from the
    name still work); when the block ends normally it is fsynced and renamed onto ``path``, otherwise
    removed. An existing ``path`` is untouched until the rename."""
    path = check_output_path(path)
    _make_folder(os.path.dirname(os.path.abspath(path)), path)
    tmp = _temp_sibling(path, "tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **kwargs):
    """``open(path, mode)`` through :func:`atomic_path`: the file appears complete or not at all."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


@contextlib.contextmanager
def atomic_dir(path, replace: bool = False, manifest: bool = False):
    """Yield an empty staging folder beside ``path``; renamed onto ``path`` when the block ends normally
    (an existing ``path`` is replaced only with ``replace``, after the new folder is complete), removed
    otherwise. ``manifest``: :func:`write_manifest` into the staging folder last, before the rename."""
    path = check_output_path(path, folder=True)
    if os.path.exists(path) and not replace:
        raise OutputPathError(f"{path}: already exists; choose a new folder")
    _make_folder(os.path.dirname(os.path.abspath(path)), path)
    staging = _temp_sibling(path, "tmp")
    os.makedirs(staging)
    try:
        yield staging
        if manifest:
            write_manifest(staging)
        if os.path.exists(path):
            old = _temp_sibling(path, "old")
            os.rename(path, old)
            os.rename(staging, path)
            _remove(old)
        else:
            os.rename(staging, path)
    except BaseException:
        _remove(staging)
        raise
