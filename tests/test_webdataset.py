"""Sharded tar datasets (webdataset format): the shard writer's round trips, the seeded split across
ranks and workers, exact mid-epoch resume (in the dataset, and SIGKILL-and-resume of the trainer),
seeded crops/flips, and latent shards.

Also runnable as a script (the subprocess worker of the SIGKILL test):
    python tests/test_webdataset.py [--kill-at STEP] --dataset webdataset:PATTERN --output_dir OUT ...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

pytest.importorskip("webdataset")

from genmod.data import AudioFolderDataset, ImageFolderDataset, WebDatasetStream, collate, get_dataset  # noqa: E402
from genmod.data.crops import augment_rng, crop_and_flip  # noqa: E402
from genmod.data.shard_writer import main as make_shards, write_shards  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photos(root, sizes=((13, 17), (20, 11), (16, 16)), per_class=4):
    """Two class folders of random RGB PNGs of various sizes (full-size "photos")."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "golden_retriever"):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


class Latents(torch.utils.data.Dataset):
    """24 items of ``latents`` (2, 2, 2), labels and captions: a stand-in for a ``genmod tokenize`` cache."""

    num_classes, class_names = 3, ["a", "b", "c"]

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(1)
        self.latents, self.labels = torch.randn(n, 2, 2, 2, generator=g), torch.arange(n) % 3

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i], "label": self.labels[i], "caption": f"item {i}"}


def _latent_shards(tmp_path, shard_size=8):
    write_shards(Latents(), str(tmp_path / "lat"), shard_size)
    return f"{tmp_path}/lat/train-{{000000..000002}}.tar"


def _equal_items(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


# ---------------------------------------------------------------------------------------------
# The shard writer: folder -> shards -> the folder's items


@pytest.mark.parametrize("resolution", [8, None])
def test_image_folder_round_trip(tmp_path, resolution):
    """PNGs at --resolution, or the original files resized when read: items equal the folder's."""
    _photos(tmp_path / "src")
    args = ["--resolution", str(resolution)] if resolution else []
    assert make_shards([str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "3", *args]) == 0
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [s["count"] for s in info["shards"]] == [3, 3, 2] and info["class_names"] == ["cat", "golden_retriever"]
    stream = get_dataset(f"webdataset:{tmp_path}/out/train-{{000000..000002}}.tar", image_size=8)
    folder = ImageFolderDataset(tmp_path / "src", image_size=8)
    assert (stream.num_classes, stream.class_names, stream.channels) == (2, folder.class_names, 3)
    for i in range(len(folder)):
        assert _equal_items(stream[i], folder[i]), i
    assert stream[5]["caption"] == "a photo of a golden retriever"
    if resolution is None:
        with pytest.raises(ValueError, match="pass --resolution"):
            get_dataset(f"webdataset:{tmp_path}/out/train-000000.tar")


def test_audio_folder_round_trip(tmp_path):
    import soundfile as sf

    src = tmp_path / "speech"
    src.mkdir()
    rng = np.random.default_rng(2)
    for i in range(5):
        sf.write(src / f"{i}.wav", rng.uniform(-0.5, 0.5, 700 + 100 * i).astype(np.float32), 8000)
    (src / "metadata.json").write_text(json.dumps({f"{i}.wav": f"clip number {i}" for i in range(5)}))
    make_shards([str(src), str(tmp_path / "out"), "--shard-size", "2", "--sample-rate", "8000", "--duration", "0.1"])
    folder = AudioFolderDataset(src, sample_rate=8000, duration=0.1)
    stream = get_dataset(f"webdataset:{tmp_path}/out/train-{{000000..000002}}.tar")
    assert stream.sample_rate == 8000
    for i in range(5):
        assert _equal_items(stream[i], folder[i]), i


# ---------------------------------------------------------------------------------------------
# The seeded order: ranks, workers, resume


def _keys(batches):
    return [c for b in batches for c in b["caption"]]


def test_two_ranks_see_disjoint_items_covering_the_epoch(tmp_path):
    pattern = _latent_shards(tmp_path)  # 3 shards x 8 items
    seen = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            stream = WebDatasetStream(pattern, shuffle_buffer=4).configure(4, world_size=2, rank=rank, seed=3)
            stream.set_epoch(epoch)
            assert stream.batches_per_epoch == 3
            seen[epoch, rank] = [item["caption"] for item in stream]
        assert not set(seen[epoch, 0]) & set(seen[epoch, 1])
        assert sorted(seen[epoch, 0] + seen[epoch, 1]) == sorted(f"item {i}" for i in range(24))
    assert seen[0, 0] != seen[1, 0]  # a new shard permutation and buffer per epoch
    again = WebDatasetStream(pattern, shuffle_buffer=4).configure(4, world_size=2, rank=1, seed=3)
    again.set_epoch(1)
    assert [item["caption"] for item in again] == seen[1, 1]  # a function of (seed, epoch) only


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_continues_the_same_batches(tmp_path, num_workers):
    """``set_epoch(e, k)`` then a fresh DataLoader gives exactly batches k.. of the epoch."""
    stream = WebDatasetStream(_latent_shards(tmp_path), shuffle_buffer=5).configure(2, num_workers=num_workers, seed=9)
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=num_workers, collate_fn=collate)
    stream.set_epoch(1)
    full = list(loader)
    assert len(full) == stream.batches_per_epoch == 12 and sorted(_keys(full)) == sorted(f"item {i}" for i in range(24))
    for start in (3, 8):
        stream.set_epoch(1, start)
        rest = list(loader)
        assert _keys(rest) == _keys(full[start:])
        assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(rest, full[start:]))


def test_bad_patterns_name_the_file(tmp_path):
    pattern = _latent_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"shard .*train-000003.tar does not exist"):
        WebDatasetStream(pattern.replace("000002", "000009"))
    (tmp_path / "lat" / "dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match="no dataset.json beside the shards"):
        get_dataset("webdataset:" + pattern)
    with pytest.raises(ValueError, match="--batch_size"):
        write_shards(Latents(4), str(tmp_path / "small"), 4)
        WebDatasetStream(f"{tmp_path}/small/train-000000.tar").configure(4, world_size=2)


def test_tokenizer_cache_as_shards_streams_the_same_latents(tmp_path):
    """``genmod tokenize --format webdataset``'s conversion: a latent cache -> shards -> equal items, and
    the streamed epoch holds every cached item once."""
    from genmod.tokenizers_vq.cache import CachedLatentDataset, cache_to_webdataset, tokenize_dataset
    from genmod.tokenizers_vq.models import VQTokenizer

    torch.manual_seed(0)
    model = VQTokenizer(quantizer="fsq", fsq_levels=(5, 5, 5), base_channels=8, ch_mult=(1, 2), num_res_blocks=1)
    images = [{"image": torch.rand(3, 8, 8) * 2 - 1, "label": torch.tensor(i % 2), "caption": f"item {i}"} for i in range(10)]
    tokenize_dataset(model.eval(), images, str(tmp_path / "cache"), batch_size=4, shard_size=10)
    info = json.loads(open(cache_to_webdataset(str(tmp_path / "cache"), str(tmp_path / "shards"), 4)).read())
    assert info["store"] == "both" and info["tokenizer_class"] == "VQTokenizer" and info["num_samples"] == 10
    cache = CachedLatentDataset(str(tmp_path / "cache"))
    stream = WebDatasetStream(f"{tmp_path}/shards/train-{{000000..000002}}.tar").configure(5, seed=1)
    assert all(_equal_items(stream[i], cache[i]) for i in range(10))
    by_caption = {item["caption"]: item for item in stream}
    assert sorted(by_caption) == sorted(f"item {i}" for i in range(10))
    assert all(_equal_items(by_caption[cache[i]["caption"]], cache[i]) for i in range(10))


# ---------------------------------------------------------------------------------------------
# Crops and flips at --resolution


def test_crop_and_flip_known_offsets():
    image = torch.arange(2 * 6 * 9).view(2, 6, 9)
    rng = augment_rng(0, 0, "00000001")
    ref = augment_rng(0, 0, "00000001")  # offsets are the rng's first two integers, the flip its next uniform
    left, top, flip = int(ref.integers(0, 4)), int(ref.integers(0, 1)), ref.random() < 0.5
    out = crop_and_flip(image, 6, rng, random_crop=True, random_flip=True)
    expected = image[:, top:top + 6, left:left + 6]
    assert torch.equal(out, expected.flip(-1) if flip else expected)
    assert torch.equal(crop_and_flip(image, 6), image[:, :, 1:7])  # center
    flips = [crop_and_flip(image[:, :, :6], 6, augment_rng(0, e, "k"), random_flip=True) for e in range(20)]
    assert {torch.equal(f, image[:, :, :6].flip(-1)) for f in flips} == {True, False}
    with pytest.raises(ValueError, match="need an rng"):
        crop_and_flip(image, 6, random_crop=True)


def test_random_crops_are_seeded_and_shared_by_folders_and_shards(tmp_path):
    _photos(tmp_path / "src")
    make_shards([str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "3"])
    options = dict(image_size=8, random_crop=True, random_flip=True, seed=4)
    folder = ImageFolderDataset(tmp_path / "src", **options)
    stream = get_dataset(f"webdataset:{tmp_path}/out/train-{{000000..000002}}.tar", **options)
    resized = ImageFolderDataset(tmp_path / "src", image_size=8, preload=False)
    for epoch in (0, 1):
        folder.set_epoch(epoch)
        stream.set_epoch(epoch)
        for i in range(len(folder)):
            assert torch.equal(folder[i]["image"], stream[i]["image"])  # same (seed, epoch, key) -> same crop
    assert folder[0]["image"].shape == (3, 8, 8)
    folder.set_epoch(0)
    epoch0 = torch.stack([folder[i]["image"] for i in range(len(folder))])
    folder.set_epoch(1)
    assert not torch.equal(epoch0, torch.stack([folder[i]["image"] for i in range(len(folder))]))
    # the 20x11 photo (index 1): shorter side 11 -> 8, a crop of the 8 x 15 resize, not the center one
    from genmod.data.image_folder import load_image

    raw = ImageFolderDataset(tmp_path / "src", image_size=8, random_crop=True, seed=4, preload=False)
    big = load_image(raw.files[1], 8, 3, crop=False)
    rng = augment_rng(4, 0, "00000001")
    assert big.shape == (3, 15, 8) and torch.equal(raw[1]["image"], crop_and_flip(big, 8, rng, True).float() / 127.5 - 1)
    assert resized[1]["image"].shape == (3, 8, 8)


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-epoch and resume through the trainer (latent shards, 2 DataLoader workers)


def _start_worker(out, pattern, *extra, kill_at=None):
    cmd = [sys.executable, os.path.abspath(__file__)] + (["--kill-at", str(kill_at)] if kill_at else [])
    cmd += ["--dataset", f"webdataset:{pattern}", "--output_dir", str(out), "--cpu", "--no-tensorboard",
            "--max_steps", "9", "--batch_size", "4", "--num_workers", "2", "--lr", "1e-2", "--ema_decay", "0",
            "--checkpoint_every", "3", "--keep_last", "0", "--sample_every", "0", "--log_every", "1", "--seed", "5",
            *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _finish(process) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=240)
    return process.returncode, stderr[-2000:]


def test_sigkill_mid_epoch_and_resume_reproduce_the_losses(tmp_path):
    from genmod.train.logs import read_metrics

    pattern = _latent_shards(tmp_path)  # 24 items, 2 workers x batch 4 -> 6 batches per epoch
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _start_worker(straight, pattern)  # the two first runs side by side, to save one start-up
    crash = _start_worker(killed, pattern, kill_at=5)  # after the step-3 checkpoint: epoch 0, batch 3 (worker 1's turn)
    rc, err = _finish(done)
    assert rc == 0, err
    rc, err = _finish(crash)
    assert rc == -signal.SIGKILL, err
    rc, err = _finish(_start_worker(killed, pattern, "--resume", "latest"))  # and on into epoch 1
    assert rc == 0, err
    expected = [m["loss"] for m in read_metrics(straight)]
    got = [m["loss"] for m in read_metrics(killed)]
    assert len(expected) == 9 and got == expected  # bitwise: the same batches in the same order
    state = json.loads((killed / "checkpoints" / "step-00000009" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"], state["num_workers"]) == (1, 3, 2)


class LinearDenoiser(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, dim: int = 8):
        super().__init__()
        self.net = torch.nn.Linear(dim, dim)


def _worker(argv):
    from genmod.train import Family, TrainConfig, Trainer
    from genmod.train.flags import parse_config

    kill_at = None
    if argv[:1] == ["--kill-at"]:
        kill_at, argv = int(argv[1]), argv[2:]

    class LatentFamily(Family):
        name, config_class = "latents", TrainConfig

        def build_model(self):
            torch.manual_seed(0)
            return LinearDenoiser()

        def loss(self, model, batch, generator):
            x0 = batch["latents"].flatten(1)
            noise = torch.randn(x0.shape, generator=generator)
            return {"loss": ((model.net(noise) - (noise - x0)) ** 2).mean()}

        def sample(self, model, num, generator):
            return torch.zeros(num, 1, 2, 2)

    config = parse_config(TrainConfig, argv)
    callbacks = []
    if kill_at is not None:
        callbacks.append(lambda trainer, step, metrics: step == kill_at and os.kill(os.getpid(), signal.SIGKILL))
    torch.set_num_threads(1)
    Trainer(config, LatentFamily(config), callbacks=callbacks).train()


if __name__ == "__main__":
    _worker(sys.argv[1:])
