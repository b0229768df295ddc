"""Tokenizer models: shapes, save/load, sigma-VAE noise law, KL closed form, latent statistics,
index round trips, the latent cache and a short FSQ overfit."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genmod.tokenizers_vq.cache import CachedLatentDataset, tokenize_dataset
from genmod.tokenizers_vq.models import KLVAE, SigmaVAE, VQTokenizer, gaussian_kl, load_tokenizer
from genmod.tokenizers_vq.models.blocks import Decoder1d, Decoder2d, Encoder1d, Encoder2d

TINY = dict(base_channels=8, ch_mult=(1, 2), num_res_blocks=1)


@pytest.mark.parametrize("ch_mult,factor", [((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 2), 16)])
def test_image_encoder_decoder_downsampling(ch_mult, factor):
    enc = Encoder2d(3, 4, 8, ch_mult, 1, attention=True)
    dec = Decoder2d(4, 3, 8, ch_mult, 1, attention=True)
    z = enc(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 4, 32 // factor, 32 // factor)
    assert dec(z).shape == (2, 3, 32, 32)


def test_audio_encoder_decoder_strides():
    enc, dec = Encoder1d(1, 6, 4, (2, 4, 5, 8)), Decoder1d(6, 1, 4, (2, 4, 5, 8))
    z = enc(torch.randn(2, 1, 320 * 5))
    assert z.shape == (2, 6, 5)  # hop 2*4*5*8 = 320
    assert dec(z).shape == (2, 1, 1600)
    with pytest.raises(ValueError, match="multiple of the hop 320"):
        enc(torch.randn(1, 1, 1000))


@pytest.mark.parametrize("build", [
    lambda: VQTokenizer(quantizer="fsq", fsq_levels=(5, 5, 5), **TINY),
    lambda: VQTokenizer(quantizer="vq", codebook_size=32, latent_channels=4, **TINY),
    lambda: VQTokenizer(quantizer="rvq", codebook_size=16, num_quantizers=2, latent_channels=4, **TINY),
    lambda: VQTokenizer(quantizer="msvq", codebook_size=16, latent_channels=4, scales=(1, 2, 4, 8), **TINY),
    lambda: SigmaVAE(latent_channels=4, **TINY),
    lambda: KLVAE(latent_channels=4, **TINY),
    lambda: VQTokenizer(modality="audio", in_channels=1, base_channels=4, strides=(2, 4), quantizer="fsq",
                        fsq_levels=(5, 5)),
], ids=["fsq", "vq", "rvq", "msvq", "sigma_vae", "kl_vae", "audio_fsq"])
def test_save_load_roundtrip(build, tmp_path):
    torch.manual_seed(0)
    model = build()
    audio = model.config.modality == "audio"
    x = torch.randn(2, 1, 64) if audio else torch.randn(2, 3, 16, 16)
    model.train()
    model(x, generator=torch.Generator().manual_seed(0))  # one training forward: EMA / k-means buffers move
    model.register_to_config(scaling_factor=1.7, shift_factor=-0.2)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path)).eval()
    assert type(loaded) is type(model)
    assert loaded.config.scaling_factor == 1.7 and loaded.config.shift_factor == -0.2
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(model.encode(x), loaded.encode(x))
        assert torch.equal(model.decode(model.encode(x)), loaded.decode(model.encode(x)))


@pytest.mark.parametrize("quantizer", ["fsq", "vq", "rvq", "msvq"])
def test_index_roundtrip_matches_latent_path(quantizer):
    torch.manual_seed(0)
    model = VQTokenizer(quantizer=quantizer, codebook_size=16, num_quantizers=2, latent_channels=4,
                        fsq_levels=(5, 5, 5), scales=(1, 2, 4, 8), **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        indices = model.encode_indices(x)
        assert indices.dtype == torch.int64
        torch.testing.assert_close(model.decode_indices(indices), model.decode(model.encode(x)), atol=1e-5, rtol=1e-5)


def test_sigma_vae_mean_is_deterministic_and_noise_follows_sigma_law():
    torch.manual_seed(0)
    model = SigmaVAE(latent_channels=4, sigma_std=0.6, **TINY)
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        mu = model.encoder(x)
        assert torch.equal(model(x).latent, mu) and torch.equal(model(x).latent, model(x).latent)
        assert torch.equal(model.encode(x), model.encode(x))
    # training latent = mu + sigma_b * eps with the generator's draws
    model.train()
    with torch.no_grad():
        train_latent = model(x, generator=torch.Generator().manual_seed(3)).latent
        expected = model.add_noise(mu, torch.Generator().manual_seed(3))
    torch.testing.assert_close(train_latent, expected)
    assert not torch.allclose(train_latent, mu)
    # per-sample sigma ~ N(0, (C/0.8)^2): estimate |sigma_b| by the std of z - mu over many elements
    noise = model.add_noise(torch.zeros(6000, 2048), torch.Generator().manual_seed(1))
    sigma_hat = noise.std(dim=1)
    scale = 0.6 / 0.8
    assert abs(sigma_hat.pow(2).mean().item() - scale ** 2) < 0.05 * scale ** 2  # E[sigma^2] = scale^2
    assert abs(sigma_hat.mean().item() - scale * math.sqrt(2 / math.pi)) < 0.03 * scale  # half-normal mean
    # the per-sample spread is real (not one sigma for the batch)
    assert sigma_hat.std().item() > 0.5 * scale * math.sqrt(1 - 2 / math.pi)


def test_kl_vae_kl_matches_closed_form():
    torch.manual_seed(0)
    mean, logvar = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl(mean, logvar), reference.flatten(1).sum(1).mean())
    model = KLVAE(latent_channels=3, kl_weight=0.5, **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        m, lv = model.posterior(x)
        out = model(x)
    kl = gaussian_kl(m, lv)
    assert out.stats["kl"] == pytest.approx(kl.item(), rel=1e-5)
    torch.testing.assert_close(out.reg_loss, 0.5 * kl)


@pytest.mark.parametrize("cls", [SigmaVAE, KLVAE])
def test_latent_stats_normalise_the_data(cls):
    torch.manual_seed(0)
    model = cls(latent_channels=4, **TINY)
    images = torch.randn(24, 3, 16, 16) * 0.5 + 0.3
    loader = DataLoader(TensorDataset(images), batch_size=8)
    stats = model.compute_latent_stats(({"image": b[0]} for b in loader))
    assert model.config.scaling_factor == stats["scaling_factor"]
    with torch.no_grad():
        latents = model.eval().encode(images).double()
    assert abs(latents.mean().item()) < 1e-4
    assert latents.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # decode inverts the normalisation
    with torch.no_grad():
        torch.testing.assert_close(model.decode(model.encode(images)), model.decoder(model.encode_raw(images)))


class _TinyImages(torch.utils.data.Dataset):
    class_names = ["a", "b"]

    def __init__(self, n):
        g = torch.Generator().manual_seed(5)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": torch.tensor(i % 2), "caption": f"item {i}"}


@pytest.mark.parametrize("store", ["both", "latents"])
def test_cache_roundtrip_equals_direct_encoding(tmp_path, store):
    torch.manual_seed(0)
    model = VQTokenizer(quantizer="fsq", fsq_levels=(5, 5, 5), **TINY).eval()
    data = _TinyImages(11)
    tokenize_dataset(model, data, str(tmp_path), batch_size=4, shard_size=5, store=store)
    cached = CachedLatentDataset(str(tmp_path))
    assert len(cached) == 11 and len(cached.index["shards"]) == 3
    with torch.no_grad():
        direct = model.encode(data.images)
        direct_indices = model.encode_indices(data.images)
    for i in range(11):
        item = cached[i]
        assert torch.equal(item["latents"], direct[i])
        assert item["label"].item() == i % 2 and item["caption"] == f"item {i}"
        if store == "both":
            assert torch.equal(item["indices"], direct_indices[i])
        else:
            assert "indices" not in item


def test_fsq_tokenizer_overfits_a_few_shapes():
    """A tiny FSQ tokenizer beats the predict-the-mean-image baseline by a wide PSNR margin."""
    from genmod.data.shapes import ShapesDataset

    torch.manual_seed(0)
    data = ShapesDataset(split="train", num_samples=6, image_size=16)
    x = torch.stack([data[i]["image"] for i in range(6)])
    model = VQTokenizer(quantizer="fsq", fsq_levels=(8, 8, 8, 8), base_channels=8, ch_mult=(1, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(150):
        loss = (model(x).sample - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def psnr(a, b):
        return (10 * torch.log10(4.0 / (a - b).pow(2).mean())).item()

    with torch.no_grad():
        recon_psnr = psnr(model.eval()(x).sample.clamp(-1, 1), x)
    baseline = psnr(x.mean(0, keepdim=True).expand_as(x), x)
    assert recon_psnr > baseline + 6.0, (recon_psnr, baseline)
