"""Hostile inputs and faults (issue 15): each is one line from ``genmod`` (exit 2, naming the argument or
file, no traceback), nothing on disk is damaged, pickles are never loaded, and a run resumes from its
newest intact checkpoint."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from genmod.cli import main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_flow_pipeline import tiny_transformer  # noqa: E402


def run_cli(capsys, *argv) -> tuple[int, list[str], str]:
    """``genmod ARGV`` in this process: exit code, the non-empty stderr lines, stdout."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def assert_one_line_error(capsys, argv, *needles):
    code, lines, _ = run_cli(capsys, *argv)
    assert code == 2 and len(lines) == 1, lines
    assert "Traceback" not in lines[0] and all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from genmod.flow.pipeline import FlowMatchingPipeline
    from genmod.flow.scheduler import FlowMatchSolverScheduler

    path = tmp_path_factory.mktemp("pipe") / "pipe"
    FlowMatchingPipeline(tiny_transformer(), FlowMatchSolverScheduler()).save_pretrained(path)
    return path


def _tree(path) -> dict:
    return {os.path.relpath(os.path.join(r, n), path): open(os.path.join(r, n), "rb").read()
            for r, _, names in os.walk(path) for n in names}


# ---------------------------------------------------------------------------------------------
# genmod sample: values no solver can use


@pytest.mark.parametrize("flags,needles", [
    (["--steps", "0"], ["--num-inference-steps/--steps", ">= 1, got 0"]),
    (["--num-inference-steps=-3"], ["--num-inference-steps/--steps", ">= 1, got -3"]),
    (["--num", "0"], ["--num", "got --num 0"]),
    (["--batch-size=-1"], ["--batch-size", "--batch-size -1"]),
    (["--guidance", "nan"], ["--guidance-scale/--guidance", "finite", "nan"]),
    (["--guidance", "inf"], ["--guidance-scale/--guidance", "finite", "inf"]),
    (["--guidance=-inf"], ["--guidance-scale/--guidance", "finite", "-inf"]),
    (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["--temperature=-1"], ["--temperature", ">= 0.0"]),
])
def test_sample_rejects_unusable_values_before_writing(capsys, pipe_dir, tmp_path, flags, needles):
    before = _tree(pipe_dir)
    out = tmp_path / "grid.png"
    assert_one_line_error(capsys, ["sample", pipe_dir, "--out", out, *flags], "genmod sample: error:", *needles)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "grid.json")
    assert _tree(pipe_dir) == before


# ---------------------------------------------------------------------------------------------
# Pipeline folders with broken or pickled weights


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_component_weights_are_one_line_naming_the_file(capsys, pipe_dir, tmp_path):
    broken = _copy(pipe_dir, tmp_path / "broken")
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_one_line_error(capsys, ["sample", broken, "--out", tmp_path / "o.png"], str(weights), "truncated")
    weights.write_bytes(b"\x00" * 5)
    assert_one_line_error(capsys, ["sample", broken, "--out", tmp_path / "o.png"], str(weights), "truncated")
    assert not os.path.exists(tmp_path / "o.png")


def test_pickled_component_weights_are_refused_never_unpickled(capsys, pipe_dir, tmp_path):
    from safetensors.torch import load_file

    broken = _copy(pipe_dir, tmp_path / "pickled")
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    os.remove(weights)

    class Bomb:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    torch.save({"state": state, "bomb": Bomb()}, broken / "transformer" / "diffusion_pytorch_model.bin")
    line = assert_one_line_error(capsys, ["sample", broken, "--out", tmp_path / "o.png"],
                                 str(broken / "transformer" / "diffusion_pytorch_model.bin"), "pickled weights are refused")
    assert "only .safetensors" in line
    assert not os.path.exists(tmp_path / "PWNED") and not os.path.exists(tmp_path / "o.png")


# ---------------------------------------------------------------------------------------------
# eval-folder with an unreadable image


def test_eval_folder_names_the_unreadable_image(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GENMOD_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    bad = tmp_path / "a" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    assert_one_line_error(capsys, ["eval-folder", tmp_path / "a", tmp_path / "b", "--metrics", "fid"],
                          "genmod eval-folder: error:", str(bad), "unreadable image")
    cut = tmp_path / "b" / "1.png"
    cut.write_bytes(cut.read_bytes()[:60])
    assert_one_line_error(capsys, ["eval-folder", tmp_path / "b", tmp_path / "a", "--metrics", "fid"], str(cut),
                          "unreadable image")
