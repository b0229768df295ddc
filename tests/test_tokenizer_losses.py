"""Tokenizer losses against known answers: hinge values, the VQGAN adaptive weight, spectral losses,
the mel filterbank, SI-SDR, feature matching and the family's in-loss discriminator step."""
import math

import pytest
import torch

from genmod.tokenizers_vq.losses import (MultiResolutionSTFTLoss, MultiScaleMelLoss, PatchDiscriminator, adaptive_gan_weight,
                                  feature_matching_loss, gan_factor, hinge_d_loss, hinge_g_loss, lsgan_d_loss,
                                  lsgan_g_loss, mel_filterbank, reconstruction_loss, si_sdr)



def test_hinge_and_lsgan_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # LSGAN: mean(fake^2) = 5/3, mean((1 - real)^2) = (1 + 0.25 + 4) / 3
    assert lsgan_d_loss(real, fake).item() == pytest.approx(5 / 3 + 5.25 / 3)
    assert lsgan_g_loss(fake).item() == pytest.approx((9 + 1 + 0) / 3)
    assert gan_factor(99, 100) == 0.0 and gan_factor(100, 100) == 1.0


def test_reconstruction_losses():
    x, y = torch.zeros(2, 3), torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(1.0)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx(14 / 6)
    with pytest.raises(ValueError, match="kind"):
        reconstruction_loss(x, y, "l3")


def test_adaptive_weight_is_ratio_of_gradient_norms():
    torch.manual_seed(0)
    weight = torch.randn(2, 3, requires_grad=True)
    x, target = torch.randn(3), torch.randn(2)
    out = weight @ x
    rec = (out - target).pow(2).sum()
    g = -(out * torch.tensor([1.0, 2.0])).sum()
    # analytic gradients: d rec / dW = 2 (Wx - t) x^T; d g / dW = -[1, 2]^T x^T
    grad_rec = 2 * torch.outer((weight @ x - target).detach(), x)
    grad_g = -torch.outer(torch.tensor([1.0, 2.0]), x)
    expected = grad_rec.norm() / (grad_g.norm() + 1e-4)
    lam = adaptive_gan_weight(rec, g, weight)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not lam.requires_grad
    # clamp at max_weight
    assert adaptive_gan_weight(rec * 1e9, g, weight, max_weight=10.0).item() == 10.0


def test_multi_resolution_stft_loss_zero_for_identical_and_grows_with_noise():
    torch.manual_seed(0)
    t = torch.arange(8000) / 16000
    x = (0.5 * torch.sin(2 * math.pi * 440 * t)).view(1, 1, -1)
    loss = MultiResolutionSTFTLoss()
    assert loss(x, x).item() == 0.0
    noise = torch.randn_like(x)
    values = [loss(x, x + a * noise).item() for a in (0.01, 0.05, 0.2)]
    assert 0 < values[0] < values[1] < values[2]
    mel = MultiScaleMelLoss(16000)
    assert mel(x, x).item() == 0.0
    mel_values = [mel(x, x + a * noise).item() for a in (0.01, 0.05, 0.2)]
    assert 0 < mel_values[0] < mel_values[1] < mel_values[2]


def test_mel_filterbank_matches_torchaudio():
    torchaudio = pytest.importorskip("torchaudio")
    reference = torchaudio.functional.melscale_fbanks(513, 0.0, 8000.0, 40, 16000)  # HTK, no norm
    torch.testing.assert_close(mel_filterbank(1024, 40, 16000), reference.T, atol=1e-6, rtol=1e-5)


def test_si_sdr_known_value_and_scale_invariance():
    torch.manual_seed(0)
    s = torch.randn(4000)
    s = s - s.mean()
    n = torch.randn(4000)
    n = n - n.mean()
    n = n - (n @ s) / (s @ s) * s  # orthogonal to s
    n = n * (s.norm() / n.norm()) * 0.1  # 20 dB below the signal
    assert si_sdr(s, s + n).item() == pytest.approx(20.0, abs=1e-3)
    assert si_sdr(s, 3.0 * (s + n)).item() == pytest.approx(20.0, abs=1e-3)


def test_feature_matching_is_mean_l1_over_layers():
    real = [(None, [torch.zeros(2, 3), torch.ones(4)])]
    fake = [(None, [torch.full((2, 3), 2.0), torch.zeros(4)])]
    assert feature_matching_loss(real, fake).item() == pytest.approx((2.0 + 1.0) / 2)


def test_patch_discriminator_outputs_patch_logits():
    disc = PatchDiscriminator(3, base_channels=8, num_layers=3)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2


def test_family_gan_step_updates_discriminator_and_uses_adaptive_weight():
    from genmod.tokenizer import TokenizerConfig, TokenizerFamily

    torch.manual_seed(0)
    config = TokenizerConfig(quantizer="fsq", fsq_levels=(5, 5, 5), base_channels=8, ch_mult=(1, 2),
                             gan_weight=0.5, gan_start=1, disc_channels=8, disc_layers=2, in_channels=3,
                             num_preview=0)
    family = TokenizerFamily(config)
    model = family.build_model()
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1}
    logs = family.loss(model, batch, torch.Generator().manual_seed(0))
    assert "d_loss" not in logs and family.discriminator is None  # before gan_start
    family.set_step(1)  # the trainer tells the family each optimizer step
    logs = family.loss(model, batch, torch.Generator().manual_seed(1))
    disc_before = {k: v.clone() for k, v in family.discriminator.state_dict().items()}
    logs = family.loss(model, batch, torch.Generator().manual_seed(2))
    changed = [k for k, v in family.discriminator.state_dict().items() if not torch.equal(v, disc_before[k])]
    assert any(k.endswith("weight") for k in changed)  # the discriminator took an optimizer step
    # the generator loss is rec + reg + gan_weight * lambda * g_loss with lambda the adaptive weight
    expected = logs["rec"] + logs["reg"] + 0.5 * logs["gan_adaptive_weight"] * logs["g_loss"]
    assert logs["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    logs["loss"].backward()
    assert model.decoder.conv_out.weight.grad is not None
    # discriminator state survives a state_dict round trip
    other = TokenizerFamily(config)
    other.load_state_dict(family.state_dict())
    for k, v in family.discriminator.state_dict().items():
        assert torch.equal(v, other.discriminator.state_dict()[k])
