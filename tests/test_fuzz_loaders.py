"""Bounded fuzzing of every file genmod reads (issue 15): pipeline folders, training checkpoints, config
JSON of every family, image / audio folders and tokenizer caches. Each is damaged in drawn ways (files
cut, emptied, removed, replaced by another model's or a pickle, JSON values of the wrong type) and then
loaded: it loads, or the error is one line naming the file, never a traceback; the damaged input is not
changed further; a pickle never runs. Checkpoints: ``--resume latest`` continues from the newest intact
checkpoint with the losses of the uninterrupted run, or stops with one line. Fixed seed (see
``test_fuzz_cli`` for the profiles and the table)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fuzz_cli import JSON_VALUES, _run, bounded_sampling, bounded_training, fuzz, record  # noqa: E402,F401
from test_hostile_inputs import _tree, pipe_dir  # noqa: E402,F401

# ---------------------------------------------------------------------------------------------
# Damage


def damage_file(path, how: str) -> None:
    """Change ``path`` for sure: cut to half, empty, flip a byte, remove, append garbage."""
    data = open(path, "rb").read()
    if how == "remove":
        os.remove(path)
        return
    new = {"cut-half": data[:len(data) // 2], "empty": b"", "append": data + b"\x00garbage",
           "flip-byte": data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
           if data else b"x"}[how]
    if new == data:
        new = data + b"!"
    open(path, "wb").write(new)


RUN_DAMAGE = ("cut-half", "empty", "flip-byte", "remove", "append")
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _patch_json(path, **values):
    config = json.loads(open(path).read())
    open(path, "w").write(json.dumps({**config, **values}))


def _pickle_weights(folder, root):
    class Bomb:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(root / "PWNED"), "w"))

    os.remove(folder / WEIGHTS)
    torch.save({"bomb": Bomb()}, folder / "transformer" / "diffusion_pytorch_model.bin")


def _foreign_weights(folder, root):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, folder / WEIGHTS)


PIPELINE_DAMAGE = {
    "no-transformer": lambda f, r: shutil.rmtree(f / "transformer"),
    "no-scheduler": lambda f, r: shutil.rmtree(f / "scheduler"),
    "weights-cut": lambda f, r: damage_file(f / WEIGHTS, "cut-half"),
    "weights-empty": lambda f, r: damage_file(f / WEIGHTS, "empty"),
    "weights-flipped": lambda f, r: damage_file(f / WEIGHTS, "flip-byte"),
    "weights-removed": lambda f, r: damage_file(f / WEIGHTS, "remove"),
    "weights-pickle": _pickle_weights,
    "weights-foreign": _foreign_weights,
    "weights-other-shape": lambda f, r: _patch_json(f / "transformer" / "config.json", hidden_size=64),
    "index-unknown-class": lambda f, r: _patch_json(f / "model_index.json", _class_name="EvilPipeline"),
    "index-os-system": lambda f, r: _patch_json(f / "model_index.json", transformer=["os", "system"]),
    "index-no-module": lambda f, r: _patch_json(f / "model_index.json", transformer=["genmod.nosuch", "X"]),
    "index-no-class": lambda f, r: _patch_json(f / "model_index.json", transformer=["genmod.flow.transformer", "No"]),
    "index-list": lambda f, r: (f / "model_index.json").write_text("[1, 2]"),
    "index-bad-json": lambda f, r: (f / "model_index.json").write_text("{"),
    "index-missing": lambda f, r: os.remove(f / "model_index.json"),
    "config-bad-json": lambda f, r: (f / "transformer" / "config.json").write_text("{"),
    "config-list": lambda f, r: (f / "transformer" / "config.json").write_text("[]"),
    "config-wrong-type": lambda f, r: _patch_json(f / "transformer" / "config.json", hidden_size="big"),
    "config-negative": lambda f, r: _patch_json(f / "transformer" / "config.json", depth=-1),
    "scheduler-bad-solver": lambda f, r: _patch_json(f / "scheduler" / "scheduler_config.json", solver="nosuch"),
    "scheduler-wrong-type": lambda f, r: _patch_json(f / "scheduler" / "scheduler_config.json", num_train_timesteps="x"),
}


def damage_pipeline(folder, how: str, root) -> None:
    PIPELINE_DAMAGE[how](folder, root)


# ---------------------------------------------------------------------------------------------
# Pipeline folders: genmod sample loads them


CONFIG_KEYS = ["hidden_size", "depth", "num_heads", "patch_size", "in_channels", "sample_size", "num_classes",
               "mlp_ratio", "learn_sigma", "no_such_key"]
SCHEDULER_KEYS = ["solver", "shift", "num_train_timesteps", "path", "prediction_type", "no_such_key"]


@fuzz(80)
@given(data=st.data())
def test_fuzz_pipeline_folders(capsys, pipe_dir, tmp_path_factory, bounded_sampling, data):
    root = tmp_path_factory.mktemp("pipes")
    folder = root / "pipe"
    shutil.copytree(pipe_dir, folder)
    hows = data.draw(st.lists(st.sampled_from(sorted(PIPELINE_DAMAGE)), max_size=2, unique=True))
    for how in hows:
        try:
            damage_pipeline(folder, how, root)
        except Exception:  # noqa: BLE001 - an earlier damage removed or garbled that file: nothing to add
            pass
    edits = data.draw(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS + SCHEDULER_KEYS), st.sampled_from(JSON_VALUES)),
                               max_size=2))
    for key, value in edits:
        config = folder / ("scheduler/scheduler_config.json" if key in SCHEDULER_KEYS else "transformer/config.json")
        if os.path.isfile(config):
            try:
                _patch_json(config, **{key: value})
            except (ValueError, TypeError):  # the file is already garbage
                pass
    out = root / "grid.png"
    code = _run(capsys, ["sample", folder, "--out", out, "--num", "1", "--steps", "1", "--device", "cpu"], "sample",
                target="pipeline folder (genmod sample)", watch=[folder])
    assert not os.path.exists(root / "PWNED")
    if any(h not in ("weights-flipped",) for h in hows):
        assert code == 2 and not os.path.exists(out)  # every structural damage is refused before sampling


# ---------------------------------------------------------------------------------------------
# Training checkpoints: resume from the newest intact one, with the uninterrupted run's losses


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted toy run: 6 steps, checkpoints at 2, 4, 6; its losses are the reference."""
    from test_trainer import losses, run_toy, toy_config

    out = tmp_path_factory.mktemp("straight") / "run"
    run_toy(toy_config(out, max_steps=6, checkpoint_every=2))
    return out, losses(out)


@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory, pipe_dir):
    """Checkpoint model folders of another config (hidden 32) and of another family (a flow transformer)."""
    from test_trainer import run_toy, toy_config

    out = tmp_path_factory.mktemp("other") / "run"
    run_toy(toy_config(out, max_steps=2, checkpoint_every=2, hidden=32))
    return {"other-config": out / "checkpoints" / "step-00000002" / "model", "other-family": pipe_dir / "transformer"}


CHECKPOINT_DAMAGE = RUN_DAMAGE + ("other-config", "other-family")


@fuzz(50)
@given(data=st.data())
def test_fuzz_training_checkpoints(straight_run, other_checkpoints, tmp_path_factory, caplog, data):
    """Damage up to two files of the toy run's checkpoints (cut, emptied, flipped, removed, garbage, or the model
    replaced by another config's / another family's with a rewritten manifest), then ``--resume latest``:
    it continues from the newest checkpoint left intact, and every loss from there on equals the
    uninterrupted run's; with none intact it stops with one line naming the folder."""
    from test_trainer import losses, run_toy, toy_config

    from genmod.core.files import write_manifest
    from genmod.train import CheckpointError, find_checkpoint

    reference, expected = straight_run
    run = tmp_path_factory.mktemp("resume") / "run"
    shutil.copytree(reference, run)
    steps = {step: run / "checkpoints" / f"step-{step:08d}" for step in (2, 4, 6)}
    candidates = sorted(os.path.relpath(os.path.join(r, n), run) for r, _, names in os.walk(run / "checkpoints")
                        for n in names)
    picks = data.draw(st.lists(st.tuples(st.sampled_from(candidates), st.sampled_from(CHECKPOINT_DAMAGE)), max_size=2,
                               unique_by=lambda p: p[0]))
    for rel, how in picks:
        if not os.path.exists(run / rel):
            continue
        if how.startswith("other"):
            step = next((p for p in steps.values() if str(run / rel).startswith(str(p) + os.sep)), None)
            if step is None:  # checkpoints/latest: no model to swap
                continue
            shutil.rmtree(step / "model")
            shutil.copytree(other_checkpoints[how], step / "model")
            write_manifest(step)  # passes the manifest: the keys / shapes must catch it
        else:
            damage_file(run / rel, how)
    intact = []
    for step, path in steps.items():
        try:
            find_checkpoint(run, str(path))
            intact.append(step)
        except CheckpointError:
            pass
    with open(run / "metrics.jsonl") as f:
        kept = f.read()
    try:
        run_toy(toy_config(run, max_steps=6, checkpoint_every=2, resume="latest"))
    except (CheckpointError, ValueError, RuntimeError) as err:
        message = str(err)
        record("training checkpoint (--resume latest)", picks, "one-line" if "\n" not in message else "other")
        assert "\n" not in message and str(run) in message, message
        return
    record("training checkpoint (--resume latest)", picks, "ok")
    assert losses(run) == expected, (picks, intact)  # the rerun steps reproduce the uninterrupted losses
    assert kept and os.path.isfile(run / "checkpoints" / "step-00000006" / "manifest.json")


# ---------------------------------------------------------------------------------------------
# Config JSON of every family


FAMILIES = {"var": "genmod.var.family.VARConfig", "latentlm": "genmod.latentlm.family.LatentLMConfig",
            "diffusion-forcing": "genmod.diffusion_forcing.family.DiffusionForcingConfig",
            "causalfusion": "genmod.causalfusion.family.CausalFusionConfig", "tokenizer": None}
KEYS = ["lr", "max_steps", "depth", "num_heads", "hidden_size", "width", "num_frames", "quantizer", "codebook_size",
        "scales", "tokenizer", "schedule", "solver", "dataset", "dataset_size", "resume", "no_such_field", "_config_class"]


@fuzz(80)
@given(family=st.sampled_from(sorted(FAMILIES)),
       config=st.dictionaries(st.sampled_from(KEYS), st.sampled_from(JSON_VALUES + [1e30, 10**30, "latest"]), max_size=4)
       | st.sampled_from(JSON_VALUES),
       other=st.sampled_from([None, "genmod.flow.family.FlowConfig", "genmod.var.family.VARConfig", "os.system", 3]))
def test_fuzz_config_json_every_family(capsys, tmp_path_factory, bounded_training, family, config, other):
    folder = tmp_path_factory.mktemp("config")
    if isinstance(config, dict) and other is not None:
        config = {**config, "_config_class": other}
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    argv = ["train", family, "--config", path, "--output_dir", folder / "run", "--max_steps", "1", "--dataset_size", "8"]
    _run(capsys, argv, "train", target="config JSON (other families)", watch=[folder])


# ---------------------------------------------------------------------------------------------
# Image and audio folders (through genmod make-shards, which decodes every file)


def _image_file(path, kind: str, rng) -> None:
    from PIL import Image

    from test_fuzz_eval_verbs import _png_header

    arrays = {"rgb": (12, 12, 3), "grey": (12, 12), "rgba": (12, 12, 4), "tiny": (1, 1, 3), "wide": (3, 300, 3)}
    if kind in arrays:
        Image.fromarray(rng.integers(0, 255, arrays[kind], dtype=np.uint8)).save(path)
    elif kind == "16bit":
        Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16)).save(path)
    elif kind == "palette":
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).convert("P").save(path)
    elif kind == "cmyk-jpeg":
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).convert("CMYK").save(path, "JPEG")
    elif kind == "cut":
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:30])
    else:
        path.write_bytes({"zero-byte": b"", "garbage": b"GIF89a nonsense", "huge": _png_header(100000, 100000)}[kind])


IMAGE_KINDS = ["rgb", "grey", "rgba", "tiny", "wide", "16bit", "palette", "cmyk-jpeg", "cut", "zero-byte", "garbage", "huge"]
GOOD_IMAGES = {"rgb", "grey", "rgba", "tiny", "wide", "16bit", "palette", "cmyk-jpeg"}


@fuzz(80)
@given(kinds=st.lists(st.sampled_from(IMAGE_KINDS), min_size=0, max_size=4), on_error=st.sampled_from(["raise", "skip"]),
       channels=st.sampled_from(["1", "3"]))
def test_fuzz_image_folders(capsys, tmp_path_factory, kinds, on_error, channels):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(len(kinds))
    (root / "src" / "cat").mkdir(parents=True)
    for i, kind in enumerate(kinds):
        _image_file(root / "src" / "cat" / f"{i}.{'jpg' if 'jpeg' in kind else 'png'}", kind, rng)
    argv = ["make-shards", root / "src", root / "out", "--resolution", "8", "--channels", channels, "--on-error", on_error]
    code = _run(capsys, argv, "make-shards", target="image folder", watch=[root / "src"])
    readable = [k for k in kinds if k in GOOD_IMAGES]
    assert code == (0 if readable and (on_error == "skip" or len(readable) == len(kinds)) else 2), kinds
    if code == 0:
        assert json.loads((root / "out" / "dataset.json").read_text())["num_samples"] == len(readable)


def _audio_file(path, kind: str, rng) -> None:
    import soundfile as sf

    tone = (0.3 * np.sin(np.linspace(0, 200, 1600))).astype(np.float32)
    if kind in ("pcm16", "float", "pcm8", "stereo", "8khz", "silent-empty"):
        audio = {"stereo": np.stack([tone, tone], 1), "silent-empty": np.zeros(0, np.float32)}.get(kind, tone)
        subtype = {"pcm16": "PCM_16", "float": "FLOAT", "pcm8": "PCM_U8"}.get(kind, "PCM_16")
        sf.write(str(path), audio, 8000 if kind == "8khz" else 16000, subtype=subtype)
    elif kind == "cut":
        sf.write(str(path), tone, 16000, subtype="PCM_16")
        path.write_bytes(path.read_bytes()[:30])
    else:
        path.write_bytes({"zero-byte": b"", "garbage": b"RIFF nonsense WAVE"}[kind])


AUDIO_KINDS = ["pcm16", "float", "pcm8", "stereo", "8khz", "silent-empty", "cut", "zero-byte", "garbage"]


@fuzz(60)
@given(kinds=st.lists(st.sampled_from(AUDIO_KINDS), min_size=1, max_size=4), on_error=st.sampled_from(["raise", "skip"]),
       duration=st.sampled_from(["0", "0.05", "1"]))
def test_fuzz_audio_folders(capsys, tmp_path_factory, kinds, on_error, duration):
    root = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(len(kinds))
    (root / "src" / "one").mkdir(parents=True)
    for i, kind in enumerate(kinds):
        _audio_file(root / "src" / "one" / f"{i}.wav", kind, rng)
    argv = ["make-shards", root / "src", root / "out", "--duration", duration, "--on-error", on_error]
    _run(capsys, argv, "make-shards", target="audio folder", watch=[root / "src"])


# ---------------------------------------------------------------------------------------------
# Tokenizer caches: stale or cut


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    """A ``genmod tokenize``-style cache of 12 items in 3 shards, with a manifest."""
    from genmod.core.files import atomic_dir
    from genmod.tokenizers_vq.cache import tokenize_dataset
    from genmod.tokenizers_vq.models import VQTokenizer

    torch.manual_seed(0)
    tokenizer = VQTokenizer(quantizer="fsq", fsq_levels=(5, 5, 5), base_channels=8, ch_mult=(1, 2), num_res_blocks=1)
    rng = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(3, 16, 16, generator=rng) * 2 - 1, "label": i % 3, "caption": f"item {i}"}
             for i in range(12)]
    out = tmp_path_factory.mktemp("cache") / "cache"
    with atomic_dir(out, manifest=True) as staging:
        tokenize_dataset(tokenizer, items, staging, batch_size=4, shard_size=4)
    return out


CACHE_DAMAGE = RUN_DAMAGE + ("stale-count", "stale-shard", "shard-path", "index-keys")


def _damage_cache(folder, name: str, how: str) -> None:
    index = folder / "index.json"
    if how == "stale-count":
        _patch_json(index, num_samples=13)
    elif how == "stale-shard":  # an older run's shard: another shard's bytes under this name
        other = "shard-00001.safetensors" if name == "shard-00000.safetensors" else "shard-00000.safetensors"
        shutil.copy(folder / other, folder / name)
    elif how == "shard-path":
        value = json.loads(index.read_text())
        value["shards"][0]["file"] = "../../../etc/passwd"
        index.write_text(json.dumps(value))
    elif how == "index-keys":
        _patch_json(index, shards="none", captions=3)
    else:
        damage_file(folder / name, how)


@fuzz(60)
@given(data=st.data())
def test_fuzz_tokenizer_caches(token_cache, tmp_path_factory, data):
    from genmod.tokenizers_vq.cache import CachedLatentDataset

    folder = tmp_path_factory.mktemp("caches") / "cache"
    shutil.copytree(token_cache, folder)
    manifest = data.draw(st.booleans())
    if not manifest:  # a cache written before manifests
        os.remove(folder / "manifest.json")
    names = sorted(os.listdir(folder))
    picks = data.draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(CACHE_DAMAGE)), max_size=2,
                               unique_by=lambda p: p[0]))
    for name, how in picks:
        try:
            _damage_cache(folder, name, how)
        except (OSError, ValueError, TypeError, KeyError, IndexError):  # an earlier damage took that file already
            pass
    before = _tree(folder)
    try:
        dataset = CachedLatentDataset(str(folder))
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        record("tokenizer cache", (manifest, picks), "one-line" if "\n" not in message else "other")
        assert "\n" not in message and str(folder) in message, message
    else:
        record("tokenizer cache", (manifest, picks), "ok")
        assert len(dataset) >= 1
        if os.path.exists(folder / "manifest.json"):
            assert not picks and dataset[11]["caption"] == "item 11"  # with its manifest, nothing damaged loads
    assert _tree(folder) == before
