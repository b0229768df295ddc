"""Tokenizer losses: reconstruction, LPIPS, PatchGAN + adaptive weight, audio spectral losses and discriminators."""
from .audio import (MultiBandSTFTDiscriminator, MultiPeriodDiscriminator, MultiResolutionSTFTLoss, MultiScaleMelLoss,
                    feature_matching_loss, mel_filterbank, si_sdr, stft_magnitude)
from .gan import (PatchDiscriminator, adaptive_gan_weight, gan_factor, hinge_d_loss, hinge_g_loss, lsgan_d_loss,
                  lsgan_g_loss)
from .perceptual import LPIPSUnavailableError, PerceptualLoss, build_lpips, lpips_available
from .reconstruction import reconstruction_loss

__all__ = [
    "reconstruction_loss", "PerceptualLoss", "build_lpips", "lpips_available", "LPIPSUnavailableError",
    "PatchDiscriminator", "hinge_d_loss", "hinge_g_loss", "lsgan_d_loss", "lsgan_g_loss", "adaptive_gan_weight",
    "gan_factor", "MultiScaleMelLoss", "MultiResolutionSTFTLoss", "MultiPeriodDiscriminator",
    "MultiBandSTFTDiscriminator", "feature_matching_loss", "si_sdr", "stft_magnitude", "mel_filterbank",
]
