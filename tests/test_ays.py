"""Align Your Steps for flow models: the KLUB estimator against its closed form on Gaussian data, the optimised
8-step grid against uniform / shifted / Karras on the Gaussian mixture, the grid saved in and selected by the
flow scheduler, and adaptive solves through the flow pipeline."""

import argparse
import math

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from genmod.core.paths import LinearPath
from genmod.flow.ays import optimize_pipeline_schedule
from genmod.flow.gmm import GaussianMixture, three_mode_mixture_2d
from genmod.flow.pipeline import FlowMatchingPipeline
from genmod.flow.scheduler import FlowMatchSolverScheduler
from genmod.samplers import get_time_grid, sample_ode
from genmod.samplers.ays import KLUBDraws, interpolate_time_grid, klub, optimize_time_grid, x0_denoiser

MIXTURE = three_mode_mixture_2d()


class MixtureVelocity(ModelMixin, ConfigMixin):
    """The mixture's exact velocity as a 'network' on ``[B, 2, 1, 1]`` latents (timestep = 1000 t)."""

    @register_to_config
    def __init__(self, in_channels: int = 2, sample_size: int = 1, num_classes: int = 0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = (timestep.double() / 1000).expand(sample.shape[0])
        v = MIXTURE.velocity(sample.double().flatten(1), t).reshape(sample.shape).to(sample.dtype)
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)


def mixture_pipeline(**scheduler_config):
    pipe = FlowMatchingPipeline(MixtureVelocity(), FlowMatchSolverScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


NOISE = torch.randn(4000, 2, 1, 1, generator=torch.Generator().manual_seed(5))


def endpoint_error(pipe, steps=8):
    """Mean distance of the pipeline's samples from the exact flow map of the same noise (rk4, 500 steps)."""
    exact = sample_ode(MIXTURE.velocity_fn(), NOISE.double().flatten(1), get_time_grid("uniform", 500), method="rk4")
    x = pipe(batch_size=len(NOISE), num_inference_steps=steps, latents=NOISE, output_type="latent").images
    return (x.double().flatten(1) - exact).norm(dim=1).mean().item()


def test_klub_estimate_equals_its_closed_form_for_gaussian_data():
    """Data N(0, v): D(x, s) = v / (v + s^2) x in VE terms, and the KLUB of [SNR_b, SNR_a] is
    1/2 [ v (1 - c_b)(SNR_a - SNR_b) - log((1 + v SNR_a) / (1 + v SNR_b)) ], c_b = v SNR_b / (1 + v SNR_b)."""
    var = 0.5
    gaussian = GaussianMixture([1.0], [[0.0]], [var])
    x0 = gaussian.sample(400000, generator=torch.Generator().manual_seed(0))
    draws = KLUBDraws.draw(x0, torch.Generator().manual_seed(1))
    path = LinearPath()
    denoiser = x0_denoiser(gaussian.velocity_fn(path), path)
    for t_clean, t_noisy in [(0.2, 0.5), (0.05, 0.3), (0.5, 1.0)]:
        snr_a, snr_b = ((1 - t_clean) / t_clean) ** 2, ((1 - t_noisy) / t_noisy) ** 2
        c_b = var * snr_b / (1 + var * snr_b)
        closed = 0.5 * (var * (1 - c_b) * (snr_a - snr_b) - math.log((1 + var * snr_a) / (1 + var * snr_b)))
        estimate = klub(denoiser, draws, path, t_clean, t_noisy, snr_max=math.inf)
        assert abs(estimate - closed) < 0.01 * closed, (t_clean, t_noisy, estimate, closed)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_optimised_8_step_grid_beats_uniform_shifted_and_karras_on_the_mixture(solver):
    """AYS's coordinate descent and subdivision (2 -> 4 -> 8 steps) on the solve's own error, fitted on one
    set of noises and data, measured on fresh noise through the pipeline."""
    x0 = MIXTURE.sample(1024, generator=torch.Generator().manual_seed(0))
    result = optimize_time_grid(MIXTURE.velocity_fn(), x0, 8, objective="global", method=solver, num_candidates=15,
                                generator=torch.Generator().manual_seed(1))
    assert [entry["steps"] for entry in result.history] == [2, 2, 2, 4, 4, 4, 8, 8, 8]
    assert result.history[-1]["global"] <= result.history[-2]["global"]
    grids = {"ays": {"schedule": "ays", "ays_grids": {"8": result.time_grid.tolist()}},
             "uniform": {}, "shifted": {"schedule": "shifted"}, "karras": {"schedule": "karras"}}
    errors = {name: endpoint_error(mixture_pipeline(solver=solver, **config)) for name, config in grids.items()}
    assert errors["ays"] < 0.95 * min(errors["uniform"], errors["shifted"], errors["karras"]), errors


def test_pipeline_schedule_optimisation_saves_the_grid_in_the_scheduler(tmp_path):
    pipe = mixture_pipeline(solver="heun")
    images = MIXTURE.sample(256, generator=torch.Generator().manual_seed(0)).float().reshape(256, 2, 1, 1)
    result = optimize_pipeline_schedule(pipe, images, None, 4, objective="klub", num_sweeps=1, num_candidates=5)
    assert pipe.scheduler.config.schedule == "ays"
    pipe.scheduler.save_pretrained(tmp_path)
    loaded = FlowMatchSolverScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(4)
    assert torch.allclose(loaded.sigmas.double(), result.time_grid.float().double(), atol=1e-7)
    assert loaded.timesteps.numel() == 8  # heun: two calls per step


def test_schedules_of_the_scheduler():
    scheduler = FlowMatchSolverScheduler()
    scheduler.set_timesteps(6)
    assert torch.allclose(scheduler.sigmas.double(), get_time_grid("uniform", 6).float().double())
    for name, kwargs in [("karras", {}), ("cosine", {}), ("shifted", {"shift": 3.0})]:
        scheduler = FlowMatchSolverScheduler(schedule=name)
        scheduler.set_timesteps(6)
        assert torch.allclose(scheduler.sigmas.double(), get_time_grid(name, 6, **kwargs).float().double()), name
    with pytest.raises(ValueError, match="genmod ays"):
        FlowMatchSolverScheduler(schedule="ays")
    with pytest.raises(ValueError, match="schedule"):
        FlowMatchSolverScheduler(schedule="linear")


def test_interpolating_a_log_linear_grid_is_exact():
    """A grid whose interior log sigma is linear in the step position re-spaces to the same line at any count."""
    path = LinearPath()
    def geometric(n):  # log sigma from log 20 (position 0) to log 0.01 (position 1)
        log_sigma = torch.tensor([math.log(20) + k / n * (math.log(0.01) - math.log(20)) for k in range(1, n)],
                                 dtype=torch.float64)
        return torch.cat([torch.ones(1, dtype=torch.float64), path.t_from_log_snr(-2 * log_sigma),
                          torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(interpolate_time_grid(geometric(8), 16, path), geometric(16), atol=1e-10)
    assert torch.allclose(interpolate_time_grid(geometric(10), 5, path), geometric(5), atol=1e-10)


def test_adaptive_solver_through_the_pipeline_and_the_sample_flags():
    from genmod.sampling import _apply_scheduler_options

    pipe = mixture_pipeline()
    args = argparse.Namespace(solver="dopri5", schedule=None, rtol=1e-6, atol=1e-6)
    _apply_scheduler_options(pipe, args)
    assert pipe.scheduler.is_adaptive and pipe.scheduler.config.rtol == 1e-6 and args.solver is None
    steps_seen = []
    pipe.scheduler.set_timesteps(1)
    assert endpoint_error(pipe, steps=1) < 1e-3
    assert 20 < pipe.scheduler.last_nfe < 300
    out = pipe(batch_size=4, num_inference_steps=1, latents=NOISE[:4], output_type="latent",
               callback_on_step_end=lambda p, i, t, kw: steps_seen.append(i) or kw)
    assert steps_seen == [0] and out.images.shape == (4, 2, 1, 1)
    with pytest.raises(RuntimeError, match="integrate"):
        pipe.scheduler.step(torch.zeros(1, 2, 1, 1), pipe.scheduler.timesteps[0], torch.zeros(1, 2, 1, 1))
    with pytest.raises(ValueError, match="rtol"):
        FlowMatchSolverScheduler(solver="dopri5", rtol=2.0)


def test_flag_errors_name_the_flag():
    from genmod.evals.cli import configure_scheduler
    from genmod.sampling import build_parser, check_arguments

    with pytest.raises(ValueError, match="genmod ays"):
        configure_scheduler(mixture_pipeline(), schedule="ays")  # no saved grid yet
    with pytest.raises(ValueError, match="--rtol"):
        check_arguments(build_parser().parse_args(["some/pipeline", "--solver", "dopri5", "--rtol", "2"]))
    with pytest.raises(ValueError, match="num_steps"):
        optimize_time_grid(MIXTURE.velocity_fn(), MIXTURE.sample(8), 1)
    with pytest.raises(ValueError, match="objective"):
        optimize_time_grid(MIXTURE.velocity_fn(), MIXTURE.sample(8), 4, objective="fid")


def test_local_error_of_an_euler_step_equals_the_closed_form_on_a_gaussian():
    """N(mu, diag(var)) has the flow map x_t = alpha mu + sqrt(alpha^2 var + sigma^2) z: the Euler step's local
    error against it is what ``local_error`` measures (its rk4 reference is exact to ~1e-6 here)."""
    from genmod.samplers.ays import local_error

    mu, var = torch.tensor([[1.0, -0.5]], dtype=torch.float64), torch.tensor([[0.3, 2.0]], dtype=torch.float64)
    gaussian = GaussianMixture([1.0], mu, var)
    draws = KLUBDraws.draw(gaussian.sample(20000, generator=torch.Generator().manual_seed(0)),
                           torch.Generator().manual_seed(1))
    t_noisy, t_clean = 0.6, 0.3
    x = (1 - t_noisy) * draws.x0 + t_noisy * draws.eps_1
    z = (x - (1 - t_noisy) * mu) / ((1 - t_noisy) ** 2 * var + t_noisy**2).sqrt()
    exact = (1 - t_clean) * mu + ((1 - t_clean) ** 2 * var + t_clean**2).sqrt() * z
    euler = x + (t_clean - t_noisy) * gaussian.velocity(x, t_noisy)
    expected = (euler - exact).pow(2).mean().sqrt().item()
    measured = local_error(gaussian.velocity_fn(), draws, LinearPath(), t_clean, t_noisy, "euler")
    assert abs(measured - expected) < 1e-4 * expected + 1e-7, (measured, expected)
