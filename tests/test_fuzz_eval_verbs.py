"""Bounded fuzzing of the evaluation and tokenizer verbs (issue 15): ``genmod eval``, ``eval-folder``,
``eval-tokenizer`` and ``tokenize``. For every drawn command line: exit 0 or 2, a 2 is one line naming the
flag or file (argparse's own usage + error line counts as one), never a traceback, and the files it reads
(pipeline, tokenizer folders, image folders, an existing output file) are byte-identical afterwards.

Runs that pass every check stop at :class:`Accepted` where their long work would start (sampling for
``eval``, the metric networks for ``eval-folder``); tokenize and eval-tokenizer run for real on 8-item
datasets. Fixed seed; see ``test_fuzz_cli`` for the profiles (``GENMOD_FUZZ_PROFILE=long``) and the table
(``GENMOD_FUZZ_REPORT``)."""

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
from test_fuzz_cli import TEXT, Accepted, _flags, _run, flag_values, fuzz, out_paths, places  # noqa: E402,F401
from test_hostile_inputs import pipe_dir  # noqa: E402,F401


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
