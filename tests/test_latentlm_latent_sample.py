"""Issue 21 item 1: LatentLM trains on sigma-VAE posterior samples (``mu + sigma_b * eps``, one sigma per item,
as the released ``train_hf.py`` encodes with ``.sample()``) and takes its latent statistics from such samples;
``latent_sample=False`` keeps the old mean-based behaviour."""

from __future__ import annotations

import torch

from genmod.latentlm.family import LatentLMConfig, LatentLMFamily, sample_from_cached


def tiny_sigma_vae():
    from genmod.tokenizers_vq.models import SigmaVAE

    torch.manual_seed(0)
    return SigmaVAE(modality="image", in_channels=3, base_channels=8, ch_mult=(1, 2), num_res_blocks=1,
                    latent_channels=4, sigma_std=0.75).eval()


def manual_sample(vae, x, seed):
    """``mu + sigma_b * eps`` written from the paper (Sec. 2.3): sigma_b ~ N(0, (C_sigma / 0.8)^2) per item."""
    g = torch.Generator().manual_seed(seed)
    mu = vae.encoder(x)
    sigma = (0.75 / 0.8) * torch.randn(mu.shape[0], generator=g)
    eps = torch.randn(mu.shape, generator=g)
    return mu + sigma[:, None, None, None] * eps


def family_for(tmp_path, **kw):
    vae = tiny_sigma_vae()
    vae.save_pretrained(tmp_path / "vae")
    config = LatentLMConfig(tokenizer=str(tmp_path / "vae"), dataset="shapes", dataset_size=24, latent_stats_batches=1,
                            hidden_size=32, depth=1, num_heads=4, head_width=32, head_depth=1, cpu=True, seed=3, **kw)
    config.validate()
    return LatentLMFamily(config)


@torch.no_grad()
def test_sigma_vae_encode_sample_is_mu_plus_sigma_eps():
    vae = tiny_sigma_vae()
    vae.register_to_config(shift_factor=0.3, scaling_factor=1.7)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    z = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(z, (manual_sample(vae, x, 5) - 0.3) * 1.7, atol=1e-6)
    assert torch.equal(vae.encode(x), vae.encode(x, sample=False))  # default: the mean, as before
    # one sigma per item: the per-item noise z - mu has a single scale across its elements
    noise = (z - vae.encode(x)) / 1.7
    assert noise.shape[0] == 3 and not torch.allclose(noise[0].std(), noise[1].std(), rtol=1e-2)


@torch.no_grad()
def test_latent_stats_come_from_samples_and_match_a_direct_computation(tmp_path):
    family = family_for(tmp_path)
    assert family.config.latent_sample  # the default
    family.data_info()
    images = torch.stack([family.raw_dataset()[i]["image"] for i in range(24)])  # latent_stats_batches=1: batch 64 > 24
    z = manual_sample(tiny_sigma_vae(), images, seed=3).double()  # the stats generator is seeded with --seed
    cfg = family.tokenizer.config
    assert abs(cfg.shift_factor - z.mean().item()) < 1e-6
    assert abs(cfg.scaling_factor - 1 / z.std(unbiased=False).item()) < 1e-5
    # the old behaviour: stats of the means, which are smaller in spread than the samples'
    old = family_for(tmp_path / "old", latent_sample=False)
    old.data_info()
    mu = tiny_sigma_vae().encoder(images).double()
    assert abs(old.tokenizer.config.scaling_factor - 1 / mu.std(unbiased=False).item()) < 1e-5
    assert old.tokenizer.config.scaling_factor > cfg.scaling_factor


@torch.no_grad()
def test_training_latents_are_posterior_samples_cached_or_not(tmp_path):
    family = family_for(tmp_path, cache_latents=False)
    model = family.build_model()
    images = torch.stack([family.raw_dataset()[i]["image"] for i in range(4)])
    cfg = family.tokenizer.config
    expected = (manual_sample(tiny_sigma_vae(), images, seed=11) - cfg.shift_factor) * cfg.scaling_factor
    tokens = family.encode_batch({"image": images}, model, torch.Generator().manual_seed(11))
    assert torch.allclose(tokens, model.latents_to_tokens(expected), atol=1e-5)
    # cached means + per-step noise give the same sample for the same generator state
    cached = sample_from_cached(family.tokenizer, family.tokenizer.encode(images), None, torch.Generator().manual_seed(11))
    assert torch.allclose(cached, expected, atol=1e-5)
    # fresh noise every step; without a generator (captioning) the mean
    again = family.encode_batch({"image": images}, model, torch.Generator().manual_seed(12))
    assert (again - tokens).abs().max() > 1e-2
    assert torch.equal(family.encode_batch({"image": images}, model), model.latents_to_tokens(family.tokenizer.encode(images)))


@torch.no_grad()
def test_no_latent_sample_keeps_the_mean_and_the_generator_untouched(tmp_path):
    family = family_for(tmp_path, latent_sample=False)
    model = family.build_model()
    item = family.build_dataset()[0]
    assert "latent_std" not in item
    g = torch.Generator().manual_seed(0)
    tokens = family.encode_batch({"latents": item["latents"][None]}, model, g)
    assert torch.equal(tokens, model.latents_to_tokens(item["latents"][None]))
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


@torch.no_grad()
def test_kl_posterior_cached_std_gives_mean_plus_std_eps(tmp_path):
    from genmod.tokenizers_vq.models import KLVAE

    torch.manual_seed(0)
    vae = KLVAE(modality="image", in_channels=3, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=4).eval()
    vae.register_to_config(scaling_factor=2.0, shift_factor=0.1)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, logvar = vae.posterior(x)
    std = vae.posterior_std(x)
    assert torch.allclose(std, (0.5 * logvar).exp() * 2.0)
    z = sample_from_cached(vae, vae.encode(x), std, torch.Generator().manual_seed(4))
    direct = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(z, direct, atol=1e-5)


@torch.no_grad()
def test_posterior_std_of_diffusers_autoencoder_kl_and_sigma_vae():
    """The diffusers wrapper's std is its latent distribution's std times scaling_factor; a sigma-VAE has none."""
    from genmod.tokenizers_vq.models import SigmaVAE
    from genmod.tokenizers_vq.models.autoencoder_kl import DiffusersAutoencoderKL

    torch.manual_seed(0)
    vae = DiffusersAutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                                 latent_channels=4, norm_num_groups=4, scaling_factor=0.5).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    dist = vae.encoder(x)
    logvar = vae.quant_conv(dist).chunk(2, dim=1)[1].clamp(-30.0, 20.0)
    assert torch.allclose(vae.posterior_std(x), (0.5 * logvar).exp() * 0.5, atol=1e-6)
    sigma_vae = SigmaVAE(modality="image", in_channels=3, base_channels=8, ch_mult=(1, 2), latent_channels=4)
    assert sigma_vae.posterior_std(x) is None
