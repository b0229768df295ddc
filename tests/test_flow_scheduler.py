"""The pipeline scheduler: bit-identical to diffusers' Euler, and each solver has its order."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genmod.flow.scheduler import FlowMatchSolverScheduler

DATA_MEAN, DATA_STD = 0.7, 0.3


def gaussian_velocity(x, sigma):
    """Exact marginal velocity of the linear path for data N(m, s^2): the flow map is affine in x."""
    mean = (1 - sigma) * DATA_MEAN
    std = torch.sqrt((1 - sigma) ** 2 * DATA_STD**2 + sigma**2)
    d_mean = -DATA_MEAN
    d_std = ((sigma - 1) * DATA_STD**2 + sigma) / std
    return d_mean + d_std / std * (x - mean)


def run(scheduler, num_steps, x, sigmas=None):
    scheduler.set_timesteps(num_steps, sigmas=sigmas)
    for t in scheduler.timesteps:
        v = gaussian_velocity(x, t / 1000.0)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def test_euler_is_bit_identical_to_diffusers_flow_match_euler():
    ours = FlowMatchSolverScheduler(shift=3.0, solver="euler")
    theirs = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    x = torch.randn(64, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    sigmas = list(np.linspace(1.0, 1.0 / 12, 12))
    a = run(ours, 12, x.clone(), sigmas)
    b = run(theirs, 12, x.clone(), sigmas)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)
    assert torch.equal(a, b)


def _errors(solver, steps):
    x1 = torch.linspace(-2.5, 2.5, 101, dtype=torch.float64)
    exact = DATA_MEAN + DATA_STD * x1  # where the ODE started at sigma=1 from x1 ends at sigma=0
    return [(run(FlowMatchSolverScheduler(solver=solver), n, x1.clone()) - exact).abs().max().item() for n in steps]


@pytest.mark.parametrize("solver,order,steps", [("euler", 1, [8, 16, 32, 64]), ("midpoint", 2, [8, 16, 32, 64]),
                                                ("heun", 2, [8, 16, 32, 64]), ("rk4", 4, [4, 8, 16])])
def test_runge_kutta_order_of_convergence(solver, order, steps):
    errors = _errors(solver, steps)
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    # midpoint is super-convergent on this affine flow; the order is at least the nominal one
    assert order - 0.3 < slope < order + 1.6, (solver, errors, slope)


def test_dpm_solver_pp_2m_beats_euler_at_equal_nfe():
    # On a grid uniform in t the log-SNR steps near t=0 do not shrink, so 2M is not cleanly order 2
    # there; it is still far more accurate per network call than Euler.
    steps = [8, 16, 32, 64]
    dpm, euler = _errors("dpmsolver++2m", steps), _errors("euler", steps)
    assert dpm[0] < euler[0] and all(d < e / 4 for d, e in zip(dpm[1:], euler[1:])), (dpm, euler)
    assert dpm[-1] < 5e-3


def test_stage_timesteps_and_errors():
    sched = FlowMatchSolverScheduler(solver="rk4")
    sched.set_timesteps(5)
    assert len(sched.timesteps) == 20 and math.isclose(float(sched.timesteps[0]), 1000.0)
    with pytest.raises(ValueError, match="solver"):
        FlowMatchSolverScheduler(solver="dopri")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        FlowMatchSolverScheduler().step(torch.zeros(1), 0, torch.zeros(1))


@pytest.mark.parametrize("solver,method", [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun"),
                                           ("rk4", "rk4"), ("dpmsolver++2m", "dpm_solver_pp_2m")])
def test_scheduler_steps_equal_the_network_agnostic_solver(solver, method):
    """The step-by-step scheduler and genmod.samplers.sample_ode are one method, not two."""
    from genmod.samplers import get_time_grid, sample_ode

    x1 = torch.linspace(-2.5, 2.5, 101, dtype=torch.float32)
    stepped = run(FlowMatchSolverScheduler(solver=solver), 7, x1.clone())
    integrated = sample_ode(gaussian_velocity, x1.clone(), get_time_grid("uniform", 7), method=method)
    torch.testing.assert_close(stepped, integrated.float(), atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# one stepper, two drivers: every solver x path x prediction type on the exact Gaussian-mixture oracle
# ------------------------------------------------------------------------------------------------
from genmod.core.paths import get_path  # noqa: E402
from genmod.flow.gmm import three_mode_mixture_2d  # noqa: E402
from genmod.samplers import nfe_per_solve, sample_ode  # noqa: E402

MIXTURE = three_mode_mixture_2d()


def oracle(path, prediction):
    """The exact network of each prediction type: velocity, E[x0 | x_t] or E[eps | x_t].

    Like a real network it sees the float32 ``timestep = 1000 t`` (epsilon near alpha = 0 amplifies the
    rounding ~1000x), so both drivers hand it the same rounded time.
    """
    def model_fn(x, t):
        t = (1000 * torch.as_tensor(t)).float().double() / 1000
        if prediction == "velocity":
            return MIXTURE.velocity(x, t, path)
        x0, eps = MIXTURE.posterior_expectations(x, t, path)
        return x0 if prediction == "x0" else eps
    return model_fn


@pytest.mark.parametrize("prediction", ["velocity", "x0", "epsilon"])
@pytest.mark.parametrize("path_name", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("solver,method", [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun"),
                                           ("rk4", "rk4"), ("dpmsolver++2m", "dpm_solver_pp_2m")])
def test_scheduler_equals_sample_ode_for_every_path_and_prediction(solver, method, path_name, prediction):
    path, steps = get_path(path_name), 6
    model_fn = oracle(path, prediction)
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    scheduler = FlowMatchSolverScheduler(solver=solver, path=path_name, prediction_type=prediction)
    scheduler.set_timesteps(steps)
    x, calls = noise.clone(), 0
    for timestep in scheduler.timesteps:  # as a pipeline drives it: the network sees timestep / 1000
        x = scheduler.step(model_fn(x, timestep.double() / 1000), timestep, x, return_dict=False)[0]
        calls += 1
    reference, stats = sample_ode(model_fn, noise.clone(), scheduler.sigmas, method=method, path=path,
                                  prediction=prediction, return_stats=True)
    assert torch.isfinite(reference).all()
    torch.testing.assert_close(x, reference, atol=1e-6, rtol=0)
    expected_nfe = nfe_per_solve(method, steps, path=path, prediction=prediction)
    assert calls == len(scheduler.timesteps) == stats.nfe == expected_nfe
    # and the samples are the mixture's: the mean of 64 samples within 4 standard errors
    if method != "euler":
        assert (reference.mean(0) - MIXTURE.mean).abs().max() < 4 * MIXTURE.covariance.diagonal().sqrt().max() / 8


def test_nfe_and_timesteps_follow_the_stepper_schedule():
    sched = FlowMatchSolverScheduler(solver="heun", path="vp")
    sched.set_timesteps(4)  # VP: the step onto t = 0 is one call (the jump to the data prediction)
    assert sched.timesteps.tolist() == [1000.0, 750.0, 750.0, 500.0, 500.0, 250.0, 250.0]
    sched = FlowMatchSolverScheduler(solver="midpoint", prediction_type="x0")
    sched.set_timesteps(2)  # x0 prediction: the velocity at t = 0 is undefined, so the last step jumps
    assert sched.timesteps.tolist() == [1000.0, 750.0, 500.0]
    sched = FlowMatchSolverScheduler(solver="euler", prediction_type="epsilon")
    sched.set_timesteps(2)  # epsilon prediction: alpha(1) = 0 is never asked for
    assert sched.timesteps.tolist() == [999.0, 499.5]
    with pytest.raises(ValueError, match="prediction_type"):
        FlowMatchSolverScheduler(prediction_type="score")
    with pytest.raises(ValueError, match="path"):
        FlowMatchSolverScheduler(path="sigmoid")


@pytest.mark.parametrize("path_name", ["linear", "cosine", "vp"])
def test_scale_noise_is_the_path_forward_process(path_name):
    path = get_path(path_name)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = FlowMatchSolverScheduler(path=path_name).scale_noise(x0, 1000 * t, noise)
    expected = path.alpha(t)[:, None, None, None] * x0 + path.sigma(t)[:, None, None, None] * noise
    torch.testing.assert_close(x_t, expected, atol=1e-6, rtol=0)
