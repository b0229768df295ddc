"""Outputs are atomic (issue 15): every file a command writes appears whole or not at all. A writer that
fails midway leaves the previous file intact and no temporary file; an output path that cannot be written
is one line (exit 2) naming it, before anything loads."""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hostile_inputs import _tree, assert_one_line_error, pipe_dir, run_cli  # noqa: E402,F401

from genmod.core.files import OutputPathError, atomic_dir, atomic_path, atomic_write  # noqa: E402


class Cut(RuntimeError):
    """The fault injected midway through a writer."""


def _half_then_fail(path, *args, **kwargs):
    with open(path if isinstance(path, str) else path.name, "wb") as f:
        f.write(b"half a file")
    raise Cut("interrupted")


def _only(folder, expected):
    assert sorted(os.listdir(folder)) == sorted(expected), os.listdir(folder)


# ---------------------------------------------------------------------------------------------
# the helpers


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text('{"old": 1}')
    with pytest.raises(Cut):
        with atomic_write(target) as f:
            f.write('{"new": ')
            raise Cut("interrupted")
    assert target.read_text() == '{"old": 1}'
    _only(tmp_path, ["report.json"])
    with atomic_write(target) as f:
        json.dump({"new": 2}, f)
    assert json.loads(target.read_text()) == {"new": 2}
    _only(tmp_path, ["report.json"])


def test_atomic_dir_keeps_the_old_folder_when_the_export_fails(tmp_path):
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "model_index.json").write_text("old")
    with pytest.raises(Cut):
        with atomic_dir(target, replace=True) as staging:
            open(os.path.join(staging, "model_index.json"), "w").write("new, half")
            raise Cut("interrupted")
    assert _tree(target) == {"model_index.json": b"old"}
    _only(tmp_path, ["pipeline"])
    with atomic_dir(target, replace=True) as staging:
        open(os.path.join(staging, "model_index.json"), "w").write("new")
    assert _tree(target) == {"model_index.json": b"new"}
    _only(tmp_path, ["pipeline"])
    with pytest.raises(OutputPathError, match="already exists"):
        with atomic_dir(target):
            pass


@pytest.mark.parametrize("writer", ["grid", "wav", "gif"])
def test_data_io_writers_keep_the_old_file(tmp_path, monkeypatch, writer):
    import soundfile
    from PIL import Image

    from genmod.data.io import save_gif, save_image_grid, save_wav

    ext = {"grid": ".png", "wav": ".wav", "gif": ".gif"}[writer]
    target = tmp_path / f"out{ext}"
    target.write_bytes(b"previous")
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: _half_then_fail(fp))
    monkeypatch.setattr(soundfile, "write", lambda fp, *a, **k: _half_then_fail(fp))
    with pytest.raises(Cut):
        if writer == "grid":
            save_image_grid(torch.zeros(2, 3, 4, 4), target)
        elif writer == "wav":
            save_wav(target, torch.zeros(100), 16000)
        else:
            save_gif(target, torch.zeros(2, 3, 4, 4))
    assert target.read_bytes() == b"previous"
    _only(tmp_path, [f"out{ext}"])


def test_eval_report_keeps_the_old_report(tmp_path, monkeypatch):
    from genmod.evals import report

    report.write_report({"markdown": "old\n", "fid": 1.0}, str(tmp_path))
    before = _tree(tmp_path)
    monkeypatch.setattr(report.json, "dump", lambda obj, f, **k: (f.write('{"fid": '), _half_then_fail(f.name)))
    with pytest.raises(Cut):
        report.write_report({"markdown": "new\n", "fid": 2.0}, str(tmp_path))
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# genmod sample and export-diffusers


def test_sample_cut_while_writing_keeps_old_outputs(capsys, pipe_dir, tmp_path, monkeypatch):
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    argv = ["sample", pipe_dir, "--num", "2", "--steps", "1", "--out", out, "--npz", npz, "--save-individual",
            tmp_path / "each", "--device", "cpu"]
    assert run_cli(capsys, *argv)[0] == 0
    before = _tree(tmp_path)
    assert sorted(before) == ["each/000000.png", "each/000001.png", "grid.json", "grid.png", "s.npz"]
    monkeypatch.setattr(np, "savez", _half_then_fail)
    with pytest.raises(Cut):  # not a user error: the traceback is the point, the files are what is checked
        run_cli(capsys, *argv)
    assert _tree(tmp_path) == before  # grid rewritten identically, the npz untouched, no temp file


@pytest.mark.parametrize("case", ["out_is_folder", "out_under_file", "out_read_only", "individual_is_file",
                                  "npz_read_only", "npz_is_folder"])
def test_sample_unwritable_outputs_are_one_line_before_loading(capsys, pipe_dir, tmp_path, case):
    (tmp_path / "file.txt").write_text("keep")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, stat.S_IRUSR | stat.S_IXUSR)
    flags, named = {
        "out_is_folder": (["--out", tmp_path], f"{tmp_path}: is a folder"),
        "out_under_file": (["--out", tmp_path / "file.txt" / "g.png"], f"{tmp_path / 'file.txt'} is a file"),
        "out_read_only": (["--out", locked / "g.png"], f"folder {locked} is read-only"),
        "individual_is_file": (["--save-individual", tmp_path / "file.txt"], f"{tmp_path / 'file.txt'}: is a file"),
        "npz_read_only": (["--npz", locked / "s"], f"{locked / 's.npz'}: cannot be written"),
        "npz_is_folder": (["--npz", locked], f"{locked}.npz"),
    }[case]
    if case == "npz_is_folder":
        (tmp_path / "locked.npz").mkdir()
        named = f"{tmp_path / 'locked.npz'}: is a folder"
    before, pipe_before = _tree(tmp_path), _tree(pipe_dir)
    out = [] if "--out" in flags else ["--out", tmp_path / "g.png"]
    try:
        assert_one_line_error(capsys, ["sample", pipe_dir, *out, *flags], "genmod sample: error:", named)
    finally:
        os.chmod(locked, stat.S_IRWXU)
    assert _tree(tmp_path) == before and _tree(pipe_dir) == pipe_before


def test_export_diffusers_cut_midway_leaves_nothing(capsys, pipe_dir, tmp_path, monkeypatch):
    from genmod.pipelines import export

    target = tmp_path / "exported"
    monkeypatch.setattr(export, "_write_modules", lambda *a, **k: (_ for _ in ()).throw(Cut("interrupted")))
    with pytest.raises(Cut):
        run_cli(capsys, "export-diffusers", pipe_dir, target)
    _only(tmp_path, [])
    monkeypatch.undo()
    assert run_cli(capsys, "export-diffusers", pipe_dir, target)[0] == 0
    assert os.path.isfile(target / "model_index.json")
    _only(tmp_path, ["exported"])
    before = _tree(target)
    assert_one_line_error(capsys, ["export-diffusers", pipe_dir, target], f"{target}: already exists")
    (tmp_path / "file.txt").write_text("keep")
    assert_one_line_error(capsys, ["export-diffusers", pipe_dir, tmp_path / "file.txt"], "file.txt: is a file")
    assert _tree(target) == before and (tmp_path / "file.txt").read_text() == "keep"
