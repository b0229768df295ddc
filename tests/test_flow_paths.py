"""Paths, prediction conversions, time samplers and the flow-matching loss (genmod.flow)."""

import math

import pytest
import torch

from genmod.core.loss import flow_matching_loss, min_snr_weight
from genmod.core.paths import (
    AffinePath,
    CosinePath,
    DiscreteSchedulePath,
    LinearPath,
    VPPath,
    ddpm_alphas_cumprod,
    get_path,
)
from genmod.core.time_sampling import (
    get_time_sampler,
    sample_logit_normal_t,
    sample_shifted_t,
    sample_uniform_t,
    shift_time,
)

PATHS = {
    "linear": LinearPath(),
    "cosine": CosinePath(),
    "vp": VPPath(),
    "ddpm_linear": DiscreteSchedulePath(schedule="linear"),
    "ddpm_cosine": DiscreteSchedulePath(schedule="cosine"),
    # a user path whose derivatives come from autograd
    "affine_autograd": AffinePath(alpha=lambda t: 1 - t**2, sigma=lambda t: torch.sin(0.5 * math.pi * t) + 0.1 * t * (1 - t)),
}
TYPES = ("velocity", "x0", "epsilon", "score")


def _point(path, t_shape=(5,), data_shape=(5, 3, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(data_shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(data_shape, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(t_shape, generator=gen, dtype=torch.float64)
    return x0, eps, t, path.sample(x0, eps, t)


@pytest.mark.parametrize("name", list(PATHS))
@pytest.mark.parametrize("t_shape", [(5,), (5, 3)])
def test_conversions_round_trip_exactly(name, t_shape):
    path = PATHS[name]
    x0, eps, t, point = _point(path, t_shape)
    sigma = path.sigma(t).reshape(t.shape + (1,) * (x0.ndim - t.ndim))
    truth = {"velocity": point.velocity_target, "x0": x0, "epsilon": eps, "score": -eps / sigma}
    for src in TYPES:
        for dst in TYPES:
            converted = path.convert(truth[src], point.x_t, t, src=src, dst=dst)
            torch.testing.assert_close(converted, truth[dst], rtol=1e-9, atol=1e-9)
            back = path.convert(converted, point.x_t, t, src=dst, dst=src)
            torch.testing.assert_close(back, truth[src], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(PATHS))
def test_velocity_target_is_time_derivative_of_x_t(name):
    path = PATHS[name]
    x0, eps, t, point = _point(path)
    step = 1e-6
    if name.startswith("ddpm"):  # piecewise-linear knots: stay inside one segment
        t = (torch.floor(t * 1000) + 0.5) / 1000
        point = path.sample(x0, eps, t)
    forward, backward = path.sample(x0, eps, t + step).x_t, path.sample(x0, eps, t - step).x_t
    torch.testing.assert_close(point.velocity_target, (forward - backward) / (2 * step), rtol=1e-5, atol=1e-6)


def test_boundary_values_and_autograd_derivatives():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for path in (LinearPath(), CosinePath()):
        torch.testing.assert_close(path.alpha(t), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(path.sigma(t), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    # a general AffinePath built from the linear path's callables differentiates to the closed forms
    generic = AffinePath(alpha=lambda s: 1 - s, sigma=lambda s: s)
    tt = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(generic.d_alpha(tt), -torch.ones_like(tt))
    torch.testing.assert_close(generic.d_sigma(tt), torch.ones_like(tt))
    # VP: alpha(t) = exp(-(0.1 t + 9.95 t^2) / 2), variance preserving
    vp = VPPath()
    torch.testing.assert_close(vp.alpha(torch.tensor(1.0, dtype=torch.float64)), torch.tensor(math.exp(-0.5 * 10.05), dtype=torch.float64))
    torch.testing.assert_close(vp.alpha(tt) ** 2 + vp.sigma(tt) ** 2, torch.ones_like(tt))


@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "affine_autograd"])
def test_log_snr_inverse(name):
    path = PATHS[name]
    t = torch.linspace(0.02, 0.98, 11, dtype=torch.float64)
    torch.testing.assert_close(path.snr(t), path.alpha(t) ** 2 / path.sigma(t) ** 2)
    torch.testing.assert_close(path.t_from_log_snr(path.log_snr(t)), t, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(AffinePath.t_from_log_snr(path, path.log_snr(t)), t, rtol=1e-8, atol=1e-10)


def test_ddpm_schedules_on_continuous_t():
    alphas_cumprod = ddpm_alphas_cumprod("linear", 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(alphas_cumprod[-1], torch.prod(1 - betas))
    path = DiscreteSchedulePath(alphas_cumprod)
    steps = torch.tensor([0, 10, 499, 999])
    t = path.step_to_t(steps)
    torch.testing.assert_close(t, (steps + 1).double() / 1000)
    torch.testing.assert_close(path.alpha(t) ** 2, alphas_cumprod[steps])  # exact at the knots
    torch.testing.assert_close(path.t_to_step(t), steps.double())
    # the 1000-step linear table is the discretisation of the continuous VP path (beta_min 0.1, beta_max 20)
    grid = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    assert (path.alpha(grid) - VPPath().alpha(grid)).abs().max() < 2e-3
    # cosine table: alpha_bar(n) = f(n) / f(0) with f = cos^2(((n/N) + s)/(1 + s) pi/2) where betas are unclipped
    cosine = ddpm_alphas_cumprod("cosine", 1000)
    f = lambda n: math.cos(((n / 1000) + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(cosine[499].item() - f(500) / f(0)) < 1e-12
    assert isinstance(get_path("ddpm_cosine"), DiscreteSchedulePath)
    with pytest.raises(ValueError, match="schedule"):
        ddpm_alphas_cumprod("quadratic")


def test_bad_inputs_are_clear_errors():
    path = LinearPath()
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="src"):
        path.convert(x, x, torch.rand(4), src="v", dst="x0")
    with pytest.raises(ValueError, match="t: shape"):
        path.sample(x, x, torch.rand(3))
    with pytest.raises(ValueError, match="noise"):
        path.sample(x, torch.zeros(4, 2), torch.rand(4))
    with pytest.raises(ValueError, match="path"):
        get_path("ve")


# ------------------------------------------------------------------------------------------------
# time samplers
# ------------------------------------------------------------------------------------------------
def test_time_sampler_moments_ranges_and_reproducibility():
    n = 200_000
    t = sample_uniform_t(n, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert 0 <= t.min() and t.max() <= 1
    assert abs(t.mean() - 0.5) < 4e-3 and abs(t.var() - 1 / 12) < 2e-3

    t = sample_logit_normal_t(n, torch.Generator().manual_seed(2), dtype=torch.float64, mean=0.5, std=0.8)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 1e-2 and abs(logit.std() - 0.8) < 1e-2

    shift = 3.0
    t = sample_shifted_t(n, torch.Generator().manual_seed(3), dtype=torch.float64, shift=shift)
    for y in (0.2, 0.5, 0.8):  # P(t' <= y) = P(t <= y / (s - (s - 1) y))
        assert abs((t <= y).double().mean() - y / (shift - (shift - 1) * y)) < 5e-3
    torch.testing.assert_close(shift_time(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))

    for name, kw in (("uniform", {}), ("logit_normal", {"std": 1.0}), ("shifted", {"shift": 2.0, "base": "logit_normal"})):
        draw = get_time_sampler(name, **kw)
        a = draw((8, 5), torch.Generator().manual_seed(7))
        b = draw((8, 5), torch.Generator().manual_seed(7))
        c = draw((8, 5), torch.Generator().manual_seed(8))
        assert a.shape == (8, 5) and torch.equal(a, b) and not torch.equal(a, c)
        assert ((a > 0) & (a < 1)).all()
    with pytest.raises(ValueError, match="shape"):
        sample_uniform_t((0, 3), torch.Generator())
    with pytest.raises(ValueError, match="time sampler"):
        get_time_sampler("beta")


# ------------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------------
def test_loss_is_zero_at_the_exact_target_in_every_space():
    for name in ("linear", "cosine", "vp"):
        path = PATHS[name]
        x0, eps, t, point = _point(path)
        exact = {"velocity": point.velocity_target, "x0": x0, "epsilon": eps}
        for prediction, output in exact.items():
            for space in ("velocity", "x0", "epsilon"):
                loss = flow_matching_loss(output, x0, eps, t, path, prediction=prediction, loss_space=space)
                assert loss.item() < 1e-18


def test_loss_values_weights_masks_and_min_snr():
    path = VPPath()
    x0, eps, t, point = _point(path, t_shape=(5, 3))
    noise_pred = eps + 0.1 * torch.randn_like(eps)
    per_elem = (noise_pred - eps) ** 2
    got = flow_matching_loss(noise_pred, x0, eps, t, path, prediction="epsilon", reduction="per_sample")
    torch.testing.assert_close(got, per_elem.mean(dim=(1, 2)))

    # token mask [B, T]: masked tokens do not count, and changing them does not change the loss
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    masked = flow_matching_loss(noise_pred, x0, eps, t, path, prediction="epsilon", mask=mask)
    expected = (per_elem * mask[..., None]).sum() / (mask.sum() * per_elem.shape[-1])
    torch.testing.assert_close(masked, expected)
    perturbed = noise_pred + 5.0 * (1 - mask[..., None])
    torch.testing.assert_close(flow_matching_loss(perturbed, x0, eps, t, path, prediction="epsilon", mask=mask), masked)

    # Min-SNR-gamma is one weighting: the same number whichever space the MSE is taken in
    x0_pred = path.convert(noise_pred, point.x_t, t, "epsilon", "x0")
    by_space = [
        flow_matching_loss(noise_pred, x0, eps, t, path, "epsilon", space,
                           weight=min_snr_weight(path, t, 5.0, space), reduction="per_sample")
        for space in ("x0", "epsilon", "velocity")
    ]
    for other in by_space[1:]:
        torch.testing.assert_close(other, by_space[0])
    direct = (torch.minimum(path.snr(t), torch.tensor(5.0, dtype=torch.float64))[..., None] * (x0_pred - x0) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(by_space[0], direct)
    with pytest.raises(ValueError, match="prediction"):
        flow_matching_loss(noise_pred, x0, eps, t, path, prediction="v")
