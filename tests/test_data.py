"""genmod.data: built-in datasets against what they claim to draw, real-data readers, user folders."""

from __future__ import annotations

import gzip
import json
import logging
import math
import shutil
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from scipy.optimize import least_squares

import genmod.data as D
from genmod.data import fashion_mnist as fm
from genmod.data.oscillators import damped_oscillation
from genmod.data.moving_shapes import bounce
from genmod.data.render import SHAPE_NAMES
from genmod.data.shapes import COLOURS, POSITION_WORDS, SIZE_RANGES

# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------

# Area of each outline at unit radius (see the SDFs in genmod/data/render.py).
UNIT_AREAS = {
    "circle": math.pi,
    "square": 1.6**2,
    "triangle": 3 * math.sqrt(3) / 4,
    "plus": 2 * (2.0 * 0.6) - 0.6**2,
    "ring": math.pi * (1.0**2 - 0.44**2),
    "diamond": 2 * 0.68,
    "star": 5 * 1.0 * 0.45 * math.sin(math.radians(36)),
}


@pytest.fixture(scope="module")
def shapes():
    return D.ShapesDataset(num_samples=160, seed=3)


def _foreground(image: torch.Tensor) -> torch.Tensor:
    """Pixels covered by the shape: backgrounds stay below 0.4 in every channel, every palette
    colour has a channel above 0.85, so 0.6 on the brightest channel is about half coverage."""
    unit = (image + 1) / 2
    return unit.max(dim=0).values > 0.6


def test_shapes_deterministic_and_split_dependent(shapes):
    # Rebuilt with another length: item i depends on (seed, split, i) only.
    again = D.ShapesDataset(num_samples=30, seed=3)
    assert all(torch.equal(shapes[i]["image"], again[i]["image"]) for i in range(30))
    assert [shapes[i]["caption"] for i in range(30)] == [again[i]["caption"] for i in range(30)]
    test = D.ShapesDataset(split="test", num_samples=10, seed=3)
    other_seed = D.ShapesDataset(num_samples=10, seed=4)
    for i in range(10):
        assert not torch.equal(test[i]["image"], shapes[i]["image"])
        assert not torch.equal(other_seed[i]["image"], shapes[i]["image"])


def test_shapes_ranges_and_metadata(shapes):
    assert shapes.num_classes == 8 and shapes.class_names == list(SHAPE_NAMES)
    assert (shapes.image_size, shapes.channels) == (32, 3)
    item = shapes[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64
    images = torch.stack([shapes[i]["image"] for i in range(len(shapes))])
    assert images.min() >= -1 and images.max() <= 1
    labels = torch.stack([shapes[i]["label"] for i in range(len(shapes))])
    assert set(labels.tolist()) == set(range(8))  # every class occurs in 160 draws
    small = D.ShapesDataset(num_samples=4, image_size=16)
    assert small[0]["image"].shape == (3, 16, 16) and small.image_size == 16


def test_shape_captions_match_the_pixels(shapes):
    words = {w: (r, c) for r, row in enumerate(POSITION_WORDS) for c, w in enumerate(row)}
    checked_position = checked_area = 0
    for i in range(len(shapes)):
        item, p = shapes[i], shapes.params(i)
        size, colour, name = item["caption"].split()[1:4]
        where = " ".join(item["caption"].split()[4:])
        assert (name, colour, size) == (p.shape, p.colour, p.size)
        assert int(item["label"]) == SHAPE_NAMES.index(name)
        mask = _foreground(item["image"])
        unit = (item["image"] + 1) / 2
        # Colour word: the mean colour of the covered pixels is nearest to the named colour.
        mean_rgb = unit[:, mask].mean(dim=1)
        nearest = min(COLOURS, key=lambda c: float(((mean_rgb - torch.tensor(COLOURS[c])) ** 2).sum()))
        assert nearest == colour, (item["caption"], mean_rgb)
        # Position word: the 3x3 cell of the covered pixels' centroid (skip centroids on a border).
        ys, xs = torch.nonzero(mask, as_tuple=True)
        cx, cy = float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5
        third = 32 / 3
        if min(abs(cx - k * third) for k in (1, 2)) > 0.6 and min(abs(cy - k * third) for k in (1, 2)) > 0.6:
            assert words[where] == (min(2, int(cy / third)), min(2, int(cx / third))), (item["caption"], cx, cy)
            checked_position += 1
        # Size and class: the covered area equals the outline's analytic area at the drawn radius,
        # and the radius lies in the named size's range.
        lo, hi = SIZE_RANGES[size]
        assert lo * 32 <= p.radius <= hi * 32
        if name in UNIT_AREAS:
            # Pixels over half-way between background (the median) and the shape's colour (the max)
            # on the brightest channel: an unbiased count of the covered area up to edge noise.
            value = unit.max(dim=0).values
            area = float((value > (value.median() + value.max()) / 2).sum())
            expected = UNIT_AREAS[name] * p.radius**2
            assert abs(area - expected) < 0.1 * expected + 3, (item["caption"], area, expected)
            checked_area += 1
    assert checked_position > 100 and checked_area > 100


# ----------------------------------------------------------------------------------------------
# Moving shapes
# ----------------------------------------------------------------------------------------------


def test_bounce_formula_reflects_at_walls():
    # From 8 towards the wall at 10 with speed 1, then back: 8, 9, 10, 9, 8, ... and past the
    # other wall (0) it comes back again after a full period 2L = 20.
    t = np.arange(25)
    x = bounce(8.0, 1.0, t, 0.0, 10.0)
    expected = [8, 9, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 9, 8]
    np.testing.assert_allclose(x, expected, atol=1e-12)
    np.testing.assert_allclose(bounce(2.0, -0.5, np.array([0, 4, 8]), 0.0, 10.0), [2.0, 0.0, 2.0], atol=1e-12)


def test_moving_shapes_follow_constant_velocity_and_bounce():
    ds = D.MovingShapesDataset(num_samples=24, max_shapes=1, seed=1)
    assert (ds.num_classes, ds.image_size, ds.channels, ds.num_frames) == (8, 32, 3, 16)
    symmetric = {"circle", "square", "triangle", "plus", "ring", "diamond", "star"}  # centroid = centre
    bounced = checked = 0
    grid = torch.arange(32, dtype=torch.float32) + 0.5
    for i in range(len(ds)):
        item, p = ds[i], ds.params(i)
        assert item["video"].shape == (16, 3, 32, 32)
        assert item["caption"].startswith(f"a {p.colours[0]} {p.shape} moving ")
        if p.shape not in symmetric:
            continue
        # Centroid per frame from a coverage estimate: brightest channel scaled between the
        # background (median) and the shape colour (max), faint texture ignored.
        value = ((item["video"] + 1) / 2).max(dim=1).values
        flat = value.flatten(1)
        bg, fg = flat.median(dim=1).values.view(-1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1)
        weight = ((value - bg) / (fg - bg)).clamp(0, 1)
        weight = torch.where(weight > 0.15, weight, torch.zeros_like(weight))
        cx = (weight.sum(dim=1) * grid).sum(dim=1) / weight.sum(dim=(1, 2))
        cy = (weight.sum(dim=2) * grid).sum(dim=1) / weight.sum(dim=(1, 2))
        measured = torch.stack([cx, cy], dim=1).numpy()
        # The law, fitted to the pixels alone: per axis two numbers (start, velocity) plus elastic
        # reflections at the walls must explain all 16 centroids.
        low, high = p.walls[0]
        frames = np.arange(16)
        for axis in range(2):
            model = lambda q: bounce(q[0], q[1], frames, low, high) - measured[:, axis]  # noqa: E731
            starts = [[measured[0, axis], measured[k + 1, axis] - measured[k, axis]] for k in range(3)]
            fit = least_squares(model, min(starts, key=lambda q: np.abs(model(q)).max()))
            assert np.abs(fit.fun).max() < 0.25, (i, axis, np.abs(fit.fun).max())
            # A start next to a wall leaves the sign of v ambiguous (mirror start), not its size.
            assert abs(abs(fit.x[1]) - abs(p.velocity[0][axis])) < 0.03, (i, axis, fit.x, p.velocity[0])
        np.testing.assert_allclose(measured, p.centers(frames)[0], atol=0.2)
        steps = np.diff(measured, axis=0)
        bounced += bool((np.sign(steps[1:]) * np.sign(steps[:-1]) < 0).any())
        checked += 1
    assert checked >= 15 and bounced >= 5, (checked, bounced)
    longer = ds.ground_truth(0, 24)
    assert longer.shape == (24, 3, 32, 32) and torch.equal(longer[:16], ds[0]["video"])


def test_moving_shapes_two_shapes_deterministic():
    a = D.MovingShapesDataset(num_samples=6, num_frames=4, image_size=16, seed=2)
    b = D.MovingShapesDataset(num_samples=6, num_frames=4, image_size=16, seed=2)
    assert a[0]["video"].shape == (4, 3, 16, 16)
    assert all(torch.equal(a[i]["video"], b[i]["video"]) for i in range(6))
    assert any(len(a.params(i).colours) == 2 for i in range(6))
    assert not torch.equal(D.MovingShapesDataset("test", num_samples=1, num_frames=4, image_size=16, seed=2)[0]["video"], a[0]["video"])


# ----------------------------------------------------------------------------------------------
# Oscillators and tones
# ----------------------------------------------------------------------------------------------


def test_oscillators_are_clean_solution_plus_stated_noise():
    ds = D.DampedOscillatorDataset(num_samples=200, num_steps=64, dim=2, noise_std=0.05, seed=5)
    assert ds[0]["sequence"].shape == (64, 2) and ds.num_classes == 4
    residual = np.stack([ds[i]["sequence"].numpy() - ds.clean(i) for i in range(len(ds))])
    n = residual.size
    assert abs(residual.std() - 0.05) < 0.05 * 4 / math.sqrt(2 * n)  # 4 standard errors of the std
    assert abs(residual.mean()) < 4 * 0.05 / math.sqrt(n)
    # The clean function solves x'' + 2 gamma x' + omega_0^2 x = 0 with omega_0^2 = (2 pi f)^2 + gamma^2,
    # also past the observed window (checked with central differences).
    p, h = ds.params(3), 1e-3
    t = np.linspace(3.0, 8.0, 50)
    x, xp, xm = (damped_oscillation(p, t + s) for s in (0.0, h, -h))
    omega0_sq = (2 * np.pi * p.frequency) ** 2 + p.damping**2
    ode = (xp - 2 * x + xm) / h**2 + 2 * p.damping * (xp - xm) / (2 * h) + omega0_sq * x
    assert np.abs(ode).max() < 1e-3 * omega0_sq.max()
    f0 = p.frequency[0]
    assert ds.label(3) == int((f0 - 0.5) // 0.5)
    again = D.DampedOscillatorDataset(num_samples=200, dim=2, seed=5)
    assert torch.equal(again[17]["sequence"], ds[17]["sequence"])
    assert not torch.equal(D.DampedOscillatorDataset("test", num_samples=20, dim=2, seed=5)[17]["sequence"], ds[17]["sequence"])


def _spectrum(audio: torch.Tensor, sample_rate: int):
    x = audio[0].numpy().astype(np.float64)
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sample_rate), mag


def test_tones_have_the_stated_pitches_and_formants():
    ds = D.ToneDataset(num_samples=80, seed=2)
    assert ds.num_classes == 8 and ds.sample_rate == 16000
    high_band_ratio = {}
    for i in range(len(ds)):
        item, p = ds[i], ds.params(i)
        audio = item["audio"]
        assert audio.shape == (1, 16000) and item["sample_rate"] == 16000
        assert audio.abs().max() <= 1 and abs(float(audio.abs().max()) - p["gain"]) < 1e-6
        assert abs(float(audio[0, 0])) < 1e-3 and abs(float(audio[0, -1])) < 1e-3  # faded in/out
        freqs, mag = _spectrum(audio, 16000)
        if p["kind"] == "tone":
            assert abs(freqs[mag.argmax()] - p["fundamentals"][0]) <= 1.0
        elif "chord" in p["kind"]:
            peaks = [k for k in range(1, len(mag) - 1) if mag[k] >= mag[k - 1] and mag[k] >= mag[k + 1]]
            top3 = sorted(sorted(peaks, key=lambda k: -mag[k])[:3])
            np.testing.assert_allclose(freqs[top3], sorted(p["fundamentals"]), atol=1.0)
            assert item["caption"].endswith(p["kind"])
        else:
            assert item["caption"] == f"the vowel {p['vowel']}"
            band = lambda lo, hi: (mag[(freqs >= lo) & (freqs < hi)] ** 2).sum()  # noqa: E731
            high_band_ratio.setdefault(p["vowel"], []).append(band(1700, 3200) / band(0, 1200))
    # Front vowels (i, e: F2 near 2 kHz) carry far more energy above 1.7 kHz than back vowels (o, u).
    front = min(min(high_band_ratio[v]) for v in ("i", "e"))
    back = max(max(high_band_ratio[v]) for v in ("o", "u"))
    assert front > 5 * back
    again = D.ToneDataset(num_samples=80, seed=2)
    assert torch.equal(again[5]["audio"], ds[5]["audio"])


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST and IDX
# ----------------------------------------------------------------------------------------------


def test_idx_parser_on_hand_made_files(tmp_path):
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3i", 2, 2, 3) + bytes(range(12))
    (tmp_path / "u8-idx3").write_bytes(raw)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "u8-idx3"), np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    # int32 payload is big-endian: bytes 00 00 01 02 are 258.
    raw32 = bytes([0, 0, 0x0C, 1]) + struct.pack(">i", 2) + bytes([0, 0, 1, 2, 0xFF, 0xFF, 0xFF, 0xFE])
    with gzip.open(tmp_path / "i32.gz", "wb") as f:
        f.write(raw32)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "i32.gz"), [258, -2])
    array = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(D.read_idx(D.write_idx(tmp_path / "w-idx3-ubyte.gz", array)), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + struct.pack(">i", 1) + b"\x00")
    with pytest.raises(ValueError, match="bad.*magic"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="short.*11 bytes, expected 12"):
        D.read_idx(tmp_path / "short")


def test_fashion_mnist_from_a_root_folder_and_missing_files(tmp_path, monkeypatch):
    images = np.zeros((4, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    D.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    D.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 0, 3, 3], np.uint8))
    ds = D.FashionMNIST("test", root=tmp_path, rgb=True)
    item = ds[0]
    assert len(ds) == 4 and item["image"].shape == (3, 32, 32) and ds.channels == 3
    assert torch.equal(item["image"][0], item["image"][2])
    assert item["image"][0, 0].eq(-1).all() and item["image"][0, 12:20, 12:20].eq(1).all()  # 2-pixel pad
    assert item["caption"] == "a photo of an ankle boot" and int(item["label"]) == 9
    assert D.FashionMNIST("test", root=tmp_path, pad_to=None)[0]["image"].shape == (1, 28, 28)
    monkeypatch.setenv("GENMOD_DATA_DIR", str(tmp_path))  # searched before the Debian folder
    assert len(D.FashionMNIST("test")) == 4
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(fm, "torchvision_cache_root", lambda: str(tmp_path / "tv"))
    monkeypatch.delenv("GENMOD_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        D.FashionMNIST("train", root=tmp_path)
    assert str(tmp_path / "nowhere") in str(err.value)


@pytest.mark.skipif(fm.find_fashion_mnist("train") is None or fm.find_fashion_mnist("test") is None,
                    reason="Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_full_dataset():
    train, test = D.get_dataset("fashion_mnist"), D.get_dataset("fashion_mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert int(train[0]["label"]) == 9  # the first training image is an ankle boot
    assert train.image_size == 32 and train.channels == 1 and train.num_classes == 10
    x = train[0]["image"]
    assert x.shape == (1, 32, 32) and x.min() == -1 and x.max() == 1


@pytest.mark.skipif(fm.find_fashion_mnist("test") is None, reason="Fashion-MNIST files not installed")
def test_torchvision_by_name_matches_our_idx_reader(tmp_path):
    # torchvision's own FashionMNIST class over the Debian test files (decompressed into its layout;
    # the train files only have to exist) must give the same images and labels as our reader.
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in fm.find_fashion_mnist("test"):
        name = path.split("/")[-1].removesuffix(".gz")
        (raw / name).write_bytes(gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read())
    D.write_idx(raw / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    D.write_idx(raw / "train-labels-idx1-ubyte", np.zeros(1, np.uint8))
    tv = D.get_dataset("torchvision:FashionMNIST", split="test", root=tmp_path, num_samples=50)
    ours = D.FashionMNIST("test", pad_to=None)
    assert len(tv) == 50 and tv.num_classes == 10 and (tv.channels, tv.image_size) == (1, 28)
    for k, index in enumerate(tv.indices):
        assert torch.equal(tv[k]["image"], ours[index]["image"]) and int(tv[k]["label"]) == int(ours[index]["label"])
    assert tv.indices[-1] == 9999  # spread over the whole split
    resized = D.TorchvisionDataset("FashionMNIST", "test", root=tmp_path, image_size=32, channels=3, num_samples=2)
    assert resized[0]["image"].shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------
# User folders
# ----------------------------------------------------------------------------------------------


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_image_folder_labels_crop_and_corrupt_files(tmp_path, caplog):
    for k in range(3):
        _png(tmp_path / "cat" / f"{k}.png", np.full((32, 32, 3), 40 * k, np.uint8))
    tall = np.zeros((60, 40, 3), np.uint8)
    tall[:, :, 1] = 255
    tall[:8, :, :] = (0, 0, 255)  # a blue band that the center crop must cut away
    _png(tmp_path / "dog_breed" / "tall.png", tall)
    (tmp_path / "dog_breed" / "broken.png").write_bytes(b"not an image at all")
    good = _png(tmp_path / "dog_breed" / "good.png", np.full((32, 32, 3), 200, np.uint8)).read_bytes()
    (tmp_path / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])

    with pytest.raises(D.UnreadableFileError, match=r"cat/truncated.png: unreadable image"):
        D.ImageFolderDataset(tmp_path, on_error="raise")  # the first bad file in sorted order
    with caplog.at_level(logging.WARNING, logger="genmod.data"):
        ds = D.get_dataset(f"image_folder:{tmp_path}", image_size=32, on_error="skip")
    assert len(ds) == 5 and len(ds.skipped) == 2
    assert {p.split("/")[-1] for p, _ in ds.skipped} == {"broken.png", "truncated.png"}
    assert "skipped 2 unreadable image file(s)" in caplog.text
    assert ds.class_names == ["cat", "dog_breed"] and ds.num_classes == 2 and ds.image_size == 32
    by_name = {f.split("/")[-1]: ds[k] for k, f in enumerate(ds.files)}
    assert int(by_name["2.png"]["label"]) == 0 and int(by_name["tall.png"]["label"]) == 1
    assert by_name["tall.png"]["caption"] == "a photo of a dog breed"
    crop = by_name["tall.png"]["image"]
    assert crop.shape == (3, 32, 32)
    torch.testing.assert_close(crop, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32))
    torch.testing.assert_close(by_name["1.png"]["image"], torch.full((3, 32, 32), 40 / 127.5 - 1))
    subset = D.ImageFolderDataset(tmp_path, on_error="skip", num_samples=2)  # spread over both classes
    assert [f.split("/")[-1] for f in subset.files] == ["0.png", "tall.png"] and subset.labels == [0, 1]
    lazy = D.ImageFolderDataset(tmp_path, on_error="skip", preload=False, channels=1)
    assert len(lazy) == 5 and len(lazy.skipped) == 2 and lazy[0]["image"].shape == (1, 32, 32)
    (tmp_path / "cat" / "0.png").write_bytes(b"overwritten after the scan")
    with pytest.raises(D.UnreadableFileError, match="cat/0.png: unreadable image"):
        lazy[lazy.files.index(str(tmp_path / "cat" / "0.png"))]


def test_audio_folder_round_trip_resampling_and_transcripts(tmp_path, caplog):
    t = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    D.save_wav(tmp_path / "low" / "a.wav", tone, 8000)  # 1 s at 8 kHz -> resampled to 16 kHz
    stereo = np.stack([0.25 * np.sin(2 * np.pi * 1000 * np.arange(4000) / 16000)] * 2)
    D.save_wav(tmp_path / "high" / "b.flac", stereo, 16000, subtype="PCM_16")
    (tmp_path / "high" / "c.wav").write_bytes(b"RIFF....WAVEgarbage")

    with pytest.raises(D.UnreadableFileError, match="c.wav"):
        D.AudioFolderDataset(tmp_path, duration=0.5)
    with caplog.at_level(logging.WARNING, logger="genmod.data"):
        ds = D.get_dataset(f"audio_folder:{tmp_path}", duration=0.5, on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1 and "skipped 1 unreadable audio" in caplog.text
    assert ds.class_names == ["high", "low"]
    items = {f.split("/")[-1]: ds[k] for k, f in enumerate(ds.files)}
    a, b = items["a.wav"], items["b.flac"]
    assert a["audio"].shape == (1, 8000) and a["sample_rate"] == 16000 and int(a["label"]) == 1 and a["caption"] == "low"
    freqs, mag = _spectrum(a["audio"], 16000)
    assert abs(freqs[mag.argmax()] - 440) <= 2.0
    assert abs(float(a["audio"][0, 2000:6000].abs().max()) - 0.5) < 0.01
    # Stereo FLAC: averaged to mono, 16-bit round trip, zero-padded from 4000 to 8000 samples.
    expected = np.round(stereo[0] * 32767) / 32767
    np.testing.assert_allclose(b["audio"][0, :4000].numpy(), expected, atol=1.5 / 32768)
    assert b["audio"][0, 4000:].abs().max() == 0
    # Transcripts and labels from a CSV; only listed files are used.
    (tmp_path / "transcripts.csv").write_text("file,text,label\nlow/a.wav,a low hum,3\nhigh/b.flac,a beep,1\n")
    listed = D.AudioFolderDataset(tmp_path, duration=None, class_names=[str(k) for k in range(4)])
    assert [listed[k]["caption"] for k in range(2)] == ["a low hum", "a beep"]
    assert [int(listed[k]["label"]) for k in range(2)] == [3, 1] and listed[1]["audio"].shape == (1, 4000)


# ----------------------------------------------------------------------------------------------
# Speech digits
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)")
def test_speech_digits_generation_and_dataset(tmp_path):
    from genmod.data import speech_digits as sd

    assert sd.main(["--out", str(tmp_path / "a"), "--num", "3", "--seed", "4", "--test-fraction", "0"]) == 0
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["sample_rate"] == 16000 and len(meta["items"]) == 3
    assert meta["items"] == json.loads((tmp_path / "a" / "metadata.json").read_text())["items"]
    for rec in meta["items"]:
        assert rec["text"] == " ".join(sd.DIGIT_WORDS[d] for d in rec["digits"])
        assert rec["voice"] in sd.VOICES and sd.SPEED_RANGE[0] <= rec["speed"] <= sd.SPEED_RANGE[1]
        info = sf.info(str(tmp_path / "a" / rec["file"]))
        assert info.samplerate == 16000 and info.channels == 1 and info.frames == rec["num_samples"]
        assert 0.2 < info.duration < 0.8 * len(rec["digits"]) + 0.6
    # Same seed: same plan and same waveforms; another seed: another plan.
    sd.generate_speech_digits(tmp_path / "b", num=3, seed=4, test_fraction=0, progress=False)
    for rec in meta["items"]:
        assert (tmp_path / "a" / rec["file"]).read_bytes() == (tmp_path / "b" / rec["file"]).read_bytes()
    assert sd.plan_corpus(20, 4) == sd.plan_corpus(20, 4) and sd.plan_corpus(20, 4) != sd.plan_corpus(20, 5)
    ds = D.get_dataset("speech_digits", root=tmp_path / "a", duration=2.0)
    assert len(ds) == 3 and ds.num_classes == 10
    assert len(D.SpeechDigitsDataset(root=tmp_path / "a", num_samples=2)) == 2
    for k, rec in enumerate(meta["items"]):
        item = ds[k]
        assert item["audio"].shape == (1, 32000) and item["sample_rate"] == 16000
        assert item["caption"] == rec["text"]
        assert int(item["label"]) == (rec["digits"][0] if len(rec["digits"]) == 1 else -1)
        assert item["audio"].abs().max() > 0.05
    # drop_longer keeps exactly the clips that fit, so no kept clip loses the end of its caption
    cut = sorted(rec["num_samples"] for rec in meta["items"])[1] / 16000
    kept = D.SpeechDigitsDataset(root=tmp_path / "a", duration=cut, drop_longer=True)
    assert [r["file"] for r in kept.items] == [r["file"] for r in meta["items"] if r["num_samples"] <= cut * 16000]
    assert len(kept) == 2 and kept[0]["audio"].shape == (1, round(cut * 16000))
    with pytest.raises(ValueError, match="drop_longer=True needs a duration"):
        D.SpeechDigitsDataset(root=tmp_path / "a", duration=None, drop_longer=True)


def test_speech_digits_missing_corpus_and_espeak(tmp_path, monkeypatch):
    from genmod.data import speech_digits as sd

    with pytest.raises(FileNotFoundError, match="genmod make-speech-digits --out"):
        D.SpeechDigitsDataset(root=tmp_path)
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        sd.main(["--out", str(tmp_path), "--num", "2"])


# ----------------------------------------------------------------------------------------------
# Registry, collate and writers
# ----------------------------------------------------------------------------------------------


def test_registry_and_collate():
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*shapes.*torchvision:"):
        D.get_dataset("nope")
    with pytest.raises(ValueError, match="unknown dataset 'bogus:x'"):
        D.get_dataset("bogus:x")
    with pytest.raises(ValueError, match="torchvision.datasets has no dataset named 'NoSuchSet'"):
        D.get_dataset("torchvision:NoSuchSet")
    ds = D.get_dataset("tones", split="test", num_samples=3)
    batch = D.collate([ds[k] for k in range(3)])
    assert batch["audio"].shape == (3, 1, 16000) and batch["label"].dtype == torch.int64
    assert batch["caption"] == [ds[k]["caption"] for k in range(3)] and batch["sample_rate"] == 16000
    with pytest.raises(ValueError, match="key 'image' has different shapes"):
        D.collate([{"image": torch.zeros(3, 4, 4)}, {"image": torch.zeros(3, 5, 5)}])


def test_writers_round_trip(tmp_path):
    images = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    path = D.save_image_grid(images, tmp_path / "grid.png", nrow=2, padding=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (4, 7, 3)  # 1 + 2 + 1 + 2 + 1 columns, 1 + 2 + 1 rows
    assert (grid[1:3, 1:3] == 0).all() and (grid[1:3, 4:6] == 255).all() and (grid[0] == 255).all()
    audio = torch.linspace(-0.5, 0.5, 1000).unsqueeze(0)
    data, rate = sf.read(D.save_wav(tmp_path / "x.wav", audio, 22050), dtype="float32")
    assert rate == 22050 and np.abs(data - audio[0].numpy()).max() < 1 / 32768 + 1e-6
    video = torch.rand(2, 5, 3, 8, 8) * 2 - 1
    gif = Image.open(D.save_gif(tmp_path / "v.gif", video, fps=10, scale=1))
    assert gif.n_frames == 5 and gif.size == (2 * 8 + 3 * 2, 8 + 2 * 2)
    with pytest.raises(ValueError, match="video must be"):
        D.save_gif(tmp_path / "bad.gif", torch.zeros(3, 8, 8))
