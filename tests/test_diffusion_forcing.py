"""Diffusion Forcing: per-frame noise levels, causality, scheduling matrices, KV cache, fused SNR,
pipeline round trip / CLI, and a trained model continuing an analytic damped oscillator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genmod.data.oscillators import OscillatorParams, damped_oscillation
from genmod.diffusion_forcing import (
    DiffusionForcingTransformer,
    DiffusionForcingUNet,
    autoregressive_matrix,
    full_sequence_matrix,
    fused_snr,
    fused_snr_weight,
    get_scheduling_matrix,
    level_times,
    pyramid_matrix,
    rollout,
    trapezoid_matrix,
    validate_scheduling_matrix,
)
from genmod.diffusion_forcing.family import DiffusionForcingConfig, DiffusionForcingFamily
from genmod.core.loss import min_snr_weight
from genmod.core.paths import get_path


def _random_model(modality="video", seed=0, **kw):
    """A small model with random (non-zero) weights everywhere, so every path through it matters.

    ``modality="unet"``: the conv backbone on video frames (temporal attention at both levels)."""
    torch.manual_seed(seed)
    if modality == "unet":
        args = dict(in_channels=3, sample_size=8, block_out_channels=(8, 16), temporal_attention_levels=(0, 1),
                    attention_head_dim=8, norm_num_groups=4, max_frames=6)
        args.update(kw)
        model = DiffusionForcingUNet(**args)
    else:
        args = dict(modality=modality, in_channels=3 if modality == "video" else 4, sample_size=8, patch_size=4,
                    hidden_size=32, depth=2, num_heads=2, max_frames=6)
        args.update(kw)
        model = DiffusionForcingTransformer(**args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# training: independent per-frame levels


def test_per_frame_noise_levels_are_independent_in_training():
    cfg = DiffusionForcingConfig(dataset="oscillators", num_frames=8, frame_stack=2, hidden_size=16, depth=1,
                                 num_heads=2, dataset_size=4)
    family = DiffusionForcingFamily(cfg)
    model = family.build_model()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    batch = {"sequence": torch.zeros(512, 16, 1), "label": torch.zeros(512, dtype=torch.long)}
    family.loss(model, batch, torch.Generator().manual_seed(0))
    t = seen[0] / 1000  # network timestep = 1000 t, one per frame
    assert t.shape == (512, 8)
    # marginals U[0, 1]: Kolmogorov-Smirnov distance small (critical value at 1e-3 for n=4096 is ~0.03)
    sorted_t = t.flatten().sort().values.double()
    ecdf = torch.arange(1, sorted_t.numel() + 1, dtype=torch.float64) / sorted_t.numel()
    assert (ecdf - sorted_t).abs().max() < 0.03
    # frames of one clip are uncorrelated (|r| < 0.15 for n = 512 at ~1e-3) and almost never equal
    corr = torch.corrcoef(t.T.double())
    off_diag = corr[~torch.eye(8, dtype=torch.bool)]
    assert off_diag.abs().max() < 0.15
    assert (t[:, 1:] != t[:, :1]).float().mean() > 0.99
    # the full-sequence baseline shares one level per clip; the same seed gives the same levels
    seen.clear()
    family.config.noise_level = "full_sequence"
    family.loss(model, batch, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], seen[0][:, :1].expand_as(seen[0]))
    family.config.noise_level = "random_all"
    seen.clear()
    family.loss(model, batch, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0] / 1000, t)


# ---------------------------------------------------------------------------------------------
# causality and the KV cache


@pytest.mark.parametrize("modality", ["video", "sequence", "unet"])
def test_future_frames_never_change_past_outputs(modality):
    model = _random_model(modality)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, *model.frame_shape, generator=gen)
    t = 1000 * torch.rand(2, 5, generator=gen)
    out = model(x, t).sample
    x2, t2 = x.clone(), t.clone()
    x2[:, 3:] = torch.randn(x2[:, 3:].shape, generator=gen)
    t2[:, 3:] = 1000 * torch.rand(2, 2, generator=gen)
    out2 = model(x2, t2).sample
    assert torch.equal(out[:, :3], out2[:, :3])  # bitwise: the mask removes the future exactly
    assert (out[:, 3:] - out2[:, 3:]).abs().max() > 1e-3  # and the future outputs do depend on their input
    # a frame's noise level is a per-frame condition: changing it changes that frame (and later ones) only
    t3 = t.clone()
    t3[:, 2] = 0.0
    out3 = model(x, t3).sample
    assert torch.equal(out[:, :2], out3[:, :2]) and (out[:, 2] - out3[:, 2]).abs().max() > 1e-3


@pytest.mark.parametrize("backbone", ["video", "unet"])
def test_kv_cache_forward_equals_full_forward_and_history_cut_drops_history(backbone):
    model = _random_model(backbone)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, *model.frame_shape, generator=gen)
    t = 1000 * torch.rand(2, 5, generator=gen)
    full = model(x, t).sample
    caches = model.make_kv_caches()
    model(x[:, :3], t[:, :3], kv_caches=caches, update_cache=True)
    cached = model(x[:, 3:], t[:, 3:], frame_offset=3, kv_caches=caches).sample
    torch.testing.assert_close(cached, full[:, 3:], atol=1e-5, rtol=1e-5)
    # history cut at 3 == running frames 3.. alone (rotary positions make the offset irrelevant)
    cut = model(x, t, history_cut=torch.tensor([3, 3])).sample
    alone = model(x[:, 3:], t[:, 3:], frame_offset=7).sample
    torch.testing.assert_close(cut[:, 3:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cut[:, :3], full[:, :3], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone", ["video", "unet"])
@pytest.mark.parametrize("schedule,chunk,frames", [("autoregressive", 1, 4), ("autoregressive", 1, 9), ("pyramid", 3, 7)])
def test_cached_rollout_equals_uncached(schedule, chunk, frames, backbone):
    """AR schedule with the KV cache == the uncached computation; 9 frames slide past the 6-frame window."""
    # the U-Net has one level here (speed); the two-level one is checked against its cache in the test above
    model = _random_model(backbone, **(dict(block_out_channels=(8,), temporal_attention_levels=(0,)) if backbone == "unet" else {}))
    context = torch.rand(2, 2, *model.frame_shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    outs = {}
    for mode in (None, "reencode", "incremental"):
        outs[mode] = rollout(model, context, frames, schedule=schedule, chunk_size=chunk, num_inference_steps=4,
                             kv_cache=mode, generator=torch.Generator().manual_seed(4), guidance_scale=1.5)
    assert outs[None].shape == (2, 2 + frames, *model.frame_shape)
    assert torch.equal(outs[None][:, :2], context)  # context frames are never overwritten
    torch.testing.assert_close(outs["reencode"], outs[None], atol=1e-5, rtol=1e-5)
    if 2 + frames <= model.config.max_frames:  # incremental == exact while the rollout fits in the window
        torch.testing.assert_close(outs["incremental"], outs[None], atol=1e-5, rtol=1e-5)
    else:
        assert torch.isfinite(outs["incremental"]).all()


def test_history_guidance_scale_one_is_no_guidance_and_scale_changes_output():
    model = _random_model("sequence")
    context = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(5))
    run = lambda **kw: rollout(model, context, 3, schedule="pyramid", num_inference_steps=3, kv_cache=None,
                               generator=torch.Generator().manual_seed(6), **kw)
    plain = run()
    torch.testing.assert_close(run(guidance_scale=1.0, history_guidance="drop"), plain)
    for kind in ("noise", "drop"):
        assert (run(guidance_scale=3.0, history_guidance=kind) - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# scheduling matrices


@pytest.mark.parametrize("levels,horizon,slope", [(5, 1, 1.0), (10, 4, 1.0), (8, 6, 2.5), (3, 7, 0.5)])
def test_scheduling_matrices_are_monotone_and_end_clean(levels, horizon, slope):
    for matrix in (pyramid_matrix(levels, horizon, slope), full_sequence_matrix(levels, horizon),
                   autoregressive_matrix(levels, horizon), trapezoid_matrix(levels, horizon, slope)):
        assert (matrix[0] == levels).all() and (matrix[-1] == 0).all()
        assert (matrix[1:] <= matrix[:-1]).all()
        assert ((matrix[1:] != matrix[:-1]).any(dim=1)).all()  # no idle rows: every step updates a frame
        validate_scheduling_matrix(matrix, levels, horizon)
    pyramid = pyramid_matrix(levels, horizon, slope)
    for m in range(pyramid.shape[0]):
        for t in range(horizon):  # the DF paper's definition, written out
            assert pyramid[m, t] == min(max(levels + math.floor(t * slope) - m, 0), levels)
    assert pyramid.shape[0] == levels + math.floor((horizon - 1) * slope) + 1
    full = full_sequence_matrix(levels, horizon)
    assert (full == full[:, :1]).all() and full.shape[0] == levels + 1
    ar = autoregressive_matrix(levels, horizon)
    for t in range(1, horizon):  # a frame starts only once the previous one is clean
        started = (ar[:, t] < levels).nonzero()[0, 0]
        assert ar[started - 1, t - 1] == 0


def test_user_matrices_are_validated_and_levels_map_to_times():
    user = [[2, 2], [1, 2], [0, 1], [0, 0]]
    assert torch.equal(get_scheduling_matrix(user, 2, 2), torch.tensor(user))
    for bad, message in (([[2, 2], [2, 1], [1, 2], [0, 0]], "never increase"), ([[2, 2], [1, 1]], "last row"),
                         ([[1, 2], [0, 0]], "first row"), ([[2, 3], [0, 0]], "levels must lie")):
        with pytest.raises(ValueError, match=message):
            get_scheduling_matrix(bad, 2, 2)
    with pytest.raises(ValueError, match="schedule"):
        get_scheduling_matrix("spiral", 4, 2)
    torch.testing.assert_close(level_times(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# loss weights


def test_fused_snr_matches_reference_recursion_and_reduces_to_min_snr():
    path = get_path("cosine")
    t = torch.rand(3, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.98 + 0.01
    gamma, decay = 5.0, 0.9
    snr = path.snr(t)
    # reference: the recursion written with plain Python floats
    for b in range(3):
        ema, prev = 0.0, 0.0
        for k in range(6):
            n = float(snr[b, k]) / gamma
            c = min(n, 1.0)
            expected = 1 - (1 - decay * prev) * (1 - n)
            assert float(fused_snr(snr, gamma, decay)[b, k]) == pytest.approx(expected, rel=1e-9)
            ema = c if k == 0 else decay * ema + (1 - decay) * c
            prev = ema
    fused = fused_snr(snr, gamma, decay)
    # closed forms of the reference code: x0 -> gamma min(f, 1); eps -> min(f, 1) / f; cosine velocity = (pi/2) DDPM-v
    torch.testing.assert_close(fused_snr_weight(path, t, gamma, decay, "x0"), gamma * fused.clamp(max=1))
    torch.testing.assert_close(fused_snr_weight(path, t, gamma, decay, "epsilon"), fused.clamp(max=1) / fused)
    ddpm_v = gamma * fused.clamp(max=1) / (gamma * fused + 1)
    torch.testing.assert_close(fused_snr_weight(path, t, gamma, decay, "velocity"), ddpm_v / (math.pi / 2) ** 2,
                               rtol=1e-5, atol=1e-8)
    # decay 0 (no memory of the past) is min-SNR per frame; a clean past makes noisy frames count more (x0 space)
    for space in ("x0", "epsilon", "velocity"):
        torch.testing.assert_close(fused_snr_weight(path, t, gamma, 0.0, space), min_snr_weight(path, t, gamma, space),
                                   rtol=1e-5, atol=1e-8)
    clean_past = torch.tensor([[0.01, 0.01, 0.01, 0.9]], dtype=torch.float64)
    noisy_past = torch.tensor([[0.99, 0.99, 0.99, 0.9]], dtype=torch.float64)
    assert fused_snr_weight(path, clean_past, gamma, 0.96, "x0")[0, -1] > fused_snr_weight(path, noisy_past, gamma, 0.96, "x0")[0, -1]


# ---------------------------------------------------------------------------------------------
# pipeline: save/load round trip and the CLI's GIF


def test_pipeline_round_trip_and_cli_gif(tmp_path):
    from PIL import Image

    from genmod.diffusion_forcing.pipeline import DiffusionForcingPipeline
    from genmod.pipelines import load_pipeline
    from genmod.sampling import main as sample_main

    model = _random_model("video")
    pipe = DiffusionForcingPipeline(transformer=model, schedule="pyramid", num_inference_steps=3)
    pipe.set_progress_bar_config(disable=True)
    context = torch.rand(2, 2, *model.frame_shape, generator=torch.Generator().manual_seed(8)) * 2 - 1
    first = pipe(context, num_frames=5, generator=[torch.Generator().manual_seed(i) for i in range(2)]).frames
    assert first.shape == (2, 5, 3, 8, 8) and first.min() >= 0 and first.max() <= 1
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(tmp_path / "pipe")
    assert isinstance(loaded, DiffusionForcingPipeline) and loaded.config.schedule == "pyramid"
    loaded.set_progress_bar_config(disable=True)
    again = loaded(context, num_frames=5, generator=[torch.Generator().manual_seed(i) for i in range(2)]).frames
    torch.testing.assert_close(again, first)
    # each sample is reproducible on its own with a per-sample generator
    single = loaded(context[1:], num_frames=5, generator=[torch.Generator().manual_seed(1)]).frames
    torch.testing.assert_close(single[0], first[1], atol=1e-5, rtol=1e-5)
    frames_np = loaded(context, num_frames=2, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames_np.shape == (2, 2, 8, 8, 3)
    with pytest.raises(ValueError, match="output_type"):
        loaded(context, num_frames=2, output_type="gif")
    out = tmp_path / "clip.gif"
    assert sample_main([str(tmp_path / "pipe"), "--num", "2", "--frames", "7", "--context", "2", "--schedule", "pyramid",
                        "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    gif = Image.open(out)
    assert gif.n_frames == 7


def test_unet_backbone_config_errors_and_save_load_round_trip(tmp_path):
    from genmod.diffusion_forcing.pipeline import DiffusionForcingPipeline
    from genmod.pipelines import load_pipeline

    with pytest.raises(ValueError, match="modality"):
        DiffusionForcingUNet(modality="sequence")
    for bad, match in ((dict(temporal_attention_levels=(2,)), "temporal_attention_levels"),
                       (dict(attention_head_dim=6), "attention_head_dim"), (dict(sample_size=7), "sample_size")):
        with pytest.raises(ValueError, match=match):
            _random_model("unet", **bad)
    model = _random_model("unet", num_classes=3)
    assert len(model.make_kv_caches()) == 7  # one per temporal layer: 1 + 1 down, 1 middle, 2 + 2 up
    with pytest.raises(ValueError, match="kv_caches"):
        model(torch.zeros(1, 2, 3, 8, 8), torch.zeros(1, 2), kv_caches=model.make_kv_caches()[:2])
    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    t, labels = torch.full((2, 4), 500.0), torch.tensor([0, 2])
    model.save_pretrained(tmp_path / "unet")
    loaded = DiffusionForcingUNet.from_pretrained(tmp_path / "unet").eval()
    assert torch.equal(loaded(x, t, labels).sample, model(x, t, labels).sample)
    # the pipeline saves and loads the U-Net under the same component name as the transformer
    pipe = DiffusionForcingPipeline(transformer=model, schedule="autoregressive", num_inference_steps=2, prediction="x0")
    pipe.set_progress_bar_config(disable=True)
    first = pipe(x[:, :2], num_frames=3, class_labels=labels, generator=torch.Generator().manual_seed(1)).frames
    pipe.save_pretrained(tmp_path / "pipe")
    again = load_pipeline(tmp_path / "pipe")
    assert isinstance(again.transformer, DiffusionForcingUNet)
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(again(x[:, :2], num_frames=3, class_labels=labels,
                                     generator=torch.Generator().manual_seed(1)).frames, first)


def test_train_cli_with_unet_backbone(tmp_path):
    """``genmod train diffusion-forcing --backbone unet`` trains, checkpoints, and reloads as a U-Net."""
    from genmod.cli import main
    from genmod.train import ConfigError, load_family_from_checkpoint

    out = tmp_path / "run"
    assert main(["train", "diffusion-forcing", "--backbone", "unet", "--dataset", "moving_shapes", "--dataset_size", "8",
                 "--num_frames", "4", "--image_size", "8", "--unet_channels", "8,16", "--unet_temporal_levels", "1",
                 "--unet_head_dim", "8", "--prediction", "x0", "--max_steps", "2", "--batch_size", "2", "--cpu",
                 "--no-tensorboard", "--sample_every", "2", "--num_preview", "2", "--preview_frames", "3",
                 "--num_inference_steps", "2", "--output_dir", str(out)]) == 0
    family, model = load_family_from_checkpoint(str(out))
    assert isinstance(model, DiffusionForcingUNet) and tuple(model.config.block_out_channels) == (8, 16)
    from genmod.pipelines import load_pipeline

    assert isinstance(load_pipeline(out / "pipeline").transformer, DiffusionForcingUNet)
    with pytest.raises(ConfigError, match="backbone"):
        DiffusionForcingConfig(dataset="oscillators", backbone="unet").validate()


# ---------------------------------------------------------------------------------------------
# a trained model continues an analytic damped oscillator past its training length

FREQ, DAMPING, DT, STACK, TRAIN_FRAMES = 1.0, 0.2, 0.1, 4, 8


def _oscillations(n: int, steps: int, rng) -> torch.Tensor:
    """x(t) = A exp(-0.2 t) cos(2 pi t + phi), random A and phi: ``(n, steps, 1)``."""
    out = [damped_oscillation(OscillatorParams(rng.uniform(0.5, 1.0, 1), np.array([DAMPING]), np.array([FREQ]),
                                               rng.uniform(0, 2 * np.pi, 1)), np.arange(steps) * DT) for _ in range(n)]
    return torch.tensor(np.stack(out), dtype=torch.float32)


@pytest.fixture(scope="module")
def trained_oscillator():
    cfg = DiffusionForcingConfig(dataset="oscillators", num_frames=TRAIN_FRAMES, frame_stack=STACK, prediction="x0",
                                 loss_weighting="fused_snr", context_noise=0.02, num_inference_steps=10)
    family = DiffusionForcingFamily(cfg)
    rng = np.random.default_rng(0)
    data = _oscillations(2048, TRAIN_FRAMES * STACK, rng)
    data = data + 0.02 * torch.randn(data.shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = DiffusionForcingTransformer(modality="sequence", in_channels=STACK, hidden_size=64, depth=2, num_heads=4,
                                        max_frames=TRAIN_FRAMES)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):  # large batches: the step cost of this tiny model is mostly overhead
        idx = torch.randint(0, len(data), (256,), generator=gen)
        loss = family.loss(model, {"sequence": data[idx]}, gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return family, model.eval(), rng


def test_trained_model_continues_damped_oscillator_past_training_length(trained_oscillator):
    family, model, rng = trained_oscillator
    context_frames, new_frames = 2, 10  # 12 frames = 1.5x the 8-frame training clips (sliding window)
    truth = _oscillations(64, (context_frames + new_frames) * STACK, rng)
    context = family.stack_frames(truth[:, :context_frames * STACK])
    out = family.rollout(model, context, new_frames, torch.Generator().manual_seed(1), schedule="autoregressive",
                         chunk_size=1)
    pred = family.unstack_frames(out)[:, context_frames * STACK:]
    target = truth[:, context_frames * STACK:]
    rmse = ((pred - target) ** 2).mean().sqrt().item()
    zero_rmse = (target**2).mean().sqrt().item()  # predicting the mean (0) of the signal
    assert rmse < 0.5 * zero_rmse, (rmse, zero_rmse)
    assert torch.isfinite(out).all()


def test_gradient_guidance_steers_the_x0_prediction(trained_oscillator):
    family, model, rng = trained_oscillator
    truth = _oscillations(16, 2 * STACK, rng)
    context = family.stack_frames(truth)
    target_loss = lambda x0: ((x0 - 1.0) ** 2).flatten(1).sum(1)  # gradient 2 (x0 - 1)
    run = lambda strength: family.rollout(model, context, 2, torch.Generator().manual_seed(2), schedule="pyramid",
                                          guidance_fn=target_loss, guidance_strength=strength)[:, 2:]
    free, guided = run(0.0), run(0.25)  # the last step lands halfway between x0_hat and the target
    assert target_loss(guided).mean() < 0.5 * target_loss(free).mean()


def test_gradient_guidance_through_the_network_lowers_the_loss():
    model = _random_model("sequence", depth=1)
    context = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(9))
    target_loss = lambda x0: ((x0 - 1.0) ** 2).flatten(1).mean(1)
    run = lambda strength: rollout(model, context, 2, path="linear", prediction="velocity", schedule="full_sequence",
                                   num_inference_steps=4, guidance_fn=target_loss, guidance_strength=strength,
                                   guidance_grad="x_t", generator=torch.Generator().manual_seed(3))[:, 2:]
    assert target_loss(run(1.0)).mean() < target_loss(run(0.0)).mean()


@pytest.mark.parametrize("field,value", [("kv_cache", "always"), ("guidance_grad", "eps"), ("history_guidance", "zero"),
                                         ("context_noise", 1.0), ("prediction", "score"), ("num_inference_steps", 0),
                                         ("window", 0), ("chunk_size", 0), ("clip_denoised", 0.0)])
def test_rollout_settings_reject_bad_values_naming_the_field(field, value):
    from genmod.diffusion_forcing import RolloutSettings

    with pytest.raises(ValueError, match=f"^{field}: "):
        RolloutSettings(**{field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):  # a keyword option is validated the same way
        rollout(_random_model("sequence"), torch.zeros(1, 1, 4), 1, **{field: value})
    with pytest.raises(TypeError, match="steps"):  # a keyword that is no field is named
        rollout(_random_model("sequence"), torch.zeros(1, 1, 4), 1, steps=3)


def test_rollout_settings_object_equals_keyword_options():
    from genmod.diffusion_forcing import RolloutSettings

    model = _random_model("sequence")
    context = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(5))
    settings = RolloutSettings(schedule="pyramid", num_inference_steps=3, guidance_scale=2.0, path="linear")
    a = rollout(model, context, 3, settings, generator=torch.Generator().manual_seed(6))
    b = rollout(model, context, 3, schedule="pyramid", num_inference_steps=3, guidance_scale=2.0, path="linear",
                generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
