"""Reports: eval-folder and eval of a pipeline (sweep, floor, JSON/markdown/plot) on tiny inputs."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from genmod.evals import feature_net as fn
from genmod.evals.cli import main_eval, main_eval_folder
from genmod.evals.generator_adapter import save_png_folder, to_uint8
from genmod.evals.metrics import frechet_distance, p_precision_recall



@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENMOD_CACHE", str(tmp_path / "cache"))


def _blobs(n, seed, shift=0.0, channels=3, size=16):
    """Class k: a bright k-th quadrant; images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = -0.7 + 0.2 * torch.randn(n, channels, size, size, generator=g)
    h = size // 2
    for i, k in enumerate(labels.tolist()):
        x[i, :, (k // 2) * h:(k // 2 + 1) * h, (k % 2) * h:(k % 2 + 1) * h] += 1.2
    return (x + shift).clamp(-1, 1), labels


class Blobs(torch.utils.data.Dataset):
    num_classes = 4

    def __init__(self, n, seed):
        self.x, self.y = _blobs(n, seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


@pytest.fixture(scope="module")
def blob_net(tmp_path_factory):
    out = tmp_path_factory.mktemp("blobnet") / "net"
    return fn.train_feature_net(Blobs(256, 0), str(out), test_dataset=Blobs(64, 1), epochs=2, batch_size=64, name="blobs", width=8)


def test_eval_folder_cli_report(blob_net, tmp_path):
    fake, _ = _blobs(120, 5, shift=0.15)
    real, _ = _blobs(120, 6)
    save_png_folder(to_uint8(fake), tmp_path / "fake")
    save_png_folder(to_uint8(real), tmp_path / "real")
    rc = main_eval_folder([str(tmp_path / "fake"), str(tmp_path / "real"), "--features", "domain", "--dataset", "blobs",
                           "--feature-net", blob_net.path, "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.load(open(tmp_path / "out" / "report.json"))
    run = report["runs"][0]
    model = run["spaces"]["domain"]["model"]
    with torch.no_grad():
        f_fake = blob_net.model(to_uint8(fake).float() / 127.5 - 1)[0]
        f_real = blob_net.model(to_uint8(real).float() / 127.5 - 1)[0]
    assert model["fid"] == pytest.approx(frechet_distance(f_fake, f_real), rel=1e-4)
    expected = p_precision_recall(f_real, f_fake)
    assert model["p_precision"] == pytest.approx(expected["p_precision"], abs=1e-5)
    assert model["p_recall"] == pytest.approx(expected["p_recall"], abs=1e-5)
    assert {"kid", "kid_std", "isc", "precision", "recall", "density", "coverage"} <= set(model)
    assert run["num_fake"] == run["num_real"] == 120 and model["kid_subset_size"] == 60
    assert run["spaces"]["domain"]["feature_extractor"]["sha256"] == blob_net.checksum
    assert report["versions"]["torch_fidelity"] == "0.4.0"
    markdown = open(tmp_path / "out" / "report.md").read()
    assert "N = 120 generated vs 120 real" in markdown and blob_net.checksum[:16] in markdown
    # temporary caches of unnamed inputs are removed again
    assert os.listdir(os.path.join(os.environ["GENMOD_CACHE"], "fidelity_cache")) == []


def test_eval_pipeline_sweep_with_floor(blob_net, tmp_path, monkeypatch):
    """A stand-in pipeline whose samples get closer to the data with more steps; the floor is real-vs-real."""
    from genmod.evals import cli as cli_module

    def fake_real_floor(dataset, num, seed=0):
        assert dataset == "blobs"
        return to_uint8(_blobs(num, 100)[0]), f"blobs-train-n{num}", to_uint8(_blobs(num, 101)[0]), f"blobs-test-n{num}"

    monkeypatch.setattr(cli_module, "real_floor", fake_real_floor)

    class StandIn:
        transformer = SimpleNamespace(config=SimpleNamespace(num_classes=4))

        def __call__(self, class_labels, num_inference_steps, guidance_scale, generator, output_type):
            labels = torch.as_tensor(class_labels)
            seed = int(torch.randint(0, 10**6, (1,), generator=generator))
            pool, _ = _blobs(4 * len(labels), seed, shift=0.4 / num_inference_steps)  # item j has class j % 4
            return SimpleNamespace(images=(pool[4 * torch.arange(len(labels)) + labels] + 1) / 2)

    out = cli_module.eval_pipeline(str(tmp_path), metrics=["fid", "kid"], num_samples=64, num_inference_steps=[1, 4],
                                      dataset="blobs", features=("domain",), feature_net_path=blob_net.path,
                                      out_dir=str(tmp_path / "eval"), pipeline=StandIn(), batch_size=32)
    runs = out["runs"]
    assert [r["settings"]["steps"] for r in runs] == [1, 4]
    fids = [r["spaces"]["domain"]["model"]["fid"] for r in runs]
    floors = [r["spaces"]["domain"]["real_vs_real"]["fid"] for r in runs]
    assert fids[0] > fids[1] and floors[0] == floors[1] and floors[0] < fids[0]
    assert runs[0]["classifier_accuracy"] == 1.0
    assert os.path.isfile(tmp_path / "eval" / "sweep_steps.png")
    assert os.path.isfile(tmp_path / "eval" / "samples_steps4_w1.0.npz")
    assert json.load(open(tmp_path / "eval" / "report.json"))["runs"][1]["settings"]["steps"] == 4


def test_cli_rejects_unknown_metric(capsys):
    with pytest.raises(SystemExit):
        main_eval(["somewhere", "--metrics", "fid,bogus"])
    assert "unknown metric(s) ['bogus']" in capsys.readouterr().err


def test_domain_fidelity_equals_the_hand_written_fid_kid_and_floor(blob_net):
    """``genmod.evals.held_out.domain_fidelity`` (demo, VAR, benchmarks) gives the numbers of the direct
    torch-fidelity calls it replaced: same features, same KID subsets, the floor at the same N."""
    from genmod.evals.generator_adapter import SampleDataset
    from genmod.evals.metrics import fidelity_metrics
    from genmod.evals.held_out import domain_fidelity

    fake, labels = _blobs(80, 7, shift=0.2)
    reference, _ = _blobs(80, 8)
    floor, _ = _blobs(80, 9)
    extractor = fn.register_feature_net(blob_net)

    def direct(a, b):
        return fidelity_metrics(SampleDataset(to_uint8(a)), SampleDataset(to_uint8(b)), metrics=("fid", "kid"),
                                feature_extractor=extractor, kid_subset_size=40)

    model, base = direct(fake, reference), direct(floor, reference)
    out = domain_fidelity(fake, reference, floor, "blobs", labels=labels, kid_subset_size=40,
                          feature_net_path=blob_net.path)
    assert out["domain_fid"] == pytest.approx(model["frechet_inception_distance"], rel=1e-12)
    assert out["domain_kid"] == pytest.approx(model["kernel_inception_distance_mean"], rel=1e-12)
    assert out["domain_fid_floor"] == pytest.approx(base["frechet_inception_distance"], rel=1e-12)
    assert out["domain_kid_floor"] == pytest.approx(base["kernel_inception_distance_mean"], rel=1e-12)
    assert out["domain_fid"] > out["domain_fid_floor"]  # shifted blobs are further than a second real set
    assert out["classifier_accuracy"] == fn.classifier_accuracy(blob_net, fake, labels)
    assert out["feature_net"]["sha256"] == blob_net.checksum
    # the temporary feature caches are removed again
    assert os.listdir(os.path.join(os.environ["GENMOD_CACHE"], "fidelity_cache")) == []


class _BlobPipeline:
    """A stand-in class-conditional pipeline: sample i of class k is a blob seeded by its own generator."""

    transformer = SimpleNamespace(config=SimpleNamespace(num_classes=4))

    def set_progress_bar_config(self, **kwargs):
        pass

    def sampling_settings(self):
        return {"guidance_scale": 1.0}

    def __call__(self, class_labels, generator, output_type="pt"):
        images = []
        for label, g in zip(class_labels, generator):
            x = -0.7 + 0.2 * torch.randn(3, 16, 16, generator=g)
            x[:, (label // 2) * 8:(label // 2 + 1) * 8, (label % 2) * 8:(label % 2 + 1) * 8] += 1.2
            images.append(x.clamp(-1, 1))
        return SimpleNamespace(images=(torch.stack(images) + 1) / 2)


def test_eval_held_out_cli_is_domain_fidelity_of_class_cycled_samples(blob_net, tmp_path, monkeypatch):
    from genmod.evals import cli as cli_module
    from genmod.evals import held_out as held_out_module

    reference, _ = _blobs(40, 8)
    floor, _ = _blobs(40, 9)
    monkeypatch.setattr(cli_module, "load_pipeline_for_eval", lambda path: _BlobPipeline())
    monkeypatch.setattr(held_out_module, "held_out_pair", lambda dataset, num: (reference[:num], floor[:num]))
    assert main_eval([str(tmp_path), "--held-out", "--num-samples", "40", "--dataset", "blobs", "--feature-net",
                      blob_net.path, "--out", str(tmp_path / "eval")]) == 0
    written = json.load(open(tmp_path / "eval" / "metrics.json"))
    # the same samples drawn in one batch, seeds 10_000 + i, labels i % 4
    labels = torch.arange(40) % 4
    fake = _BlobPipeline()(labels.tolist(), [torch.Generator().manual_seed(10_000 + i) for i in range(40)]).images * 2 - 1
    expected = held_out_module.domain_fidelity(fake, reference, floor, "blobs", labels=labels, kid_subset_size=40,
                                               feature_net_path=blob_net.path)
    assert written["num_eval"] == 40 and written["settings"] == {"guidance_scale": 1.0}
    for key in ("domain_fid", "domain_fid_floor", "domain_kid", "domain_kid_floor", "classifier_accuracy"):
        assert written[key] == pytest.approx(expected[key], rel=1e-12), key
    assert (tmp_path / "eval" / "grid.png").stat().st_size > 100
