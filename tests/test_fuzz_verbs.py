"""Bounded fuzzing of the other ``genmod`` verbs (issue 15): ``import``, ``export-diffusers``, ``verify``,
``make-shards``, ``make-speech-digits``, ``demo`` and ``train`` of the other families (the evaluation and
tokenizer verbs are in ``test_fuzz_eval_verbs``). For every drawn command line: exit 0 or 2, a 2 is one
line naming the flag or file (argparse's own usage + error line counts as one; ``verify`` reports BROKEN
lines), never a traceback, and the files it reads are byte-identical afterwards.

Runs that pass every check stop at :class:`Accepted` where their long work would start (espeak-ng, the
training loop); export-diffusers, make-shards and verify run for real on tiny inputs. Fixed seed; see
``test_fuzz_cli`` for the profiles (``GENMOD_FUZZ_PROFILE=long``) and the table (``GENMOD_FUZZ_REPORT``)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fuzz_cli import (NUMBERS, Accepted, _flags, _run, bounded_training, flag_values, fuzz,  # noqa: E402,F401
                           out_paths, places, record)
from test_fuzz_eval_verbs import folders  # noqa: E402,F401
from test_hostile_inputs import _tree, pipe_dir  # noqa: E402,F401

from genmod.cli import main  # noqa: E402


# ---------------------------------------------------------------------------------------------
# genmod import: released checkpoints of the wrong kind, truncated, pickled


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("released")
    files = {}
    save_file({"a": torch.zeros(3)}, root / "foreign.safetensors")
    files["foreign.safetensors"] = root / "foreign.safetensors"
    (root / "cut.safetensors").write_bytes((root / "foreign.safetensors").read_bytes()[:-4])
    torch.save({"model": {"x": torch.zeros(2)}, "ema": {"y": torch.zeros(2)}}, root / "other.pt")
    (root / "cut.pth").write_bytes((root / "other.pt").read_bytes()[:50])
    torch.save([1, 2], root / "list.pt")
    torch.save({"model": {"x": 3}}, root / "not-tensors.pt")

    class Bomb:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(root / "PWNED"), "w"))

    torch.save({"model": Bomb()}, root / "bomb.pth")
    (root / "text.ckpt").write_text("not a checkpoint")
    (root / "empty.bin").write_bytes(b"")
    for name in ("cut.safetensors", "other.pt", "cut.pth", "list.pt", "not-tensors.pt", "bomb.pth", "text.ckpt",
                 "empty.bin"):
        files[name] = root / name
    files.update({"folder": root, "missing": root / "none.pt", "hub-short": "hub:a/b", "hub-offline": "hub:a/b/c.pt"})
    return root, files


@fuzz(80)
@given(data=st.data())
def test_fuzz_import(capsys, checkpoints, places, tmp_path_factory, data):
    root, files = checkpoints
    kind = data.draw(st.sampled_from(["var", "sit", "mar-kl16", "causalfusion", "nosuch", ""]))
    given_files = data.draw(st.lists(st.sampled_from(sorted(files)), min_size=1, max_size=3))
    fresh = tmp_path_factory.mktemp("imp") / "pipe"
    out = data.draw(out_paths(places, fresh))
    options = data.draw(st.lists(st.tuples(st.sampled_from(["--vae", "--num_heads", "--scales", "--guidance_scale",
                                                            "--top_k", "--patch_size", "--id2label"]),
                                           st.sampled_from(NUMBERS[:6] + ["1,2,3", str(files["other.pt"])])),
                                 max_size=2))
    argv = ["import", kind, *[files[name] for name in given_files], "--out", out] + _flags(options)
    code = _run(capsys, argv, "import", watch=[root, places["file"]])
    assert code == 2 and not os.path.exists(fresh)  # none of these is a released model
    assert not os.path.exists(root / "PWNED")  # the pickle never ran


# ---------------------------------------------------------------------------------------------
# genmod export-diffusers and genmod verify on damaged pipeline folders


@fuzz(50)
@given(data=st.data())
def test_fuzz_export_diffusers(capsys, damaged_pipelines, places, tmp_path_factory, data):
    name = data.draw(st.sampled_from(sorted(damaged_pipelines)))
    fresh = tmp_path_factory.mktemp("exp") / "exported"
    out = data.draw(out_paths(places, fresh) | st.just(damaged_pipelines["intact"]))
    verified = run_verify(capsys, damaged_pipelines[name])[0]  # genmod verify PIPE agrees with export
    assert verified == (0 if name.startswith("intact") or name == "no-scheduler-x" else 2), name
    code = _run(capsys, ["export-diffusers", damaged_pipelines[name], out], "export-diffusers",
                watch=[damaged_pipelines[name], places["file"]])
    if code == 0:
        assert name.startswith("intact") and os.path.isfile(os.path.join(out, "manifest.json"))
        code, _, stdout = run_verify(capsys, out)
        assert code == 0 and stdout == f"{out}: ok\n"
    else:
        assert not name.startswith("intact") or out != fresh
        assert not os.path.exists(fresh)


def run_verify(capsys, path):
    capsys.readouterr()
    code = main(["verify", str(path)])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


@pytest.fixture(scope="module")
def damaged_pipelines(pipe_dir, tmp_path_factory):
    from test_fuzz_loaders import PIPELINE_DAMAGE, damage_pipeline

    from genmod.core.files import write_manifest

    root = tmp_path_factory.mktemp("damaged")
    folders = {}
    for name in ["intact", "intact-no-manifest"] + sorted(PIPELINE_DAMAGE):
        folders[name] = root / name
        shutil.copytree(pipe_dir, folders[name])
        if name != "intact-no-manifest":
            write_manifest(folders[name])  # as the trainer's pipeline/ and genmod import write them
        if not name.startswith("intact"):
            damage_pipeline(folders[name], name, root)
    return folders


@fuzz(40)
@given(data=st.data())
def test_fuzz_verify(capsys, toy_run, tmp_path_factory, data):
    """``genmod verify`` on a run with files cut, removed or changed: exit 2 with a BROKEN line for the part
    that was damaged, exit 0 with every line ok when nothing was; the run is never modified."""
    from test_fuzz_loaders import RUN_DAMAGE, damage_file

    run = tmp_path_factory.mktemp("verify") / "run"
    shutil.copytree(toy_run, run)
    files = sorted(os.path.relpath(os.path.join(r, n), run) for r, _, names in os.walk(run) for n in names
                   if r.startswith((str(run / "checkpoints"), str(run / "final_model"))))
    picks = data.draw(st.lists(st.tuples(st.sampled_from(files), st.sampled_from(sorted(RUN_DAMAGE))), max_size=2,
                               unique_by=lambda p: p[0]))
    for rel, how in picks:
        damage_file(run / rel, how)
    before = _tree(run)
    code, err, out = run_verify(capsys, run)
    broken = [line for line in out.splitlines() if ": BROKEN: " in line]
    record("verify", picks, "ok" if code == 0 else "one-line" if broken or len(err.splitlines()) == 1 else "other",
           _tree(run) != before)
    assert _tree(run) == before and "Traceback" not in err
    unverified = [rel for rel, how in picks if rel == os.path.join("final_model", "manifest.json") and how == "remove"]
    if unverified and len(picks) == 1:  # a model folder without a manifest is checked for structure only
        assert code == 0 and f"{run / 'final_model'}: ok (no manifest: structure checked)" in out, out
        return
    assert code == (2 if picks else 0), (picks, out, err)
    assert not picks or broken or err.startswith("genmod verify: error: "), (picks, out, err)


# ---------------------------------------------------------------------------------------------
# genmod make-shards / make-speech-digits / demo


@fuzz(60)
@given(data=st.data())
def test_fuzz_make_shards(capsys, folders, places, tmp_path_factory, data):
    source = data.draw(st.sampled_from(sorted(k for k in folders if not k.endswith(".npz"))))
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(["--shard-size", "--resolution", "--sample-rate", "--duration",
                                                          "--channels", "--split", "--on-error"]),
                                         st.sampled_from(NUMBERS + ["skip", "raise", "train"])), max_size=2))
    fresh = tmp_path_factory.mktemp("shards") / "out"
    out = data.draw(out_paths(places, fresh) | st.just(folders[source]) | st.just(os.path.join(folders[source], "x")))
    code = _run(capsys, ["make-shards", folders[source], out, "--resolution", "8"] + _flags(pairs), "make-shards",
                watch=[folders[source], places["file"]])
    if code == 2:
        assert not os.path.exists(fresh)


@pytest.fixture
def stop_before_espeak(monkeypatch):
    import genmod.data.speech_digits as speech_digits

    def stop():
        raise Accepted

    monkeypatch.setattr(speech_digits, "espeak_binary", stop)


@fuzz(50)
@given(data=st.data())
def test_fuzz_make_speech_digits(capsys, places, tmp_path_factory, stop_before_espeak, data):
    pairs = data.draw(flag_values(["--num", "--seed", "--sample-rate", "--test-fraction", "--workers"], []))
    fresh = tmp_path_factory.mktemp("sd") / "corpus"
    out = data.draw(out_paths(places, fresh))
    code = _run(capsys, ["make-speech-digits", "--out", out] + _flags(pairs), "make-speech-digits",
                watch=[places["file"]])
    if code == 2:
        assert not os.path.exists(fresh)


@pytest.fixture
def stop_at_trainer(monkeypatch):
    import genmod.train as train

    class Stop:
        def __init__(self, config, family):
            raise Accepted

    monkeypatch.setattr(train, "Trainer", Stop)


@fuzz(50)
@given(data=st.data())
def test_fuzz_demo(capsys, places, tmp_path_factory, stop_at_trainer, data):
    pairs = data.draw(flag_values(["--max-steps", "--num-eval", "--num-inference-steps", "--guidance-scale"], []))
    fresh = tmp_path_factory.mktemp("demo") / "out"
    out = data.draw(out_paths(places, fresh))
    _run(capsys, ["demo", "--out", out] + _flags(pairs), "demo", watch=[places["file"]])


# ---------------------------------------------------------------------------------------------
# genmod train of the other families


FAMILY_FLAGS = {
    "var": (["--width", "--num_heads", "--depth", "--top_k", "--top_p", "--temperature", "--eval_samples"],
            ["--tokenizer", "--guidance_schedule"]),
    "latentlm": (["--num_head_steps", "--max_text_length", "--latent_patch_size", "--caption_prob", "--audio_duration"],
                 ["--tokenizer", "--condition", "--path"]),
    "diffusion-forcing": (["--num_frames", "--frame_stack", "--image_size", "--slope", "--snr_gamma", "--noise_level"],
                          ["--schedule", "--backbone", "--loss_weighting"]),
    "causalfusion": (["--num_ar_steps", "--max_ar_steps", "--patch_size", "--num_cond_tokens", "--ar_step_decay"],
                     ["--solver", "--tokenizer", "--time_sampling"]),
    "tokenizer": (["--codebook_size", "--latent_channels", "--gan_start", "--base_channels", "--sigma_std", "--audio_segment"],
                  ["--quantizer", "--modality", "--ch_mult", "--fsq_levels", "--scales"]),
}
COMMON_NUMERIC = ["--lr", "--max_steps", "--batch_size", "--dataset_size", "--ema_decay", "--seed", "--grad_clip"]
COMMON_TEXT = ["--dataset", "--resume", "--init_weights", "--output_dir"]


@fuzz(100)
@given(data=st.data())
def test_fuzz_train_other_families(capsys, tmp_path_factory, bounded_training, data):
    family = data.draw(st.sampled_from(sorted(FAMILY_FLAGS)))
    numeric, text = FAMILY_FLAGS[family]
    pairs = data.draw(flag_values(numeric + COMMON_NUMERIC, text + COMMON_TEXT,
                                  ["shapes", "tones", "moving_shapes", "latest", "/no/such/run", "image_folder:/nope"]))
    folder = tmp_path_factory.mktemp("train")
    argv = ["train", family, "--output_dir", folder / "run", "--max_steps", "1", "--cpu", "--dataset_size", "8"]
    _run(capsys, argv + _flags(pairs), "train", target=f"train {family}")
    assert os.listdir(folder) == []  # nothing written before the loop


# ---------------------------------------------------------------------------------------------
# GENMOD_DEBUG=1 still shows the traceback


@pytest.mark.parametrize("argv", [["eval-folder", "/no/such/a", "/no/such/b"], ["verify", "/no/such/run"],
                                  ["make-speech-digits", "--out", "/tmp/x", "--num", "0"],
                                  ["train", "var", "--dataset_size", "1e30"]])
def test_genmod_debug_shows_the_traceback(monkeypatch, argv):
    monkeypatch.setenv("GENMOD_DEBUG", "1")
    with pytest.raises(Exception) as info:
        main(argv)
    assert not isinstance(info.value, SystemExit)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy training run (4 steps, checkpoints at 2 and 4, final_model/ with a manifest)."""
    from test_trainer import run_toy, toy_config

    out = tmp_path_factory.mktemp("toyrun") / "run"
    run_toy(toy_config(out, max_steps=4, checkpoint_every=2))
    return out
