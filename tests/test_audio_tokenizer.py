"""Audio tokenizer pieces: mu-law reference codecs, bitrate, energy-aware crops, the patchify level
(``full_rate_blocks=False``) and the audio evaluation with its baselines."""
import json
import math

import pytest
import torch

from genmod.evals.audio import (audio_baselines, mu_law_decode, mu_law_encode, reconstruction_scores, resampled_mu_law,
                         si_sdr)
from genmod.tokenizer import TokenizerConfig, TokenizerFamily, evaluate_tokenizer, token_rate
from genmod.tokenizers_vq.models import SigmaVAE, VQTokenizer
from genmod.tokenizers_vq.models.blocks import Decoder1d, Encoder1d, ResnetBlock


def _tone(freq, n=8000, sr=8000, amp=0.5):
    return amp * torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / sr).float()


def test_mu_law_known_codes_and_round_trip():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    codes = mu_law_encode(x, 8)
    # F(0.5) = ln(1 + 255 * 0.5) / ln(256); code = round((F + 1) / 2 * 255)
    f = math.log1p(127.5) / math.log(256)
    assert codes.tolist() == [0, 128, round((f + 1) / 2 * 255), 255]
    assert mu_law_decode(codes, 8)[[0, 3]].tolist() == pytest.approx([-1.0, 1.0])
    ramp = torch.linspace(-1, 1, 2001)
    err8 = (mu_law_decode(mu_law_encode(ramp, 8), 8) - ramp).abs()
    err4 = (mu_law_decode(mu_law_encode(ramp, 4), 4) - ramp).abs()
    # companding: fine steps near zero, coarse near full scale; fewer bits, larger error
    assert err8[990:1011].max() < 5e-4 and err8.max() < 0.03 and err4.max() > 5 * err8.max()
    with pytest.raises(ValueError, match="bits must be >= 1"):
        mu_law_encode(x, 0)


def test_resampled_mu_law_band_limits_and_bitrates():
    low, high = _tone(200, sr=8000), _tone(3000, sr=8000)
    # an 8-bit 8 kHz copy keeps a 200 Hz tone (mu-law SNR ~ 38 dB); a 2 kHz codec keeps 200 Hz, removes 3 kHz
    assert si_sdr(resampled_mu_law(low[None], 8000, 8000, 8), low[None]).item() > 30
    assert si_sdr(resampled_mu_law(low[None], 8000, 2000, 8), low[None]).item() > 25
    assert resampled_mu_law(high[None], 8000, 2000, 8)[0, 200:-200].pow(2).mean() < 1e-3 * high.pow(2).mean()
    out = audio_baselines(low[None], 8000)
    assert {k: v[1] for k, v in out.items()} == {"silence": 0, "mulaw4_4k": 16000, "mulaw4_2k": 8000,
                                                  "mulaw4_1k": 4000, "mulaw8_8k": 64000}  # 16 kHz codec skipped
    scores = reconstruction_scores(out["silence"][0], low[None], 8000)
    assert scores["si_sdr"] == [None] and scores["mr_stft_distance"][0] > 5
    with pytest.raises(ValueError, match="codec_rate=16000 must not exceed"):
        resampled_mu_law(low[None], 8000, 16000, 8)


def test_token_rate_of_residual_fsq_and_sigma_vae():
    model = VQTokenizer(modality="audio", in_channels=1, base_channels=4, strides=(2, 4), quantizer="rfsq",
                        num_quantizers=3, fsq_levels=(8, 5, 5, 5), latent_channels=8)
    rate = token_rate(model, 16000)
    assert rate["frames_per_second"] == 2000 and rate["bits_per_frame"] == pytest.approx(3 * math.log2(1000))
    assert rate["bitrate_bps"] == pytest.approx(2000 * 3 * math.log2(1000))
    vae = SigmaVAE(modality="audio", in_channels=1, base_channels=4, strides=(4, 5), latent_channels=6)
    assert token_rate(vae, 16000) == {"frames_per_second": 800.0, "latent_channels": 6, "floats_per_second": 4800.0}


def test_full_rate_blocks_off_removes_only_sample_rate_units():
    def blocks(m):
        return sum(isinstance(x, ResnetBlock) for x in m.modules())

    enc, dec = Encoder1d(1, 6, 4, (8, 5), full_rate_blocks=False), Decoder1d(6, 1, 4, (8, 5), full_rate_blocks=False)
    assert blocks(enc) == 3 and blocks(dec) == 3  # one level of (1, 3, 9) units each instead of two
    assert blocks(Encoder1d(1, 6, 4, (8, 5))) == 6
    z = enc(torch.randn(2, 1, 400))
    assert z.shape == (2, 6, 10) and dec(z).shape == (2, 1, 400)


def test_energy_aware_crop_finds_the_utterance():
    x = torch.zeros(4, 1, 16000)
    for i in range(4):
        x[i, 0, 3000 * i + 1000:3000 * i + 1800] = 0.5  # a short "word" at a different place per clip
    config = TokenizerConfig(modality="audio", audio_segment=2000, audio_crop_tries=32, num_preview=0)
    crops = TokenizerFamily(config).crop_audio(x, torch.Generator().manual_seed(0))
    assert crops.shape == (4, 1, 2000)
    assert all(c.abs().sum() > 0.5 * 800 * 0.5 for c in crops)  # most of each burst is in its crop
    plain = TokenizerFamily(TokenizerConfig(modality="audio", audio_segment=2000, num_preview=0))
    assert torch.equal(plain.crop_audio(x, None), x[..., :2000])  # no generator: the leading segment
    with pytest.raises(ValueError, match="audio_crop_tries"):
        TokenizerConfig(modality="audio", audio_crop_tries=0).validate()


class _VariableClips(torch.utils.data.Dataset):
    sample_rate = 8000

    def __init__(self):
        self.clips = [_tone(300 + 100 * i, n=2400 + 160 * (i % 3), sr=8000)[None] for i in range(5)]

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        return {"audio": self.clips[i], "label": 0}


def test_audio_evaluation_reports_bitrate_usage_and_baselines(tmp_path):
    torch.manual_seed(0)
    model = VQTokenizer(modality="audio", in_channels=1, base_channels=4, strides=(4, 4), quantizer="rfsq",
                        num_quantizers=2, fsq_levels=(5, 5, 5), latent_channels=8)
    metrics = evaluate_tokenizer(model, _VariableClips(), str(tmp_path), num_samples=5, num_show=3)
    assert metrics["seconds"] == pytest.approx(sum(2400 + 160 * (i % 3) for i in range(5)) / 8000)
    assert metrics["frames_per_second"] == 500 and metrics["bitrate_bps"] == pytest.approx(500 * 2 * math.log2(125))
    assert len(metrics["usage_per_codebook"]) == 2 and 0 < metrics["codebook_usage"] <= 1
    base = metrics["baselines"]
    assert base["silence"]["si_sdr"] is None
    # the ladder is ordered: more bits, closer to the input
    assert base["mulaw8_8k"]["si_sdr"] > base["mulaw4_4k"]["si_sdr"] > base["mulaw4_1k"]["si_sdr"]
    assert base["mulaw8_8k"]["mel_distance"] < base["silence"]["mel_distance"]
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == 5
    assert (tmp_path / "mel_spectrograms.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == [f"{k}_{i:02d}.wav" for k in ("input", "recon")
                                                               for i in range(3)]


def test_istft_head_inverts_a_true_spectrum_and_keeps_lengths():
    dec = Decoder1d(6, 1, 8, (8, 5, 4, 2), istft_levels=2)
    assert (dec.istft_hop, dec.n_fft, dec.up_strides) == (40, 160, (2, 4))  # the last levels (5, 8) -> hop 40
    assert dec(torch.randn(2, 6, 3)).shape == (2, 1, 960)
    # fed the log-magnitude and phase of a real STFT, the head returns that signal (up to the
    # replicated extra frame, which only touches the last hop + n_fft / 2 samples)
    x = torch.randn(1, 400, generator=torch.Generator().manual_seed(0))
    spec = torch.stft(x, 160, 40, 160, window=torch.hann_window(160), center=True, return_complex=True)
    head_in = torch.cat([spec.abs().clamp_min(1e-8).log(), spec.angle()], dim=1)[..., :10]
    assert (dec.istft(head_in)[0, 0, :300] - x[0, :300]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="istft_levels=4 must be in"):
        Decoder1d(6, 1, 8, (8, 5, 4, 2), istft_levels=4)
    model = VQTokenizer(modality="audio", in_channels=1, base_channels=4, strides=(4, 5, 4), quantizer="fsq",
                        fsq_levels=(5, 5), full_rate_blocks=False, istft_levels=1)
    assert model(torch.randn(2, 1, 320)).sample.shape == (2, 1, 320)
