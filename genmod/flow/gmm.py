"""A Gaussian-mixture target with the closed-form marginal velocity of any affine path.

If ``x0 ~ sum_k pi_k N(mu_k, S_k)`` and ``x_t = a x0 + s eps`` (``a = alpha(t)``, ``s = sigma(t)``), then
``p_t = sum_k pi_k N(a mu_k, C_k)`` with ``C_k = a^2 S_k + s^2 I``. Per component the pair (x0, eps) is
jointly Gaussian with x_t, so

    E[x0  | x_t, k] = mu_k + a S_k C_k^{-1} (x_t - a mu_k),     E[eps | x_t, k] = s C_k^{-1} (x_t - a mu_k),

and with the posterior responsibilities ``r_k(x_t) ∝ pi_k N(x_t; a mu_k, C_k)`` the marginal velocity
(Lipman et al. 2023, Thm. 1: the conditional-expectation of the conditional velocity) is

    v(x_t, t) = a' E[x0 | x_t] + s' E[eps | x_t].

This oracle is what the solver tests, the solver benchmark and the flow family's correctness test
integrate. Computation is in float64; results come back in the input's dtype.
"""

from __future__ import annotations

import math

import torch

from genmod.core.paths import AffinePath, LinearPath


class GaussianMixture:
    """``sum_k weights[k] N(means[k], covariances[k])`` in d dimensions.

    Args:
        weights: ``[K]`` non-negative, normalised here.
        means: ``[K, d]``.
        covariances: ``[K, d, d]`` symmetric positive definite, or ``[K, d]`` diagonals, or ``[K]`` isotropic variances.
    """

    def __init__(self, weights, means, covariances):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means: expected shape [K, d], got {tuple(means.shape)}")
        num_components, dim = means.shape
        if weights.shape != (num_components,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights: expected {num_components} non-negative values with a positive sum, got {weights.tolist()}")
        if covariances.shape == (num_components,):
            covariances = covariances[:, None, None] * torch.eye(dim, dtype=torch.float64)
        elif covariances.shape == (num_components, dim):
            covariances = torch.diag_embed(covariances)
        if covariances.shape != (num_components, dim, dim):
            raise ValueError(f"covariances: expected shape [K, d, d], [K, d] or [K] with K={num_components}, d={dim}, got {tuple(covariances.shape)}")
        if not torch.allclose(covariances, covariances.transpose(-1, -2)):
            raise ValueError("covariances: must be symmetric")
        try:
            self._chol = torch.linalg.cholesky(covariances)
        except torch.linalg.LinAlgError as err:
            raise ValueError("covariances: must be positive definite") from err
        self.weights = weights / weights.sum()
        self.means, self.covariances = means, covariances
        self.num_components, self.dim = num_components, dim

    # -- data-space statistics ---------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """Mixture mean ``sum_k pi_k mu_k``."""
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """Mixture covariance ``sum_k pi_k (S_k + mu_k mu_k^T) - m m^T``."""
        second = torch.einsum("k,kij->ij", self.weights, self.covariances + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(self.mean, self.mean)

    def sample(self, num: int, generator: torch.Generator | None = None, return_components: bool = False):
        """``num`` samples ``[num, d]`` (float64), optionally with the component index of each."""
        components = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        z = torch.randn(num, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[components] + torch.einsum("nij,nj->ni", self._chol[components], z)
        return (x, components) if return_components else x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` for ``x`` of shape ``[N, d]``."""
        log_normals, _ = _gaussian_terms(x.to(torch.float64), self.means, self.covariances)
        return torch.logsumexp(log_normals + self.weights.log(), dim=-1)

    def component_posteriors(self, x: torch.Tensor) -> torch.Tensor:
        """Responsibilities ``p(k | x)``, ``[N, K]``; used to read mode weights off samples."""
        log_normals, _ = _gaussian_terms(x.to(torch.float64), self.means, self.covariances)
        return torch.softmax(log_normals + self.weights.log(), dim=-1)

    # -- path marginals ----------------------------------------------------------------------
    def marginal(self, t: float, path: AffinePath | None = None) -> "GaussianMixture":
        """``p_t`` under ``path`` at a scalar time ``t``: means ``a mu_k``, covariances ``a^2 S_k + s^2 I``."""
        path = path or LinearPath()
        tt = torch.tensor(float(t), dtype=torch.float64)
        a, s = path.alpha(tt), path.sigma(tt)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, a * self.means, a**2 * self.covariances + s**2 * eye)

    def posterior_expectations(self, x_t: torch.Tensor, t, path: AffinePath | None = None):
        """``(E[x0 | x_t], E[eps | x_t])`` for ``x_t`` of shape ``[N, d]`` and ``t`` scalar or ``[N]``."""
        path = path or LinearPath()
        if x_t.ndim != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t: expected shape [N, {self.dim}], got {tuple(x_t.shape)}")
        x = x_t.to(device=self.means.device, dtype=torch.float64)  # the oracle lives on the CPU in float64
        t = torch.as_tensor(t, dtype=torch.float64).to(x.device).expand(x.shape[0])
        eye = torch.eye(self.dim, dtype=torch.float64)
        if (t == t[0]).all():  # one time for the whole batch (the solvers' case): K factorisations, not N K
            t = t[:1]
        a, s = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]  # [N or 1, 1, 1]
        cov_t = a[..., None] ** 2 * self.covariances + s[..., None] ** 2 * eye  # [N or 1, K, d, d]
        means_t = a * self.means  # [N or 1, K, d]
        log_normals, precision_residual = _gaussian_terms(x, means_t, cov_t)  # C_k^{-1} (x - a mu_k)
        resp = torch.softmax(log_normals + self.weights.log(), dim=-1)  # [N, K]
        x0_k = self.means + a * torch.einsum("kij,nkj->nki", self.covariances, precision_residual)
        eps_k = s * precision_residual
        x0 = torch.einsum("nk,nkd->nd", resp, x0_k)
        eps = torch.einsum("nk,nkd->nd", resp, eps_k)
        return x0.to(x_t), eps.to(x_t)

    def velocity(self, x_t: torch.Tensor, t, path: AffinePath | None = None) -> torch.Tensor:
        """The exact marginal velocity ``alpha' E[x0|x_t] + sigma' E[eps|x_t]``."""
        path = path or LinearPath()
        x0, eps = self.posterior_expectations(x_t.to(self.means.device), t, path)
        t = torch.as_tensor(t, dtype=torch.float64).to(self.means.device).expand(x_t.shape[0])
        da, ds = path.d_alpha(t)[:, None], path.d_sigma(t)[:, None]
        return (da * x0.double() + ds * eps.double()).to(x_t)

    def velocity_fn(self, path: AffinePath | None = None):
        """A ``velocity_fn(x, t)`` closure for the solvers in ``samplers``."""
        path = path or LinearPath()
        return lambda x, t: self.velocity(x, t, path)

    def score(self, x_t: torch.Tensor, t, path: AffinePath | None = None) -> torch.Tensor:
        """``grad log p_t(x_t) = -E[eps | x_t] / sigma(t)``."""
        path = path or LinearPath()
        _, eps = self.posterior_expectations(x_t.to(self.means.device), t, path)
        t = torch.as_tensor(t, dtype=torch.float64).to(self.means.device).expand(x_t.shape[0])
        return (-eps.double() / path.sigma(t)[:, None]).to(x_t)

    def __repr__(self):
        return f"GaussianMixture(K={self.num_components}, d={self.dim})"


def _gaussian_terms(x: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor):
    """``log N(x_n; m_k, C_k)`` ``[N, K]`` and ``C_k^{-1} (x_n - m_k)`` ``[N, K, d]``.

    ``means`` is ``[K, d]`` or ``[N or 1, K, d]``, ``covariances`` ``[K, d, d]`` or ``[N or 1, K, d, d]``.
    """
    chol = torch.linalg.cholesky(covariances)
    precision = torch.cholesky_inverse(chol)
    diff = x[:, None, :] - means  # [N, K, d]
    precision_diff = torch.matmul(precision, diff[..., None])[..., 0]
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_normals = -0.5 * (diff * precision_diff).sum(-1) - 0.5 * log_det - 0.5 * x.shape[-1] * math.log(2 * math.pi)
    return log_normals, precision_diff


def three_mode_mixture_2d() -> GaussianMixture:
    """The 2-D, 3-mode mixture used by the tests and the solver benchmark (unequal weights, anisotropic)."""
    return GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
        covariances=[[[0.30, 0.10], [0.10, 0.20]], [[0.10, 0.0], [0.0, 0.40]], [[0.25, -0.08], [-0.08, 0.15]]],
    )
