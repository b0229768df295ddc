"""Diffusion Forcing against the official code's formulas (issue 21): the fused-SNR weight for velocity
targets on every path and its decay power, the bidirectional fused SNR of non-causal models, the DDPM
step fed to the network on discrete paths, non-causal attention, DDIM with eta and the sigmoid schedule.
The references are written here from the formulas of buoyancy99/diffusion-forcing (v1.5) and DFoT."""

from __future__ import annotations

import math

import pytest
import torch

from genmod.core.paths import AffinePath, ddpm_alphas_cumprod, get_path
from genmod.diffusion_forcing import fused_snr, fused_snr_weight, rollout
from genmod.diffusion_forcing.family import DiffusionForcingConfig, DiffusionForcingFamily
from genmod.samplers import ddim_noise_std, ddim_step
from test_diffusion_forcing import _random_model


def _custom_path() -> AffinePath:
    """A non-variance-preserving path with a decreasing log-SNR: alpha = 1 - t^2, sigma = t (1 + t) / 2."""
    return AffinePath(alpha=lambda t: 1 - t**2, sigma=lambda t: t * (1 + t) / 2)


def _reference_fused(snr_row: list[float], gamma: float, decay: float, causal: bool = True) -> list[float]:
    """The official fused SNR ``f`` (normalised) of one clip with plain floats: the shifted EMA of the clipped
    normalised SNR, forward only (DF v1.5) or the mean of forward and backward (DFoT, non-causal)."""
    norm = [s / gamma for s in snr_row]
    clipped = [min(n, 1.0) for n in norm]

    def shifted(values):
        ema, out = 0.0, []
        for k, c in enumerate(values):
            out.append(0.0 if k == 0 else ema)
            ema = c if k == 0 else decay * ema + (1 - decay) * c
        return out

    past = shifted(clipped)
    if not causal:
        past = [0.5 * (a + b) for a, b in zip(past, shifted(clipped[::-1])[::-1])]
    return [1 - (1 - decay * p) * (1 - n) for p, n in zip(past, norm)]


@pytest.mark.parametrize("name", ["cosine", "ddpm_cosine", "ddpm_linear", "ddpm_sigmoid", "vp", "linear", "custom"])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_snr_velocity_weight_equals_the_official_v_weight_on_every_path(name, causal):
    path = _custom_path() if name == "custom" else get_path(name)
    gamma, decay = 5.0, 0.96
    t = torch.rand(4, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.97 + 0.02
    weight = fused_snr_weight(path, t, gamma, decay, "velocity", causal=causal)
    snr = path.snr(t)
    x0, eps, x0_hat = (torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                       for s in (2, 3, 4))
    a, s, da, ds = path.coefficients(t, x0)
    x_t = a * x0 + s * eps
    eps_hat = (x_t - a * x0_hat) / s  # the prediction that goes with x0_hat at this x_t
    norm = torch.sqrt(a**2 + s**2)  # the official v lives on the variance-preserving rescaling of the path
    v_official = (a * eps - s * x0) / norm
    v_official_hat = (a * eps_hat - s * x0_hat) / norm
    v, v_hat = da * x0 + ds * eps, da * x0_hat + ds * eps_hat
    for b in range(4):
        fused = _reference_fused(snr[b].tolist(), gamma, decay, causal)
        for k in range(7):
            w_official = min(gamma * fused[k], gamma) / (gamma * fused[k] + 1)  # v1.5's pred_v weight
            loss_official = w_official * float(((v_official_hat - v_official)[b, k] ** 2).sum())
            loss_genmod = float(weight[b, k]) * float(((v_hat - v)[b, k] ** 2).sum())
            assert loss_genmod == pytest.approx(loss_official, rel=1e-6)
            assert float(fused_snr_weight(path, t, gamma, decay, "x0", causal=causal)[b, k]) == pytest.approx(
                min(gamma * fused[k], gamma), rel=1e-9)
            assert float(fused_snr_weight(path, t, gamma, decay, "epsilon", causal=causal)[b, k]) == pytest.approx(
                min(gamma * fused[k], gamma) / (gamma * fused[k]), rel=1e-9)


def test_bidirectional_fused_snr_sees_later_frames_and_decay_zero_is_min_snr():
    path = get_path("cosine")
    noisy_future = torch.tensor([[0.9, 0.5, 0.99, 0.99]], dtype=torch.float64)
    clean_future = torch.tensor([[0.9, 0.5, 0.01, 0.01]], dtype=torch.float64)
    causal = [fused_snr(path.snr(t), 5.0, 0.9)[0, 1] for t in (noisy_future, clean_future)]
    both = [fused_snr(path.snr(t), 5.0, 0.9, causal=False)[0, 1] for t in (noisy_future, clean_future)]
    assert causal[0] == causal[1] and both[1] > both[0]  # only the non-causal weight sees the future
    t = torch.rand(2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.9 + 0.05
    for space in ("velocity", "x0", "epsilon"):
        torch.testing.assert_close(fused_snr_weight(path, t, 5.0, 0.0, space, causal=False),
                                   fused_snr_weight(path, t, 5.0, 0.0, space))


def test_decay_power_and_the_per_step_config():
    path = get_path("cosine")
    t = torch.rand(3, 6, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fused_snr_weight(path, t, 5.0, 0.96, decay_power=2),
                               fused_snr_weight(path, t, 5.0, 0.96**2))
    base = dict(dataset="oscillators", num_frames=4, frame_stack=2, hidden_size=16, depth=1, num_heads=2)
    per_frame = DiffusionForcingFamily(DiffusionForcingConfig(**base)).loss_weight(t)
    per_step = DiffusionForcingFamily(DiffusionForcingConfig(**base, fused_snr_decay_per="step", frame_skip=3)).loss_weight(t)
    torch.testing.assert_close(per_frame, fused_snr_weight(path, t, 5.0, 0.96))  # the default is unchanged
    torch.testing.assert_close(per_step, fused_snr_weight(path, t, 5.0, 0.96 ** 6))  # 0.96^(2 * 3)


# ---------------------------------------------------------------------------------------------
# the network edge: DDPM step n on discrete paths, 1000 t (bitwise) on continuous ones


def _record_timesteps(model):
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    return seen


@pytest.mark.parametrize("name", ["ddpm_linear", "ddpm_cosine", "cosine"])
def test_network_sees_the_ddpm_step_in_training_and_sampling(name):
    cfg = DiffusionForcingConfig(dataset="oscillators", num_frames=4, frame_stack=1, hidden_size=16, depth=1,
                                 num_heads=2, dataset_size=2, path=name)
    family = DiffusionForcingFamily(cfg)
    model = family.build_model()
    seen = _record_timesteps(model)
    steps = torch.tensor([0, 1, 500, 999])
    t = ((steps + 1) / 1000).float()[None].expand(2, 4)  # alpha_bar[n] sits at t = (n + 1) / N
    family.draw_levels = lambda batch, frames, generator, device: t
    family.loss(model, {"sequence": torch.zeros(2, 4, 1)}, torch.Generator().manual_seed(0))
    discrete = name.startswith("ddpm")
    expected = steps.float()[None].expand(2, 4) if discrete else 1000 * t
    assert torch.equal(seen[0], expected)
    # sampling: levels at t = 0.002, 0.501, 1 and stabilised history at t_c = 0.001 -> n = 1, 500, 999 and 0
    seen.clear()
    grid = [1.0, 0.501, 0.002, 0.0]
    rollout(model, torch.zeros(1, 1, 1), 1, path=name, num_inference_steps=3, time_grid=grid, context_noise=0.001,
            kv_cache=None, generator=torch.Generator().manual_seed(1))
    fed = sorted({float(v) for call in seen for v in call.flatten()})
    if discrete:
        assert fed == [0.0, 1.0, 500.0, 999.0]
    else:  # as before session 6: 1000 * t in float32 for the chunk, 1000 * t_c for the history
        tau = torch.tensor(grid[:-1], dtype=torch.float64)
        assert fed == sorted({1000.0 * 0.001, *(1000 * tau.float()).tolist()})


# ---------------------------------------------------------------------------------------------
# non-causal mode


@pytest.mark.parametrize("backbone", ["video", "sequence", "unet"])
def test_non_causal_models_let_late_frames_change_early_outputs(backbone):
    for causal in (True, False):
        model = _random_model(backbone, causal=causal)
        x = torch.randn(2, 4, *model.frame_shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((2, 4), 500.0)
        changed = x.clone()
        changed[:, -1] += 1.0
        with torch.no_grad():
            first = model(x, t).sample[:, 0]
            first_changed = model(changed, t).sample[:, 0]
        diff = float((first - first_changed).abs().max())
        assert (diff == 0.0) if causal else (diff > 1e-4)


def test_non_causal_rollout_recomputes_history_and_matches_uncached():
    model = _random_model("sequence", causal=False)
    context = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(3))
    run = lambda cache: rollout(model, context, 5, schedule="pyramid", num_inference_steps=3, kv_cache=cache,
                                generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(run("reencode"), run(None))  # the cache is not used: it would not be exact


# ---------------------------------------------------------------------------------------------
# DDIM with eta and the sigmoid schedule


@pytest.mark.parametrize("name", ["cosine", "ddpm_linear", "ddpm_sigmoid"])
def test_ddim_eta_zero_is_deterministic_and_eta_one_is_the_ddpm_posterior(name):
    path = get_path(name)
    t, t_next = 0.6, 0.35
    x0, eps, z = (torch.randn(3, 8, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (0, 1, 2))
    a_next, s_next = float(path.alpha(t_next)), float(path.sigma(t_next))
    torch.testing.assert_close(ddim_step(x0, eps, path, t, t_next, 0.0), a_next * x0 + s_next * eps)
    abar, abar_next = float(path.alpha(t)) ** 2, float(path.alpha(t_next)) ** 2
    beta = 1 - abar / abar_next  # the one-step beta between the two levels
    posterior_var = (1 - abar_next) / (1 - abar) * beta  # Ho et al. (2020), eq. 7
    assert float(ddim_noise_std(path, t, t_next, 1.0)) ** 2 == pytest.approx(posterior_var, rel=1e-10)
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    mean = math.sqrt(abar_next) * beta / (1 - abar) * x0 + math.sqrt(1 - beta) * (1 - abar_next) / (1 - abar) * x_t
    torch.testing.assert_close(ddim_step(x0, eps, path, t, t_next, 1.0, z), mean + math.sqrt(posterior_var) * z)
    half = float(ddim_noise_std(path, t, t_next, 0.5))
    assert half == pytest.approx(0.5 * math.sqrt(posterior_var), rel=1e-10) and float(ddim_noise_std(path, t, 0.0, 1.0)) == 0


def test_rollout_eta_zero_is_bitwise_the_default_and_eta_one_adds_noise():
    model = _random_model("sequence")
    context = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(5))
    run = lambda **kw: rollout(model, context, 3, schedule="pyramid", num_inference_steps=4,
                               generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(run(), run(eta=0.0))
    assert float((run(eta=1.0) - run()).abs().max()) > 1e-3


def test_sigmoid_schedule_matches_the_formula():
    n_steps, start, end, tau = 1000, -3.0, 3.0, 1.0
    sig = lambda v: 1 / (1 + math.exp(-v))
    f = [sig(end / tau) - sig((start + (n / n_steps) * (end - start)) / tau) for n in range(n_steps + 1)]
    abar, expected = 1.0, []
    for n in range(1, n_steps + 1):
        abar *= 1 - min(1 - f[n] / f[n - 1], 0.999)
        expected.append(abar)
    got = ddpm_alphas_cumprod("sigmoid")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-15)
    assert float(got[-1]) < 1e-6 and get_path("ddpm_sigmoid").num_steps == 1000
