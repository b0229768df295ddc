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


# ---------------------------------------------------------------------------------------------
# Checkpoint manifests: resume falls back to the newest intact checkpoint; genmod verify


def _toy_run(out, **overrides):
    from test_trainer import run_toy, toy_config

    run_toy(toy_config(out, **{"max_steps": 6, "checkpoint_every": 2, **overrides}))


def _step(out, step):
    return out / "checkpoints" / f"step-{step:08d}"


def test_resume_latest_skips_broken_checkpoints_and_reproduces_the_run(tmp_path, caplog):
    from test_trainer import losses

    from genmod.train import find_checkpoint, load_weights

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _toy_run(straight)
    _toy_run(broken)
    weights = _step(broken, 6) / "model" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # still parses as far as the header goes
    os.remove(_step(broken, 4) / "manifest.json")
    intact = _tree(_step(broken, 2))
    with pytest.raises(Exception, match=r"step-00000006 is corrupt \(model/diffusion_pytorch_model.safetensors has"):
        find_checkpoint(broken, "latest")  # an explicit look at latest still fails loudly

    caplog.set_level("WARNING", logger="genmod.train")
    _toy_run(broken, resume="latest")
    warnings = [r.getMessage() for r in caplog.records if "skipping a broken checkpoint" in r.getMessage()]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert "step-00000006 is corrupt" in warnings[0] and "resuming from" in warnings[0] and warnings[0].endswith("step-00000002")
    assert "step-00000004 is corrupt (manifest.json is missing)" in warnings[1]
    assert len(losses(straight)) == 6 and losses(broken) == losses(straight)  # steps 3..6 rerun exactly
    a, b = load_weights(str(_step(straight, 6) / "model")), load_weights(str(_step(broken, 6) / "model"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert find_checkpoint(broken, "latest").endswith("step-00000006")  # rewritten intact
    assert _tree(_step(broken, 2)) == intact


def test_checkpoints_without_manifest_resume_as_unverified(tmp_path, capsys):
    import json

    from genmod.train import find_checkpoint

    _toy_run(tmp_path, max_steps=4)
    for step in (2, 4):  # as written before manifests existed
        os.remove(_step(tmp_path, step) / "manifest.json")
        state_file = _step(tmp_path, step) / "trainer_state.json"
        state = json.loads(state_file.read_text())
        del state["integrity"]
        state_file.write_text(json.dumps(state))
    assert find_checkpoint(tmp_path, "latest").endswith("step-00000004")
    capsys.readouterr()
    code, _, out = run_cli(capsys, "verify", tmp_path)
    assert code == 0 and out.splitlines()[0] == f"{_step(tmp_path, 2)}: unverified (no manifest: written before " \
                                                "manifests; its weights are well formed)"
    weights = _step(tmp_path, 4) / "model" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # an unverified checkpoint still gets the structure check
    code, _, out = run_cli(capsys, "verify", tmp_path)
    assert code == 2 and f"{_step(tmp_path, 4)}: BROKEN: checkpoint {_step(tmp_path, 4)} is corrupt ({weights}: " \
                         "truncated or corrupt safetensors file" in out


def test_verify_reports_each_checkpoint_latest_and_pipeline(tmp_path, capsys, pipe_dir):
    import shutil

    _toy_run(tmp_path, max_steps=4)
    shutil.copytree(pipe_dir, tmp_path / "pipeline")
    capsys.readouterr()
    code, lines, out = run_cli(capsys, "verify", tmp_path)
    root = tmp_path / "checkpoints"
    assert code == 0 and lines == []
    assert out.splitlines() == [f"{_step(tmp_path, 2)}: ok", f"{_step(tmp_path, 4)}: ok",
                                f"{root / 'latest'}: names step-00000004", f"{tmp_path / 'final_model'}: ok",
                                f"{tmp_path / 'pipeline'}: ok (no manifest: structure checked)"]
    (_step(tmp_path, 2) / "training_state.pt").write_bytes(b"x")
    (tmp_path / "pipeline" / "transformer" / "config.json").write_text("{not json")
    code, _, out = run_cli(capsys, "verify", tmp_path)
    assert code == 2
    assert out.splitlines()[0] == (f"{_step(tmp_path, 2)}: BROKEN: checkpoint {_step(tmp_path, 2)} is corrupt "
                                   "(training_state.pt has 1 bytes, the manifest says "
                                   f"{os.path.getsize(_step(tmp_path, 4) / 'training_state.pt')})")
    assert out.splitlines()[1:3] == [f"{_step(tmp_path, 4)}: ok", f"{root / 'latest'}: names step-00000004"]
    assert out.splitlines()[4].startswith(f"{tmp_path / 'pipeline'}: BROKEN: "
                                          f"{tmp_path / 'pipeline' / 'transformer' / 'config.json'}: invalid JSON (")
    assert_one_line_error(capsys, ["verify", tmp_path / "nowhere"], "genmod verify: error:", "no such run folder")


def test_resume_with_no_intact_checkpoint_is_one_line(tmp_path):
    from genmod.train import CheckpointError

    _toy_run(tmp_path, max_steps=4)
    for step in (2, 4):
        config = _step(tmp_path, step) / "train_config.json"
        config.write_text(config.read_text().replace("true", "TRUE"))  # same size, other bytes
    with pytest.raises(CheckpointError) as info:
        _toy_run(tmp_path, resume="latest")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"no intact checkpoint in {tmp_path}: checkpoint ")
    assert "step-00000004 is corrupt (train_config.json does not match its sha256" in message
    assert message.endswith("(and 1 older ones broken)")


# ---------------------------------------------------------------------------------------------
# One run per output folder


def test_second_trainer_into_a_busy_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    import subprocess

    from genmod.train.runlock import LOCK_FILE, OutputLockedError, lock_text

    lock = tmp_path / LOCK_FILE
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(lock_text(holder.pid))  # a live run holds the folder
        with pytest.raises(OutputLockedError) as info:
            _toy_run(tmp_path, max_steps=2)
        message = str(info.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and str(lock) in message
        assert message.startswith(f"{tmp_path} is in use by another training run")
        assert lock.read_text() == lock_text(holder.pid) and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    caplog.set_level("WARNING", logger="genmod.train")
    _toy_run(tmp_path, max_steps=2)  # the holder is gone: its lock is stale
    assert any(f"taking over the lock of a run that no longer runs ({holder.pid} " in r.getMessage()
               for r in caplog.records)
    assert not lock.exists()  # released when the run ended
    assert [m["step"] for m in __import__("genmod.train", fromlist=["read_metrics"]).read_metrics(tmp_path)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Checkpoint faults: where each one resumes from, with the uninterrupted run's losses (docs/RESULTS.md table)


class Killed(BaseException):
    """Stands for SIGKILL inside the writer (nothing of the writer's own cleanup runs)."""


def _fail_at(name, error):
    """A ``genmod.train.checkpoint`` function replaced so that the step-4 checkpoint write fails inside it:
    the real function runs first when it writes files (a half-written checkpoint), then ``error`` is raised."""
    import genmod.train.checkpoint as checkpoint

    real = getattr(checkpoint, name)

    def fail(*args, **kwargs):
        text = " ".join(str(a) for a in args)
        if "step-00000004" in text or (name == "_save_model" and "tmp-step-00000004" in text):
            if name in ("_save_model", "write_manifest"):
                real(*args, **kwargs)
            raise error
        return real(*args, **kwargs)

    return checkpoint, name, fail


WRITE_FAULTS = {  # fault -> the checkpoint --resume latest continues from
    "killed while writing model/ (its weights half on disk)": ("_save_model", Killed(), 2),
    "killed after the manifest, before the fsync and rename": ("write_manifest", Killed(), 2),
    "killed after the rename, before latest is updated": ("_atomic_write_text", Killed(), 2),
    "disk full (OSError ENOSPC) while writing model/": ("_save_model", OSError(28, "No space left on device"), 2),
    "OSError EIO in the fsync before the rename": ("_fsync_tree", OSError(5, "Input/output error"), 2),
    "disk full while writing latest": ("_atomic_write_text", OSError(28, "No space left on device"), 2),
}


@pytest.mark.parametrize("fault", sorted(WRITE_FAULTS))
def test_a_failed_checkpoint_write_keeps_the_previous_ones_and_resumes_exactly(tmp_path, monkeypatch, fault):
    from test_trainer import losses

    from genmod.train import find_checkpoint
    from genmod.train.integrity import find_resumable

    name, error, resumed_from = WRITE_FAULTS[fault]
    straight, run = tmp_path / "straight", tmp_path / "run"
    _toy_run(straight)
    with monkeypatch.context() as patch:
        patch.setattr(*_fail_at(name, error))
        with pytest.raises(type(error)):
            _toy_run(run)
    intact = _tree(_step(run, 2))
    assert find_checkpoint(run, "latest").endswith("step-00000002")  # latest still names the complete step 2
    assert find_resumable(run)[0].endswith(f"step-{resumed_from:08d}")
    _toy_run(run, resume="latest")
    assert losses(run) == losses(straight) and _tree(_step(run, 2)) == intact
    assert find_checkpoint(run, "latest").endswith("step-00000006")


DAMAGE_FAULTS = {  # damage after a finished 6-step run -> the checkpoint it resumes from (None: one-line error)
    "step-6 model weights truncated": ({6: "model/diffusion_pytorch_model.safetensors"}, 4),
    "step-6 training_state.pt emptied": ({6: "training_state.pt"}, 4),
    "step-6 manifest removed": ({6: "manifest.json"}, 4),
    "step-6 and step-4 weights truncated": ({step: "model/diffusion_pytorch_model.safetensors" for step in (6, 4)}, 2),
    "latest holds garbage": ({"latest": "garbage"}, 6),
    "latest removed": ({"latest": "remove"}, 6),
    "every checkpoint truncated": ({step: "model/diffusion_pytorch_model.safetensors" for step in (6, 4, 2)}, None),
}


@pytest.mark.parametrize("fault", sorted(DAMAGE_FAULTS))
def test_damaged_checkpoints_resume_from_the_newest_intact_one(tmp_path, fault):
    from test_trainer import losses

    from genmod.train import CheckpointError

    damage, resumed_from = DAMAGE_FAULTS[fault]
    straight, run = tmp_path / "straight", tmp_path / "run"
    _toy_run(straight)
    _toy_run(run)
    for step, rel in damage.items():
        if step == "latest":
            latest = run / "checkpoints" / "latest"
            os.remove(latest) if rel == "remove" else latest.write_text(rel)
            continue
        path = _step(run, step) / rel
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        if rel == "manifest.json":
            os.remove(path)
    untouched = {step: _tree(_step(run, step)) for step in (2, 4, 6) if step not in damage}
    if resumed_from is None:
        with pytest.raises(CheckpointError, match=f"^no intact checkpoint in {run}: ") as info:
            _toy_run(run, resume="latest")
        assert "\n" not in str(info.value)
        return
    from genmod.train.integrity import find_resumable

    assert find_resumable(run)[0].endswith(f"step-{resumed_from:08d}")
    _toy_run(run, resume="latest")
    assert losses(run) == losses(straight)
    assert all(_tree(_step(run, step)) == tree for step, tree in untouched.items() if step <= resumed_from)
