"""Bounded fuzzing of every other ``genmod`` verb (issue 15): ``eval``, ``eval-folder``, ``eval-tokenizer``,
``tokenize``, ``import``, ``export-diffusers``, ``verify``, ``make-shards``, ``make-speech-digits``, ``demo`` and
``train`` of the other families. For every drawn command line: exit 0 or 2, a 2 is one line naming the flag
or file (argparse's own usage + error line counts as one), never a traceback, and the files it reads
(pipeline, tokenizer, image folders, checkpoints, an existing output file) are byte-identical afterwards.

Runs that pass every check stop at :class:`Accepted` where their long work would start (sampling for
``eval``, the metric networks for ``eval-folder``, espeak-ng, the training loop); tokenize, eval-tokenizer,
export-diffusers, make-shards and verify run for real on tiny inputs. Fixed seed; see ``test_fuzz_cli`` for
the profiles (``GENMOD_FUZZ_PROFILE=long``) and the table (``GENMOD_FUZZ_REPORT``)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fuzz_cli import NUMBERS, TEXT, Accepted, _run, bounded_training, fuzz, record  # noqa: E402,F401
from test_hostile_inputs import _tree, pipe_dir  # noqa: E402,F401

from genmod.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Output paths a user gets wrong: a missing folder, a read-only folder, an existing file, a file as a folder."""
    root = tmp_path_factory.mktemp("places")
    (root / "ro").mkdir()
    os.chmod(root / "ro", 0o555)
    (root / "file.txt").write_text("keep me")
    return {"missing": root / "new" / "deeper", "read-only": root / "ro" / "x", "file": root / "file.txt",
            "under-file": root / "file.txt" / "x", "empty": ""}


def out_paths(places, fresh):
    """A strategy: a fresh path (half the time) or one of the bad places."""
    return st.just(fresh) | st.sampled_from(sorted(places)).map(places.get)


def flag_values(numeric, text, extra=()):
    """Up to three ``(flag, value)`` pairs: numbers (zero, negative, NaN, inf, huge, junk, and fine ones) for the
    numeric flags, empty / unicode / odd text and ``extra`` names for the text flags."""
    pairs = st.tuples(st.sampled_from(numeric), st.sampled_from(NUMBERS)) if numeric else st.nothing()
    if text:
        pairs = pairs | st.tuples(st.sampled_from(text), st.sampled_from(TEXT + list(extra)))
    return st.lists(pairs, min_size=0, max_size=3)


def _flags(pairs):
    return [f"{flag}={value}" for flag, value in pairs]


# ---------------------------------------------------------------------------------------------
# genmod eval


@pytest.fixture
def stop_before_metrics(monkeypatch):
    import genmod.evals.cli as cli

    def stop(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(cli, "resolve_spaces", stop)
    monkeypatch.setattr(cli, "held_out_report", stop)


@fuzz(80)
@given(data=st.data())
def test_fuzz_eval(capsys, pipe_dir, places, tmp_path_factory, stop_before_metrics, data):
    fresh = tmp_path_factory.mktemp("eval") / "out"
    pairs = data.draw(flag_values(["--num-samples", "--steps", "--guidance", "--batch-size", "--seed"],
                                  ["--dataset", "--metrics", "--features", "--feature-net", "--inception-weights"],
                                  ["shapes", "fid,dc", "domain", "nosuch:x", "image_folder:"]))
    out = data.draw(out_paths(places, fresh))
    held = data.draw(st.booleans())
    argv = ["eval", pipe_dir, "--num-samples", "8", "--dataset", "shapes", "--out", out] + _flags(pairs)
    code = _run(capsys, argv + (["--held-out"] if held else []), "eval", watch=[pipe_dir, places["file"]])
    if code == 2:
        assert not os.path.exists(fresh)


# ---------------------------------------------------------------------------------------------
# genmod eval-folder: folders of odd images, .npz files


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR that claims ``width`` x ``height`` (no pixel data)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def image_folders(root):
    """Folders of 6 images each: RGB, grey, RGBA, 16-bit, palette, mixed sizes, a zero-byte file, a cut file,
    a huge-dimension header, a text file named .png, empty, one image; and .npz files (good, garbage, float,
    no arr_0, object array, 5 channels)."""
    rng = np.random.default_rng(0)
    rgb = lambda: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    kinds = {
        "rgb": [rgb() for _ in range(6)], "grey": [rng.integers(0, 255, (16, 16), dtype=np.uint8) for _ in range(6)],
        "rgba": [rng.integers(0, 255, (16, 16, 4), dtype=np.uint8) for _ in range(6)],
        "16bit": [rng.integers(0, 65535, (16, 16), dtype=np.uint16) for _ in range(6)],
        "mixed": [rgb() for _ in range(5)] + [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)],
        "zero-byte": [rgb() for _ in range(5)] + [b""], "cut": [rgb() for _ in range(5)] + ["cut"],
        "huge": [rgb() for _ in range(5)] + [_png_header(100000, 100000)],
        "text": [rgb() for _ in range(5)] + [b"hello, not an image"], "empty": [], "one": [rgb()],
    }
    paths = {}
    for name, items in kinds.items():
        folder = root / name
        folder.mkdir()
        for i, item in enumerate(items):
            path = folder / f"{i}.png"
            if isinstance(item, bytes):
                path.write_bytes(item)
            elif isinstance(item, str):
                _png(path, rgb())
                path.write_bytes(path.read_bytes()[:40])
            else:
                _png(path, item)
        if name == "rgb":
            from PIL import Image

            Image.fromarray(rgb()).convert("P").save(folder / "6.png")  # a palette image too
        paths[name] = folder
    npz = {"good": {"arr_0": rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)},
           "float": {"arr_0": rng.random((6, 16, 16, 3))}, "no-arr0": {"x": np.zeros(3)},
           "object": {"arr_0": np.array([{"a": 1}], dtype=object)},
           "5-channels": {"arr_0": rng.integers(0, 255, (6, 16, 16, 5), dtype=np.uint8)},
           "bad-labels": {"arr_0": rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8), "arr_1": np.zeros(2)}}
    for name, arrays in npz.items():
        np.savez(root / f"{name}.npz", **arrays)
        paths[f"{name}.npz"] = root / f"{name}.npz"
    (root / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip")
    paths["garbage.npz"] = root / "garbage.npz"
    paths["missing"] = root / "no-such-folder"
    return paths


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return image_folders(tmp_path_factory.mktemp("images"))


@pytest.fixture
def stop_at_metrics(monkeypatch):
    import genmod.evals.report as report

    def stop(fake, reference, *args, **kwargs):
        assert str(fake.dtype) == "torch.uint8" and fake.ndim == 4 and fake.shape[1] in (1, 3)
        raise Accepted

    monkeypatch.setattr(report, "resolve_spaces", lambda *args, **kwargs: [])
    monkeypatch.setattr(report, "evaluate_images", stop)


@fuzz(80)
@given(data=st.data())
def test_fuzz_eval_folder(capsys, folders, places, tmp_path_factory, stop_at_metrics, data):
    names = sorted(folders)
    generated, real = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(names))
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(["--metrics", "--features", "--dataset", "--real-cache-name",
                                                          "--feature-net"]),
                                         st.sampled_from(TEXT + ["fid", "dc", "domain", "shapes", "../x", "a/b"])),
                               max_size=2))
    out = data.draw(out_paths(places, tmp_path_factory.mktemp("ef") / "report"))
    argv = ["eval-folder", folders[generated], folders[real], "--out", out] + _flags(pairs)
    _run(capsys, argv, "eval-folder", watch=[folders[generated], folders[real], places["file"]])


# ---------------------------------------------------------------------------------------------
# genmod eval-tokenizer / genmod tokenize


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A tiny FSQ tokenizer saved as a run (``final_model/`` + ``train_config.json`` naming shapes)."""
    import torch

    from genmod.tokenizers_vq.models import VQTokenizer

    run = tmp_path_factory.mktemp("tok") / "run"
    torch.manual_seed(0)
    VQTokenizer(quantizer="fsq", fsq_levels=(5, 5, 5), base_channels=8, ch_mult=(1, 2),
                num_res_blocks=1).save_pretrained(run / "final_model")
    (run / "train_config.json").write_text(json.dumps({"dataset": "shapes"}))
    return run


def tokenizer_variants(run, root):
    """The tokenizer run, and copies with one thing wrong each."""
    from safetensors.torch import save_file

    weights = "diffusion_pytorch_model.safetensors"

    def patch(folder, **values):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **values}))

    edits = {
        "intact": lambda m: None, "truncated": lambda m: (m / weights).write_bytes((m / weights).read_bytes()[:200]),
        "zero-byte": lambda m: (m / weights).write_bytes(b""), "no-weights": lambda m: os.remove(m / weights),
        "pickle": lambda m: (shutil.move(m / weights, m / "diffusion_pytorch_model.bin")),
        "foreign": lambda m: save_file({"a": __import__("torch").zeros(3)}, m / weights),
        "bad-json": lambda m: (m / "config.json").write_text("{nope"),
        "json-list": lambda m: (m / "config.json").write_text("[1]"),
        "unknown-class": lambda m: patch(m, _class_name="Evil"), "wrong-type": lambda m: patch(m, base_channels="x"),
        "wrong-shape": lambda m: patch(m, base_channels=16),
        "bad-run-config": lambda m: (m.parent / "train_config.json").write_text("{nope"),
        "run-config-list": lambda m: (m.parent / "train_config.json").write_text("[]"),
    }
    variants = {}
    for name, edit in edits.items():
        shutil.copytree(run, root / name)
        edit(root / name / "final_model")
        variants[name] = root / name
    return variants


@pytest.fixture(scope="module")
def tokenizers(tokenizer_run, tmp_path_factory):
    return tokenizer_variants(tokenizer_run, tmp_path_factory.mktemp("tokvariants"))


@pytest.fixture
def small_datasets(monkeypatch):
    """``get_dataset`` with 8 items for the generated datasets (so a fuzzed run takes milliseconds)."""
    import genmod.data as data

    real, cache = data.get_dataset, {}

    def small(name, split="train", **kwargs):
        key = (name, split, tuple(sorted(kwargs.items())))
        if key not in cache:
            sized = name in ("shapes", "moving_shapes", "oscillators", "tones")
            cache[key] = real(name, split=split, **({"num_samples": 8} if sized else {}), **kwargs)
        return cache[key]

    monkeypatch.setattr(data, "get_dataset", small)


TOKENIZER_NUMERIC = ["--num_samples", "--batch_size"]
TOKENIZER_TEXT = ["--dataset", "--split", "--device"]
TOKENIZER_NAMES = ["shapes", "tones", "oscillators", "moving_shapes", "test", "train", "cpu", "cuda", "meta", "cuda:7"]


@fuzz(60)
@given(data=st.data())
def test_fuzz_eval_tokenizer(capsys, tokenizers, places, tmp_path_factory, small_datasets, data):
    variant = data.draw(st.just("intact") | st.sampled_from(sorted(tokenizers)))
    pairs = data.draw(flag_values(TOKENIZER_NUMERIC + ["--duration"], TOKENIZER_TEXT, TOKENIZER_NAMES))
    fresh = tmp_path_factory.mktemp("evtok") / "eval"
    out = data.draw(out_paths(places, fresh))
    argv = ["eval-tokenizer", tokenizers[variant], "--num_samples", "4", "--no-lpips", "--no-baselines", "--device",
            "cpu", "--out", out] + _flags(pairs)
    code = _run(capsys, argv, "eval-tokenizer", watch=[tokenizers[variant], places["file"]])
    if variant not in ("intact", "bad-run-config", "run-config-list") and "--dataset" not in str(pairs):
        assert code == 2  # a broken tokenizer folder never evaluates


@fuzz(60)
@given(data=st.data())
def test_fuzz_tokenize(capsys, tokenizers, places, tmp_path_factory, small_datasets, data):
    variant = data.draw(st.just("intact") | st.sampled_from(sorted(tokenizers)))
    pairs = data.draw(flag_values(TOKENIZER_NUMERIC + ["--shard_size"], TOKENIZER_TEXT + ["--store", "--format"],
                                  TOKENIZER_NAMES + ["latents", "indices", "webdataset"]))
    fresh = tmp_path_factory.mktemp("tokz") / "cache"
    out = data.draw(out_paths(places, fresh))
    argv = ["tokenize", tokenizers[variant], "--num_samples", "4", "--device", "cpu", "--out", out] + _flags(pairs)
    code = _run(capsys, argv, "tokenize", watch=[tokenizers[variant], places["file"]])
    if code == 0 and out == fresh and "webdataset" not in str(pairs):
        from genmod.tokenizers_vq.cache import CachedLatentDataset

        assert len(CachedLatentDataset(str(fresh))) >= 1  # a finished cache loads (its manifest verifies)
    if code == 2:
        assert not os.path.exists(fresh) and not [n for n in os.listdir(fresh.parent) if n.startswith(".")]


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
