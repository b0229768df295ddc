"""Flow log-likelihoods (exact and Hutchinson divergence), bits/dim, and the adaptive torchdiffeq solvers,
each against a closed form: the Gaussian mixture's log-density, a Gaussian's flow map and bits/dim."""

import math

import pytest
import torch

from genmod.flow.gmm import GaussianMixture, three_mode_mixture_2d
from genmod.samplers import get_time_grid, sample_ode
from genmod.samplers.adaptive import ADAPTIVE_METHODS, solve_adaptive
from genmod.samplers.likelihood import (bits_per_dim, dequantize, exact_divergence, hutchinson_divergence,
                                        image_bits_per_dim, log_likelihood)

MIXTURE = three_mode_mixture_2d()


def mixture_points(num=48, seed=1):
    return MIXTURE.sample(num, generator=torch.Generator().manual_seed(seed))


def test_exact_divergence_is_the_jacobian_trace_of_a_linear_field():
    """v(x) = A x has divergence tr A at every x (and Hutchinson's e^T A e averages to it)."""
    a = torch.tensor([[0.5, 2.0, 0.0], [-1.0, 1.5, 0.3], [0.2, 0.0, -3.0]], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    v, div = exact_divergence(lambda x, t: x @ a.T, x, torch.zeros(5))
    assert torch.allclose(v, x @ a.T) and torch.allclose(div, torch.full((5,), float(a.trace()), dtype=torch.float64))
    e = torch.randn(20000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).sign()
    _, est = hutchinson_divergence(lambda x, t: x @ a.T, torch.zeros(20000, 3, dtype=torch.float64), None, e)
    assert abs(est.mean().item() - a.trace().item()) < 4 * est.std().item() / math.sqrt(20000)


@pytest.mark.parametrize("method, options, tol", [("rk4", {"num_steps": 100}, 1e-5),
                                                  ("heun", {"num_steps": 400}, 1e-3),
                                                  ("dopri5", {"rtol": 1e-8, "atol": 1e-8}, 1e-5)])
def test_exact_likelihood_of_the_mixture_flow_equals_its_log_density(method, options, tol):
    x = mixture_points()
    result = log_likelihood(MIXTURE.velocity_fn(), x, method=method, **options)
    assert (result.log_prob - MIXTURE.log_prob(x)).abs().max().item() < tol
    assert torch.allclose(result.log_prob, result.prior_log_prob + result.divergence_integral)
    expected_nfe = {"rk4": 400, "heun": 800}.get(method)
    assert result.nfe == expected_nfe if expected_nfe else 50 < result.nfe < 1000


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased_within_three_standard_errors(probe):
    """256 probes per point in one batch; the same rk4 grid as the exact solve, so only the probe differs."""
    points, num_probes = mixture_points(6, seed=2), 256
    x = points.repeat_interleave(num_probes, dim=0)
    exact = log_likelihood(MIXTURE.velocity_fn(), points, method="rk4", num_steps=40).log_prob
    estimate = log_likelihood(MIXTURE.velocity_fn(), x, method="rk4", num_steps=40, divergence="hutchinson",
                              probe=probe, generator=torch.Generator().manual_seed(3)).log_prob
    estimate = estimate.reshape(len(points), num_probes)
    standard_error = estimate.std(dim=1) / math.sqrt(num_probes)
    assert (standard_error > 1e-4).all()  # a real estimator, not the exact trace
    assert ((estimate.mean(dim=1) - exact).abs() < 3 * standard_error).all()


def test_bits_per_dim_of_a_density_uniform_over_the_bins_is_eight():
    """A density (127.5/256)^D, uniform over the 256 bins of every pixel, puts 1/256 on each level: 8 bits."""
    dims = 12
    log_p = torch.tensor([dims * math.log(127.5 / 256)], dtype=torch.float64)
    assert abs(bits_per_dim(log_p, dims).item() - 8.0) < 1e-12
    pixels = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    x = dequantize(pixels.expand(10000, 3), torch.Generator().manual_seed(0))
    centres = pixels.double() / 127.5 - 1
    assert ((x - centres).abs() <= 0.5 / 127.5 + 1e-6).all()                  # each point inside its own bin
    assert ((x - centres).mean(0).abs() < 3 * (1 / 127.5) / math.sqrt(12 * 10000)).all()  # centred on it


def test_image_bits_per_dim_of_a_gaussian_model_equals_its_closed_form():
    """Model N(m, s^2 I) on 1x4x4 'images' with its exact flow: bits/dim = (-log N(x) + D log 127.5) / (D log 2)."""
    mean, std, dims = 0.1, 0.5, 16
    model = GaussianMixture([1.0], torch.full((1, dims), mean, dtype=torch.float64), [std**2])
    velocity = lambda x, t: model.velocity(x.flatten(1), t).reshape(x.shape)  # noqa: E731
    images = torch.randint(60, 200, (8, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bpd, result = image_bits_per_dim(velocity, images, torch.Generator().manual_seed(5), method="rk4", num_steps=60)
    x = dequantize(images, torch.Generator().manual_seed(5)).double().flatten(1)
    log_density = (-0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(1)
    expected = (-log_density + dims * math.log(127.5)) / (dims * math.log(2))
    assert torch.allclose(bpd.double(), expected, atol=1e-4), (bpd, expected)
    assert result.noise.shape == images.shape


def test_likelihood_argument_errors():
    x = mixture_points(2)
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(MIXTURE.velocity_fn(), x, divergence="trace")
    with pytest.raises(ValueError, match="probe"):
        log_likelihood(MIXTURE.velocity_fn(), x, divergence="hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="time_grid"):
        log_likelihood(MIXTURE.velocity_fn(), x, method="euler", time_grid=[1.0, 0.0])
    with pytest.raises(ValueError, match="images"):
        dequantize(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# adaptive solvers
# ---------------------------------------------------------------------------------------------
# a Gaussian target N(mu, diag(var)): the flow map is x_t = alpha mu + sqrt(alpha^2 var + sigma^2) z (closed form)
MU = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
VAR = torch.tensor([[0.3, 2.0]], dtype=torch.float64)
GAUSSIAN = GaussianMixture([1.0], MU, VAR)
Z = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_dopri5_reaches_the_mixture_flow_map_with_fewer_calls_than_heun():
    """Reference: rk4 with 1000 steps (error ~1e-11); dopri5 at rtol = atol = 1e-5 against Heun at equal error."""
    exact = sample_ode(MIXTURE.velocity_fn(), Z, get_time_grid("uniform", 1000), method="rk4")
    x, stats = sample_ode(MIXTURE.velocity_fn(), Z, [1.0, 0.0], method="dopri5", rtol=1e-5, atol=1e-5,
                          return_stats=True)
    error = (x - exact).norm(dim=1).mean().item()
    assert error < 5e-4 and 6 < stats.nfe < 200, (error, stats.nfe)
    # the fewest Heun steps (doubling) that reach the same error cost more calls
    steps = 4
    while (sample_ode(MIXTURE.velocity_fn(), Z, get_time_grid("uniform", steps), method="heun") - exact
           ).norm(dim=1).mean().item() > error:
        steps *= 2
    assert stats.nfe < 2 * steps, (stats.nfe, 2 * steps)


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_every_adaptive_method_meets_its_tolerance_and_calls_back_at_grid_times(method):
    seen = []
    grid = [1.0, 0.5, 0.0]
    x = sample_ode(GAUSSIAN.velocity_fn(), Z, grid, method=method, rtol=1e-6, atol=1e-6,
                   callback=lambda i, t, x: seen.append((i, t, x.clone())))
    assert (x - (MU + VAR.sqrt() * Z)).norm(dim=1).mean().item() < 1e-3
    assert [(i, t) for i, t, _ in seen] == [(0, 0.5), (1, 0.0)]
    alpha, sigma = 0.5, 0.5
    assert (seen[0][2] - (alpha * MU + (alpha**2 * VAR + sigma**2).sqrt() * Z)).abs().max().item() < 1e-3


def test_adaptive_errors():
    with pytest.raises(ValueError, match="rtol"):
        sample_ode(GAUSSIAN.velocity_fn(), Z, [1.0, 0.0], method="dopri5", rtol=0)
    with pytest.raises(ValueError, match="method"):
        solve_adaptive(GAUSSIAN.velocity_fn(), Z, [1.0, 0.0], method="dopri7")
    with pytest.raises(ValueError, match="time_grid"):
        sample_ode(GAUSSIAN.velocity_fn(), Z, [1.0, 0.0], method="dopri5", prediction="x0")
