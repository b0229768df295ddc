"""The closed-form Gaussian-mixture velocity, and every sampler reaching the mixture with it."""

import pytest
import torch

from genmod.flow.gmm import GaussianMixture, three_mode_mixture_2d
from genmod.core.paths import CosinePath, LinearPath, VPPath
from genmod.samplers import get_time_grid, sample_ode, sample_sde

MIXTURE = three_mode_mixture_2d()
NUM = 4000




def test_mixture_moments_and_density():
    x, components = MIXTURE.sample(50_000, torch.Generator().manual_seed(0), return_components=True)
    assert (x.mean(0) - MIXTURE.mean).abs().max() < 0.03
    assert (torch.cov(x.T) - MIXTURE.covariance).abs().max() < 0.06
    assert (torch.bincount(components) / 50_000 - MIXTURE.weights).abs().max() < 0.01
    # log_prob against a direct evaluation of the formula at a few points
    points = torch.tensor([[0.0, 0.0], [-2.0, 0.1], [1.0, 3.0]], dtype=torch.float64)
    direct = sum(
        w * torch.distributions.MultivariateNormal(m, c).log_prob(points).exp()
        for w, m, c in zip(MIXTURE.weights, MIXTURE.means, MIXTURE.covariances)
    ).log()
    torch.testing.assert_close(MIXTURE.log_prob(points), direct)


@pytest.mark.parametrize("path", [LinearPath(), CosinePath(), VPPath()], ids=["linear", "cosine", "vp"])
def test_oracle_velocity_solves_the_continuity_equation(path):
    """d/dt log p_t + v . grad log p_t + div v = 0 at random points and times (with per-sample t)."""
    gen = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(6, 2, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.1, 0.3, 0.45, 0.6, 0.8, 0.9], dtype=torch.float64)
    h = 1e-5
    dlogp_dt = torch.stack([
        (MIXTURE.marginal(ti + h, path).log_prob(xi[None]) - MIXTURE.marginal(ti - h, path).log_prob(xi[None]))[0] / (2 * h)
        for xi, ti in zip(x, t.tolist())
    ])
    xg = x.clone().requires_grad_(True)
    velocity = MIXTURE.velocity(xg, t, path)
    divergence = sum(torch.autograd.grad(velocity[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(2))
    score = MIXTURE.score(x, t, path)
    # score is the gradient of the marginal log-density
    for xi, ti, si in zip(x, t.tolist(), score):
        xr = xi[None].clone().requires_grad_(True)
        MIXTURE.marginal(ti, path).log_prob(xr).sum().backward()
        torch.testing.assert_close(xr.grad[0], si)
    residual = dlogp_dt + (velocity.detach() * score).sum(-1) + divergence
    assert residual.abs().max() < 1e-5, residual


def test_posterior_mean_limits():
    x = torch.randn(5, 2, dtype=torch.float64)
    x0_clean, _ = MIXTURE.posterior_expectations(x, 1e-9)
    torch.testing.assert_close(x0_clean, x, atol=1e-6, rtol=0)  # t -> 0: x_t is the data
    x0_noise, eps_noise = MIXTURE.posterior_expectations(x, 1.0)
    torch.testing.assert_close(x0_noise, MIXTURE.mean.expand(5, 2))  # t = 1: nothing is known
    torch.testing.assert_close(eps_noise, x)


_REFERENCES = {}


def _fine_reference(noise, path):
    """A 128-step RK4 solve of the same noise: the ODE's own endpoint, computed once per path."""
    if type(path).__name__ not in _REFERENCES:
        _REFERENCES[type(path).__name__] = sample_ode(MIXTURE.velocity_fn(path), noise, get_time_grid("uniform", 128), "rk4", path=path)
    return _REFERENCES[type(path).__name__]


def _assert_reaches_mixture(samples, label):
    mean_err = (samples.mean(0) - MIXTURE.mean).abs().max().item()
    cov_err = (torch.cov(samples.T) - MIXTURE.covariance).abs().max().item()
    weight_err = (MIXTURE.component_posteriors(samples).mean(0) - MIXTURE.weights).abs().max().item()
    # 4000 samples: standard errors ~0.03 (mean), ~0.05 (covariance), ~0.008 (weights); seeds are fixed
    print(f"{label}: mean {mean_err:.3f} cov {cov_err:.3f} weights {weight_err:.4f}")
    assert mean_err < 0.06 and cov_err < 0.15 and weight_err < 0.025, f"{label}: mean {mean_err:.3f} cov {cov_err:.3f} weights {weight_err:.3f}"


@pytest.mark.parametrize(
    "method,steps,path",
    [
        ("euler", 64, LinearPath()),
        ("midpoint", 16, LinearPath()),
        ("heun", 16, LinearPath()),
        ("rk4", 8, LinearPath()),
        ("dpm_solver_pp_2m", 16, LinearPath()),
        ("heun", 16, CosinePath()),
        ("dpm_solver_pp_2m", 16, VPPath()),
    ],
)
def test_every_ode_solver_reaches_the_mixture(method, steps, path):
    noise = torch.randn(NUM, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    samples = sample_ode(MIXTURE.velocity_fn(path), noise, get_time_grid("uniform", steps), method, path=path)
    _assert_reaches_mixture(samples, f"{method} on {path}")
    # and it lands where a fine RK4 solve of the same noise lands (the ODE's own endpoint)
    if not isinstance(path, VPPath):  # (the VP velocity is singular at t = 0, where RK4 evaluates it)
        endpoint_error = (samples - _fine_reference(noise, path)).norm(dim=-1).mean()
        assert endpoint_error < (0.1 if method == "euler" else 0.02), f"{method}: endpoint error {endpoint_error:.4f}"


def test_sde_reaches_the_mixture():
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(NUM, 2, dtype=torch.float64, generator=gen)
    samples = sample_sde(MIXTURE.velocity_fn(), noise, get_time_grid("uniform", 100), generator=gen)
    _assert_reaches_mixture(samples, "euler-maruyama")


def test_bad_mixture_arguments():
    with pytest.raises(ValueError, match="covariances"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0, -1.0], [[0.0], [1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="x_t"):
        MIXTURE.velocity(torch.zeros(3, 3), 0.5)
