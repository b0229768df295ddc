"""Solvers (orders of convergence, NFE), time grids, CFG, logits sampling and the SDE sampler."""

import math

import numpy as np
import pytest
import torch

from genmod.flow.gmm import GaussianMixture
from genmod.core.paths import CosinePath, LinearPath, VPPath
from genmod.samplers import (
    NFECounter,
    classifier_free_guidance,
    filter_logits,
    get_time_grid,
    heun,
    karras_grid,
    nfe_per_solve,
    register_time_grid,
    sample_logits,
    sample_ode,
    sample_sde,
    shifted_grid,
    uniform_grid,
)
from genmod.samplers.time_grids import TIME_GRIDS





# A Gaussian target N(mu, diag(var)): each coordinate is a 1-D problem, so the flow map is the quantile
# map x_t = alpha mu + sqrt(alpha^2 var + sigma^2) z, known in closed form at every t.
MU = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
VAR = torch.tensor([[0.3, 2.0]], dtype=torch.float64)
GAUSSIAN = GaussianMixture([1.0], MU, VAR)
Z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def exact_flow(path, t):
    t = torch.tensor(float(t), dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    return a * MU + (a**2 * VAR + s**2).sqrt() * Z


def log_snr_uniform_grid(path, n, t_start=0.95, t_end=0.02):
    """Steps uniform in lambda = log(alpha/sigma), the variable DPM-Solver++'s order analysis uses."""
    ends = path.half_log_snr(torch.tensor([t_start, t_end], dtype=torch.float64))
    return path.t_from_log_snr(2 * torch.linspace(ends[0], ends[1], n + 1, dtype=torch.float64))


def observed_order(method, path, steps):
    errors = []
    for n in steps:
        grid = log_snr_uniform_grid(path, n)
        x = sample_ode(GAUSSIAN.velocity_fn(path), exact_flow(path, grid[0]), grid, method, path=path)
        errors.append((x - exact_flow(path, grid[-1])).abs().max().item())
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize(
    "method,order,path",
    [
        ("euler", 1, CosinePath()),
        ("midpoint", 2, CosinePath()),
        ("heun", 2, CosinePath()),
        ("rk4", 4, CosinePath()),
        ("dpm_solver_pp_2m", 2, CosinePath()),
        ("dpm_solver_pp_2m", 2, LinearPath()),
        ("heun", 2, VPPath()),
    ],
)
def test_order_of_convergence(method, order, path):
    measured = observed_order(method, path, [16, 32, 64])
    assert order - 0.25 < measured < order + 0.35, f"{method} on {path}: order {measured:.2f}, expected {order}"


def test_full_solve_from_noise_reaches_exact_endpoint_and_counts_nfe():
    """From t = 1 (pure noise) to t = 0 on the linear path, for every solver, with the NFE each costs."""
    exact = MU + VAR.sqrt() * Z
    tolerances = {"euler": 0.2, "midpoint": 2e-3, "heun": 5e-3, "rk4": 1e-4, "dpm_solver_pp_2m": 3e-2}
    for method, tol in tolerances.items():
        x, stats = sample_ode(GAUSSIAN.velocity_fn(), Z, uniform_grid(32), method, return_stats=True)
        assert (x - exact).abs().max() < tol, method
        assert stats.nfe == nfe_per_solve(method, 32)
    assert nfe_per_solve("heun", 32) == 64 and nfe_per_solve("heun", 32, heun_final_euler=True) == 63
    assert nfe_per_solve("rk4", 8) == 32
    # where the velocity is singular at t = 0 (VP) the step onto 0 is one call: the jump to the x0 prediction
    vp = VPPath()
    x_start = exact_flow(vp, 1.0)
    for method in ("midpoint", "heun", "rk4"):  # (sigma^2 ~ t near 0 on VP: the Karras grid resolves it)
        x, stats = sample_ode(GAUSSIAN.velocity_fn(vp), x_start, karras_grid(32, path=vp), method, path=vp, return_stats=True)
        assert stats.nfe == nfe_per_solve(method, 32, path=vp) and torch.isfinite(x).all()
        assert (x - exact_flow(vp, 0.0)).abs().max() < 1e-2, method
    x_full = sample_ode(GAUSSIAN.velocity_fn(), Z, uniform_grid(8), "heun")
    x_last_euler = heun(GAUSSIAN.velocity_fn(), Z, uniform_grid(8), final_euler=True)
    assert (x_full - exact).abs().max() < (x_last_euler - exact).abs().max()
    # the callback sees every step's time and state
    seen = []
    sample_ode(GAUSSIAN.velocity_fn(), Z, uniform_grid(4), "euler", callback=lambda i, t, x: seen.append((i, t)))
    assert seen == [(0, 0.75), (1, 0.5), (2, 0.25), (3, 0.0)]
    with pytest.raises(ValueError, match="method"):
        sample_ode(GAUSSIAN.velocity_fn(), Z, uniform_grid(4), "dopri7")  # (dopri5 is adaptive, through torchdiffeq)
    with pytest.raises(ValueError, match="time_grid"):
        sample_ode(GAUSSIAN.velocity_fn(), Z, [1.0, 0.5, 0.7, 0.0], "euler")


def test_integrating_forward_inverts_the_flow():
    """A 0 -> 1 grid runs the ODE backwards: RK4 maps data to its noise and back."""
    x0 = MU + VAR.sqrt() * Z
    noise = sample_ode(GAUSSIAN.velocity_fn(), x0, uniform_grid(32).flip(0), "rk4")
    torch.testing.assert_close(noise, Z, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# time grids
# ------------------------------------------------------------------------------------------------
def test_time_grids():
    for name in ("uniform", "shifted", "karras", "cosine"):
        grid = get_time_grid(name, 10)
        assert grid.shape == (11,) and grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all(), name
    # shifted == diffusers' FlowMatchEulerDiscreteScheduler(shift) grid for the same sigmas
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=np.linspace(1, 1 / 8, 8))
    torch.testing.assert_close(shifted_grid(8, 3.0).float(), reference.sigmas.float())
    # karras: interior points are EDM's rho = 7 sigmas, t = sigma / (1 + sigma) on the linear path
    grid = karras_grid(6, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    ramp = torch.linspace(0, 1, 6, dtype=torch.float64)
    edm = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(grid[1:-1] / (1 - grid[1:-1]), edm[1:])
    # on the VP path the same sigmas sit at equal SNR: alpha/sigma = 1/sigma_edm
    vp = VPPath()
    vp_grid = karras_grid(6, path=vp)
    torch.testing.assert_close(vp.sigma(vp_grid[1:-1]) / vp.alpha(vp_grid[1:-1]), edm[1:])
    # cosine grid on the cosine path is uniform
    torch.testing.assert_close(get_time_grid("cosine", 8, path=CosinePath()), uniform_grid(8))

    @register_time_grid("test_two_stage")
    def two_stage(num_steps):
        return torch.cat([torch.linspace(1, 0.5, num_steps // 2 + 1)[:-1], torch.linspace(0.5, 0, num_steps - num_steps // 2 + 1)])

    try:
        assert get_time_grid("test_two_stage", 4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    finally:
        TIME_GRIDS.pop("test_two_stage")
    assert get_time_grid([1.0, 0.3, 0.0]).tolist() == [1.0, 0.3, 0.0]
    for bad, message in (([1.0, 0.5, 0.6, 0.0], "decreasing"), ([1.5, 0.0], r"\[0, 1\]"), ([1.0], "at least 2")):
        with pytest.raises(ValueError, match=message):
            get_time_grid(bad)
    with pytest.raises(ValueError, match="time grid"):
        get_time_grid("ays", 10)


# ------------------------------------------------------------------------------------------------
# classifier-free guidance
# ------------------------------------------------------------------------------------------------
class CountingModel:
    """``pred = x * (1 + cond) + t``: conditional and null predictions differ through ``cond``."""

    def __init__(self):
        self.calls, self.batch_sizes = 0, []

    def __call__(self, x, t, cond):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        return x * (1 + cond.view(-1, 1)) + t.view(-1, 1)


def test_classifier_free_guidance():
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    cond = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    null = torch.zeros(1, dtype=torch.float64)  # batch-1 null is broadcast
    model = CountingModel()
    pred_c, pred_u = model(x, t, cond), model(x, t, null.expand(4))
    for w, expected in ((1.0, pred_c), (0.0, pred_u), (3.5, pred_u + 3.5 * (pred_c - pred_u))):
        model = CountingModel()
        torch.testing.assert_close(classifier_free_guidance(model, cond, null, w)(x, t), expected)
        assert model.calls == 1  # one batched forward (cond and null together when guided)
        assert model.batch_sizes == ([4] if w == 1.0 else [8])

    # guidance interval: guided inside [0.3, 0.7], plain conditional outside, per sample
    model = CountingModel()
    guided = classifier_free_guidance(model, cond, null, 3.0, guidance_interval=(0.3, 0.7))
    t_mixed = torch.tensor([0.1, 0.5, 0.7, 0.9], dtype=torch.float64)
    out = guided(x, t_mixed)
    pc, pu = model(x, t_mixed, cond), model(x, t_mixed, null.expand(4))
    expected = torch.where(torch.tensor([False, True, True, False])[:, None], pu + 3.0 * (pc - pu), pc)
    torch.testing.assert_close(out, expected)
    model = CountingModel()
    guided = classifier_free_guidance(model, cond, null, 3.0, guidance_interval=(0.3, 0.7))
    torch.testing.assert_close(guided(x, torch.full((4,), 0.9, dtype=torch.float64)), model(x, torch.full((4,), 0.9, dtype=torch.float64), cond))
    assert model.batch_sizes == [4, 4]  # outside the interval only the conditional half runs

    # dict conditions and per-token times [B, T] with predictions [B, T, D]
    def token_model(x, t, c):
        return x * c["scale"].view(-1, 1, 1) + t[..., None]

    xt = torch.randn(2, 5, 3)
    tt = torch.rand(2, 5)
    fn = classifier_free_guidance(token_model, {"scale": torch.tensor([2.0, 3.0])}, {"scale": torch.tensor([1.0, 1.0])}, 2.0)
    torch.testing.assert_close(fn(xt, tt), xt + 2.0 * (xt * torch.tensor([2.0, 3.0]).view(-1, 1, 1) - xt) + tt[..., None])
    with pytest.raises(ValueError, match="guidance_interval"):
        classifier_free_guidance(model, cond, null, 2.0, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="null_cond"):
        classifier_free_guidance(model, cond, {"a": null}, 2.0)


# ------------------------------------------------------------------------------------------------
# logits sampling
# ------------------------------------------------------------------------------------------------
def test_top_k_top_p_support_and_frequencies():
    probs = torch.tensor([0.05, 0.40, 0.02, 0.25, 0.18, 0.10])
    logits = probs.log()
    draws = 40_000
    batch = logits.expand(draws, -1)

    def frequencies(ids):
        return torch.bincount(ids, minlength=6).double() / ids.numel()

    def expected_after(mask, temperature=1.0):
        p = probs.double() ** (1 / temperature) * mask
        return p / p.sum()

    tolerance = 4 * math.sqrt(0.25 / draws)  # 4 standard deviations of a frequency
    cases = [
        (dict(top_k=2), torch.tensor([0, 1, 0, 1, 0, 0.0])),
        # nucleus at 0.8: 0.40 + 0.25 = 0.65 < 0.8, adding 0.18 crosses it -> 3 tokens
        (dict(top_p=0.8), torch.tensor([0, 1, 0, 1, 1, 0.0])),
        (dict(top_k=4, top_p=0.6), torch.tensor([0, 1, 0, 1, 0, 0.0])),
        (dict(), torch.ones(6)),
    ]
    for kwargs, allowed in cases:
        ids = sample_logits(batch, generator=torch.Generator().manual_seed(0), **kwargs)
        assert ids.shape == (draws,)
        assert allowed[ids].all(), f"{kwargs}: sampled outside the allowed set"
        assert (frequencies(ids) - expected_after(allowed)).abs().max() < tolerance, kwargs
    ids = sample_logits(batch, temperature=0.5, generator=torch.Generator().manual_seed(1))
    assert (frequencies(ids) - expected_after(torch.ones(6), 0.5)).abs().max() < tolerance
    # greedy / temperature 0; [B, T, V] logits; seeded reproducibility
    many = torch.randn(3, 7, 11)
    assert torch.equal(sample_logits(many, greedy=True), many.argmax(-1))
    assert torch.equal(sample_logits(many, temperature=0.0), many.argmax(-1))
    a = sample_logits(many, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = sample_logits(many, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 7) and torch.equal(a, b)
    assert torch.isinf(filter_logits(logits, top_p=1e-6)).sum() == 5  # the top token always survives
    for kwargs, message in ((dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature")):
        with pytest.raises(ValueError, match=message):
            sample_logits(logits, **kwargs)


# ------------------------------------------------------------------------------------------------
# SDE
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,diffusion,grid", [
    (LinearPath(), "sigma", uniform_grid(150)),
    (VPPath(), "path", uniform_grid(150)),
    (CosinePath(), "constant", uniform_grid(150, t_max=0.999)),
])
def test_sde_reaches_gaussian_target(path, diffusion, grid):
    gen = torch.Generator().manual_seed(0)
    n = 6000
    mu, var = torch.tensor([1.5, -1.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    target = GaussianMixture([1.0], mu[None], var[None])
    t0 = torch.tensor(float(grid[0]), dtype=torch.float64)
    a0, s0 = path.alpha(t0), path.sigma(t0)
    x_init = a0 * mu + (a0**2 * var + s0**2).sqrt() * torch.randn(n, 2, dtype=torch.float64, generator=gen)
    x, stats = sample_sde(target.velocity_fn(path), x_init, grid, path=path, diffusion=diffusion, generator=gen, return_stats=True)
    assert stats.nfe == len(grid) - 1
    assert (x.mean(0) - mu).abs().max() < 4 * (var.max() / n) ** 0.5 + 0.02
    assert ((x.var(0) - var).abs() / var).max() < 0.08
    # seeded: the same generator state gives the same samples; noise actually enters
    again = sample_sde(target.velocity_fn(path), x_init, grid, path=path, diffusion=diffusion, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(again, x)
    ode = sample_ode(target.velocity_fn(path), x_init, grid, "euler", path=path)
    quiet = sample_sde(target.velocity_fn(path), x_init, grid, path=path, noise_scale=0.0)
    torch.testing.assert_close(quiet, ode)  # noise_scale 0 is the Euler ODE solver


def test_sde_errors():
    grid = uniform_grid(4)
    with pytest.raises(ValueError, match="diffusion"):
        sample_sde(GAUSSIAN.velocity_fn(), Z, grid, diffusion="brownian")
    with pytest.raises(ValueError, match="infinite"):
        sample_sde(GAUSSIAN.velocity_fn(), Z, grid, diffusion="path")  # linear path: alpha(1) = 0
    counter = NFECounter(GAUSSIAN.velocity_fn())
    sample_sde(counter, Z, grid, generator=torch.Generator().manual_seed(0))
    assert counter.nfe == 4
