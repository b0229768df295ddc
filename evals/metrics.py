"""Distribution metrics on features we already hold, and the thin wrapper around torch-fidelity.

torch-fidelity computes FID / IS / KID / improved precision-recall from inputs (datasets, folders,
generators) through a registered feature extractor; :func:`fidelity_metrics` is the one place that
calls it. What torch-fidelity does not have lives here, on plain ``(N, D)`` feature tensors:

* :func:`frechet_distance` - our own Frechet distance (for tests and for features in hand);
* :func:`p_precision_recall` - Park & Kim, ICCV 2023;
* :func:`density_coverage` - Naeem et al., ICML 2020;
* :func:`normalise_for_kid` - the feature scaling that keeps KID's cubic kernel well scaled.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Frechet distance


def gaussian_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of ``(N, D)`` features."""
    feats = torch.as_tensor(features).double()
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features: expected a (N>=2, D) array, got shape {tuple(feats.shape)}")
    mu = feats.mean(0)
    centred = feats - mu
    sigma = centred.T @ centred / (feats.shape[0] - 1)
    return mu.numpy(), sigma.numpy()


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID, Heusel
    et al. 2017, Sec. 3): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr (S1 S2)^(1/2)`` is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), which avoids a non-symmetric
    matrix square root and its complex round-off.
    """
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"statistics: shapes disagree (mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)}/{tuple(s2.shape)})")
    evals1, evecs1 = torch.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (evecs1 * evals1.clamp_min(0).sqrt()) @ evecs1.T
    middle = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two ``(N, D)`` feature sets (FID when the features
    are Inception pool3)."""
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


# ------------------------------------------------------------------------------------------------
# nearest-neighbour metrics


def _as_float(features, name: str) -> torch.Tensor:
    feats = torch.as_tensor(features).float()
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{name}: expected a (N>=2, D) feature array, got shape {tuple(feats.shape)}")
    return feats


def knn_radii(features: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Distance from each row to its k-th nearest neighbour in the same set, excluding itself."""
    if not 1 <= k < len(features):
        raise ValueError(f"k: need 1 <= k < number of samples ({len(features)}), got {k}")
    radii = []
    for start in range(0, len(features), chunk):
        dist = torch.cdist(features[start:start + chunk], features)
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # k + 1: the row itself is at distance 0
    return torch.cat(radii)


def _noisy_or_coverage(queries: torch.Tensor, centres: torch.Tensor, radius: float, chunk: int = 2048):
    """For each query, ``1 - prod_i (1 - max(0, 1 - |c_i - q| / R))`` summed in log space."""
    out = []
    for start in range(0, len(queries), chunk):
        dist = torch.cdist(queries[start:start + chunk], centres)
        membership = (1 - dist / radius).clamp(0, 1)
        log_miss = torch.log1p(-membership).sum(dim=1)  # -inf when a query sits on a centre: PSR = 1
        out.append(1 - log_miss.exp())
    return torch.cat(out)


def p_precision_recall(real_features, fake_features, k: int = 4, scale: float = 1.2) -> dict:
    """Probabilistic precision and recall (Park & Kim, ICCV 2023, Sec. 4).

    Every sample's support is a ball of one common radius per set, ``R = scale * mean_i NND_k``
    (Eq. for R_X / R_Y), with linear membership ``max(0, 1 - d / R)``; memberships combine as a
    noisy-OR (the probabilistic scoring rule, PSR). P-precision averages the PSR of fakes under the
    real supports; P-recall the PSR of reals under the fake supports. Defaults k=4, a=1.2 as in the
    paper's experiments.
    """
    real, fake = _as_float(real_features, "real_features"), _as_float(fake_features, "fake_features")
    radius_real = scale * knn_radii(real, k).mean().item()
    radius_fake = scale * knn_radii(fake, k).mean().item()
    precision = _noisy_or_coverage(fake, real, radius_real).mean().item()
    recall = _noisy_or_coverage(real, fake, radius_fake).mean().item()
    return {"p_precision": precision, "p_recall": recall}


def density_coverage(real_features, fake_features, k: int = 5, chunk: int = 2048) -> dict:
    """Density and coverage (Naeem et al., ICML 2020, Eqs. 3-4), with k-NN balls around real samples only.

    density = 1/(kM) sum_j sum_i 1[y_j in B(x_i, NND_k(x_i))]; coverage = 1/N sum_i 1[exists j: y_j in B(x_i, NND_k(x_i))].
    """
    real, fake = _as_float(real_features, "real_features"), _as_float(fake_features, "fake_features")
    radii = knn_radii(real, k)
    inside_count = torch.zeros(len(fake))
    covered = torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(fake), chunk):
        inside = torch.cdist(fake[start:start + chunk], real) <= radii[None, :]
        inside_count[start:start + chunk] = inside.sum(1).float()
        covered |= inside.any(0)
    return {"density": (inside_count.sum() / (k * len(fake))).item(), "coverage": covered.float().mean().item()}


def kid_scale(real_features) -> float:
    """The factor that makes ``E|f|^2 / D = 1`` on the real features.

    KID's polynomial kernel ``(x.y / D + 1)^3`` (Binkowski et al. 2018) is not scale free: on raw
    ReLU features with norms ~40 its subset spread is ~300x larger than on Inception-like magnitudes.
    """
    feats = torch.as_tensor(real_features).double()
    mean_sq = feats.pow(2).sum(1).mean() / feats.shape[1]
    return float(1.0 / mean_sq.sqrt().clamp_min(1e-12))


def normalise_for_kid(real_features, *others):
    """Scale the real set and any others by the one factor :func:`kid_scale` of the real set."""
    scale = kid_scale(real_features)
    return tuple(torch.as_tensor(f).float() * scale for f in (real_features, *others))


# ------------------------------------------------------------------------------------------------
# torch-fidelity


FIDELITY_KEYS = {
    "fid": ("frechet_inception_distance",),
    "isc": ("inception_score_mean", "inception_score_std"),
    "kid": ("kernel_inception_distance_mean", "kernel_inception_distance_std"),
    "prc": ("precision", "recall", "f_score"),
}


@contextlib.contextmanager
def weights_only_loads():
    """Make every ``torch.load`` inside the block weights-only.

    torch-fidelity 0.4.0 reads ``feature_extractor_weights_path`` and its cache files with
    ``weights_only=False`` (full pickle); torch's own switch turns that into the safe loader.
    """
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    # cached FID statistics are numpy arrays: allow numpy's array reconstruction and dtypes, nothing else
    numpy_globals = [np._core.multiarray._reconstruct, np.ndarray, np.dtype]
    numpy_globals += [t for t in vars(np.dtypes).values() if isinstance(t, type)]
    try:
        with torch.serialization.safe_globals(numpy_globals):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def fidelity_metrics(input1, input2=None, *, metrics=("fid", "kid", "prc"), feature_extractor: str,
                     cache_name2: str | None = None, cache_name1: str | None = None, kid_subset_size: int | None = None,
                     verbose: bool = False, **kwargs) -> dict:
    """``torch_fidelity.calculate_metrics`` with the package's settings.

    ``input1`` = generated, ``input2`` = real (torch-fidelity's convention: precision is the fraction
    of input1 on input2's manifold). ``cache_name2`` (``cache_name1``) caches input2's (input1's)
    features / FID statistics under ``$GENMOD_CACHE/fidelity_cache``. KID's subset size is clipped to the smaller set so small N works.
    """
    import torch_fidelity

    from genmod.evals.paths import fidelity_cache_dir
    from genmod.evals.generator_adapter import numpy2_compat

    unknown = [m for m in metrics if m not in FIDELITY_KEYS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; torch-fidelity metrics are {sorted(FIDELITY_KEYS)}")
    args = dict(
        input1=input1, input2=input2, cuda=torch.cuda.is_available(), feature_extractor=feature_extractor,
        isc="isc" in metrics, fid="fid" in metrics, kid="kid" in metrics, prc="prc" in metrics,
        verbose=verbose, save_cpu_ram=True, cache_root=fidelity_cache_dir(),
        cache=cache_name1 is not None or cache_name2 is not None,
    )
    if cache_name1 is not None:
        args["input1_cache_name"] = cache_name1
    if cache_name2 is not None:
        args["input2_cache_name"] = cache_name2
    if kid_subset_size is not None:
        args["kid_subset_size"] = kid_subset_size
    args.update(kwargs)
    with weights_only_loads(), numpy2_compat():
        return dict(torch_fidelity.calculate_metrics(**args))


def perceptual_path_length(model, num_samples: int, *, sample_similarity: str, epsilon: float = 1e-4,
                           discard_lower: float | None = 1, discard_higher: float | None = 99, **kwargs) -> dict:
    """Perceptual path length (Karras et al., StyleGAN, Sec. 3 / Appendix: ``E[d(G(z_t), G(z_t+eps)) / eps^2]``)
    through torch-fidelity, with the percentile trimming done here.

    torch-fidelity 0.4.0 trims with ``np.percentile(..., interpolation=...)``, a keyword numpy 2
    removed (TypeError). We ask it for the raw distances with trimming off and apply the same rule
    (keep ``lo <= d <= hi`` with lo the 'lower' and hi the 'higher' percentile) ourselves.
    """
    import torch_fidelity

    from genmod.evals.generator_adapter import numpy2_compat

    args = dict(input1=model, input1_model_num_samples=num_samples, ppl=True, ppl_reduction="none",
                ppl_epsilon=float(epsilon), ppl_sample_similarity=sample_similarity,
                ppl_discard_percentile_lower=None, ppl_discard_percentile_higher=None,
                cuda=torch.cuda.is_available(), verbose=False, save_cpu_ram=True)
    args.update(kwargs)
    with weights_only_loads(), numpy2_compat():
        raw = np.asarray(torch_fidelity.calculate_metrics(**args)["perceptual_path_length_raw"], dtype=np.float64)
    keep = np.ones(len(raw), dtype=bool)
    if discard_lower is not None:
        keep &= raw >= np.percentile(raw, discard_lower, method="lower")
    if discard_higher is not None:
        keep &= raw <= np.percentile(raw, discard_higher, method="higher")
    kept = raw[keep]
    return {"perceptual_path_length_mean": float(kept.mean()), "perceptual_path_length_std": float(kept.std()),
            "num_kept": int(keep.sum()), "raw": raw}
