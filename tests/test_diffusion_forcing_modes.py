"""Diffusion Forcing rollout options of issue 21, each pinned by numbers: the stabilisation semantics of the
official code bases (input statistics of stabilised frames), history guidance HG-f / HG-t and Monte Carlo
guidance (combination rules on toy predictors whose outputs are known), the sigma_t sigma_next / alpha_t
gradient scaling, DFoT's per-chunk history length and configurable x0 clamping."""

from __future__ import annotations

import math

import pytest
import torch

from genmod.core.paths import get_path
from genmod.diffusion_forcing import RolloutSettings, history_conditions, plan_chunks, rollout
from genmod.diffusion_forcing.family import DiffusionForcingConfig, DiffusionForcingFamily
from genmod.diffusion_forcing.guidance import denoise, guided_prediction
from genmod.diffusion_forcing.predictor import Predictor
from genmod.diffusion_forcing.stabilization import Stabilizer
from test_diffusion_forcing import _random_model

ALPHA = SIGMA = math.cos(math.pi / 4)  # cosine path at t_c = 0.5


def _calls(mode: str, batch: int = 2000):
    """Every network call of a 2-frame rollout (one frame per chunk, 2 levels) after 2 ground-truth frames of
    value 0.8, with t_c = 0.5 on the cosine path: (inputs, timesteps, offset) and the rollout."""
    model = _random_model("sequence")
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        (args[0].clone(), args[1].clone(), kwargs["frame_offset"])), with_kwargs=True)
    context = torch.full((batch, 2, 4), 0.8)
    out = rollout(model, context, 2, schedule="autoregressive", num_inference_steps=2, chunk_size=1, kv_cache=None,
                  context_noise=0.5, stabilization=mode, generator=torch.Generator().manual_seed(0))
    return calls, out


def _noise_of(seen, clean):
    """What the model saw minus alpha x, in units of sigma: standard normal when the frame was noised."""
    return (seen - ALPHA * clean) / SIGMA


def test_v15_stabilisation_scales_every_clean_frame_without_noise():
    calls, out = _calls("v1.5")
    for x, timestep, _ in calls:
        assert torch.equal(x[:, :2], ALPHA * torch.full_like(x[:, :2], 0.8))  # deterministic, same every step
        assert (timestep[:, :2] == 500.0).all()
    last = calls[-1]  # chunk 2: the generated frame is history too, scaled the same way
    assert torch.equal(last[0][:, 2], ALPHA * out[:, 2]) and (last[1][:, 2] == 500.0).all()


@pytest.mark.parametrize("mode", ["v1.5_ddpm", "fixed_noise"])
def test_noised_stabilisation_has_the_forward_statistics(mode):
    calls, out = _calls(mode)
    z = [_noise_of(x[:, :2], out[:, :2]) for x, _, _ in calls]
    for noise in z:  # 8000 draws: mean within 4 / sqrt(8000), std within 3 %
        assert abs(float(noise.mean())) < 0.045 and abs(float(noise.std()) - 1) < 0.03
    same_every_step = torch.equal(z[0], z[1])
    assert same_every_step == (mode == "fixed_noise")  # v1.5's DDPM sampler re-noises at every step
    gen = _noise_of(calls[-1][0][:, 2], out[:, 2])
    assert abs(float(gen.mean())) < 0.045 and abs(float(gen.std()) - 1) < 0.03


def test_dfot_stabilisation_leaves_ground_truth_clean_and_renoises_generated_frames():
    calls, out = _calls("dfot")
    for x, timestep, _ in calls:
        assert torch.equal(x[:, :2], out[:, :2]) and (timestep[:, :2] == 0).all()  # GT untouched, level 0
    chunk2 = [c for c in calls if c[0].shape[1] == 4]
    assert len(chunk2) == 2
    z = [_noise_of(x[:, 2], out[:, 2]) for x, _, _ in chunk2]
    for noise in z:
        assert abs(float(noise.mean())) < 0.09 and abs(float(noise.std()) - 1) < 0.04
    assert (chunk2[0][1][:, 2] == 500.0).all() and not torch.equal(z[0], z[1])  # fresh noise per step


# ---------------------------------------------------------------------------------------------
# history guidance


def test_history_condition_weights():
    as_dict = lambda views: {tuple(levels.tolist()): w for levels, w in views}
    assert as_dict(history_conditions("fractional", 3.0, 2, 0.4)) == {(1.0, 1.0): -2.0, (0.0, 0.0): 1.0, (0.4, 0.4): 2.0}
    assert as_dict(history_conditions("fractional", 1.0, 2, 0.4)) == {(0.0, 0.0): 1.0}
    assert as_dict(history_conditions("noise", 2.5, 3)) == {(1.0, 1.0, 1.0): -1.5, (0.0, 0.0, 0.0): 2.5}
    views = as_dict(history_conditions("temporal", 1.0, 3, subsets=[[0], [-2, -1], [7]], weights=[1.5, 2.0, 0.5]))
    assert views == {(1.0, 1.0, 1.0): 1 - 1.5 - 2.0, (0.0, 1.0, 1.0): 1.5, (1.0, 0.0, 0.0): 2.0}  # 7 out of range


class _ToyPredictor:
    """Returns ``A`` with the full history and ``sum(levels) + 10 * levels[0]`` with a partly noised one."""

    history = (torch.zeros(1, 3, 2), None, 0, None)

    def __call__(self, x, t, start, history="keep"):
        if isinstance(history, tuple):
            levels = history[1]
            return torch.full_like(x, float(levels.sum() + 10 * levels[0]))
        return torch.full_like(x, 7.0)

    def noised_history(self, levels):
        return None, levels


def test_fractional_and_temporal_guidance_combine_known_predictions():
    x, t = torch.zeros(1, 2, 2), torch.tensor([0.5, 0.7])
    toy = lambda levels: sum(levels) + 10 * levels[0]
    u = toy([1.0, 1.0, 1.0])
    hgf = RolloutSettings(history_guidance="fractional", guidance_scale=2.5, history_freq_scale=0.3)
    expected = 7.0 + 1.5 * (toy([0.3] * 3) - u)  # c + (w - 1) (c_k - u)
    torch.testing.assert_close(guided_prediction(_ToyPredictor(), hgf, x, t, 0, "drop"), torch.full_like(x, expected))
    hgt = RolloutSettings(history_guidance="temporal", history_subsets=[[0, 1], [2]], history_weights=[2.0, 0.5])
    expected = u + 2.0 * (toy([0.0, 0.0, 1.0]) - u) + 0.5 * (toy([1.0, 1.0, 0.0]) - u)  # u + sum w_i (c_i - u)
    torch.testing.assert_close(guided_prediction(_ToyPredictor(), hgt, x, t, 0, "drop"), torch.full_like(x, expected))


class _CountingToy(_ToyPredictor):
    calls = 0

    def __call__(self, x, t, start, history="keep"):
        self.calls += 1
        return super().__call__(x, t, start, history)


@pytest.mark.parametrize("interval,guided_frames,calls", [(None, [1, 1, 1], 3), ((0.0, 1.0), [1, 1, 1], 3),
                                                          ((0.45, 0.75), [0, 1, 1], 3), ((0.9, 1.0), [0, 0, 0], 1)])
def test_guidance_interval_gates_each_frame_by_its_own_level(interval, guided_frames, calls):
    """Frames at levels 0.2, 0.5, 0.7: inside the interval the HG-f combination, outside the full-history
    prediction (7); HG-f runs the full history, c_k and u (3 calls), no frame inside only the first."""
    x, t = torch.zeros(1, 3, 2), torch.tensor([0.2, 0.5, 0.7])
    toy = lambda levels: sum(levels) + 10 * levels[0]
    settings = RolloutSettings(history_guidance="fractional", guidance_scale=2.5, history_freq_scale=0.3,
                               guidance_interval=interval)
    guided = 7.0 + 1.5 * (toy([0.3] * 3) - toy([1.0] * 3))
    predictor = _CountingToy()
    out = guided_prediction(predictor, settings, x, t, 0, "drop")
    expected = torch.tensor([guided if g else 7.0 for g in guided_frames]).reshape(1, 3, 1).expand_as(x)
    torch.testing.assert_close(out, expected)
    assert predictor.calls == calls


@pytest.mark.parametrize("bad", [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.3,)])
def test_bad_guidance_interval_is_one_line(bad):
    with pytest.raises(ValueError, match="^guidance_interval: need"):
        RolloutSettings(guidance_interval=bad)


def test_partial_history_views_and_neutral_guidance_rollouts():
    path = get_path("linear")
    predictor = Predictor(None, None, None, path, Stabilizer(path, "v1.5", 0.2), torch.Generator().manual_seed(0))
    clean = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
    predictor.history = (0.8 * clean, clean, 0, torch.tensor([False, True]))
    frames, times = predictor.noised_history(torch.tensor([0.0, 1.0]))
    assert torch.equal(frames[:, 0], 0.8 * clean[:, 0]) and times.tolist() == [0.2, 1.0]
    assert not torch.equal(frames[:, 1], clean[:, 1]) and abs(float(frames[:, 1].std()) - 1) < 0.5  # pure noise
    model = _random_model("sequence")
    context = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(5))
    run = lambda **kw: rollout(model, context, 3, schedule="pyramid", num_inference_steps=3,
                               generator=torch.Generator().manual_seed(6), **kw)
    plain = run()
    assert torch.equal(run(history_guidance="fractional", guidance_scale=1.0), plain)
    assert torch.equal(run(history_guidance="temporal", history_subsets=[[0, 1]], history_weights=[1.0]), plain)
    assert float((run(history_guidance="fractional", guidance_scale=2.0) - plain).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# gradient guidance: v1.5 scaling and Monte Carlo guidance


@pytest.mark.parametrize("samples,scaling", [(1, "constant"), (1, "ddim"), (4, "constant"), (3, "ddim")])
def test_monte_carlo_and_scaled_gradient_guidance_on_a_linear_toy(samples, scaling):
    """x0 model ``x0 = c x``, loss ``<g, x0>``: sample r is ``c (alpha c)^r x + noise``, so the gradient of the
    mean loss is ``g c mean_r (alpha c)^r`` and the x0 step is that times strength (times the v1.5 factor)."""
    path, c, strength = get_path("cosine"), 0.9, 0.3
    g = torch.tensor([1.0, -2.0, 0.5])
    predictor = lambda x, t, start, history="keep": c * x
    settings = RolloutSettings(prediction="x0", guidance_fn=lambda x0: (x0 * g).flatten(1).sum(1),
                               guidance_strength=strength, guidance_grad="x_t", guidance_mc_samples=samples,
                               guidance_scaling=scaling)
    x_in = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_in, t_next = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64)
    x0_hat, _ = denoise(predictor, settings, path, x_in, t_in, t_next, 0, "drop", torch.tensor([0]),
                        torch.Generator().manual_seed(1), torch.tensor([True]))
    alpha = math.cos(math.pi / 4)
    grad = g * c * sum((alpha * c) ** r for r in range(samples)) / samples
    factor = 1.0 if scaling == "constant" else math.sin(math.pi / 4) * math.sin(math.pi / 8) / alpha
    torch.testing.assert_close(x0_hat, c * x_in - strength * factor * grad)
    if samples > 1:
        with pytest.raises(ValueError, match="guidance_mc_samples"):
            RolloutSettings(guidance_mc_samples=samples, guidance_grad="x0")


# ---------------------------------------------------------------------------------------------
# DFoT's per-chunk history length and x0 clamping


def test_dfot_chunk_plan_and_the_history_the_model_sees():
    assert plan_chunks(2, 10, 6, 4, None) == [(4, 2), (4, 2), (2, 4)]  # default: fixed chunks of window - C
    assert plan_chunks(2, 10, 6, None, 3) == [(4, 2), (3, 3), (3, 3)]  # DFoT: c = min(L, done), h = window - c
    assert plan_chunks(1, 7, 6, 2, -1) == [(2, 1), (2, 3), (1, 5), (1, 5), (1, 5)]  # L = window - 1, chunk cap 2
    with pytest.raises(ValueError, match="history_frames"):
        plan_chunks(4, 3, 6, None, 3)  # the context must fit in L
    model = _random_model("sequence")  # window 6
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append((kwargs["frame_offset"], args[0].shape[1])),
                                    with_kwargs=True)
    rollout(model, torch.zeros(1, 2, 4), 10, schedule="full_sequence", num_inference_steps=1, kv_cache=None,
            history_frames=3, generator=torch.Generator().manual_seed(0))
    assert seen == [(0, 6), (3, 6), (6, 6)]  # (first frame seen, frames seen) per chunk: history + chunk


def test_x0_clamping_is_configurable():
    model = _random_model("video")
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(50.0)
    context = torch.zeros(1, 1, *model.frame_shape)
    run = lambda clip: rollout(model, context, 1, num_inference_steps=2, clip_denoised=clip,
                               generator=torch.Generator().manual_seed(0))[:, 1]
    assert float(run(1.0).abs().max()) <= 1.0 < float(run(None).abs().max())
    for clip, expected in ((0.0, None), (1.0, 1.0)):
        cfg = DiffusionForcingConfig(num_frames=4, image_size=8, hidden_size=32, depth=1, num_heads=2, dataset_size=2,
                                     clip_denoised=clip)
        family = DiffusionForcingFamily(cfg)
        captured = {}
        import genmod.diffusion_forcing.family as family_module

        original = family_module.rollout
        family_module.rollout = lambda m, ctx, n, settings, **kw: captured.setdefault("s", settings)
        try:
            family.rollout(model, context, 1, torch.Generator())
        finally:
            family_module.rollout = original
        assert captured["s"].clip_denoised == expected and captured["s"].stabilization == "v1.5"
