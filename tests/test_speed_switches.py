"""Speed switches of the trainer (docs/scale/speed.md): ``--compile`` equals the eager run,
``--gradient_checkpointing`` gives the same loss, gradients and generator draws for every transformer
family, bf16 autocast stays close to fp32 with quantizer distances in fp32, and ``--report_to``
picks Accelerate's tracker."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from genmod.train import ConfigError, Trainer, get_family, load_weights, parse_config, read_metrics
from genmod.train.batches import default_collate_fn

TINY = {  # the smallest config of each family (pixel space unless it needs a tokenizer)
    "flow": ["--dataset_size", "8", "--backbone", "dit", "--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--patch_size", "8",
             "--class_dropout_prob", "0.5"],
    "var": ["--dataset_size", "8", "--depth", "2", "--width", "32", "--num_heads", "2", "--drop_path_rate", "0.5",
            "--class_dropout_prob", "0.5"],
    "causalfusion": ["--dataset_size", "8", "--patch_size", "8", "--hidden_size", "32", "--depth", "2", "--num_heads", "2",
                     "--num_cond_tokens", "2"],
    "diffusion-forcing": ["--dataset", "oscillators", "--num_frames", "8", "--frame_stack", "2", "--hidden_size", "16",
                          "--depth", "2", "--num_heads", "2", "--dataset_size", "8"],
    "diffusion-forcing-unet": ["--backbone", "unet", "--image_size", "8", "--num_frames", "4", "--unet_channels", "8,16",
                               "--unet_temporal_levels", "1", "--unet_head_dim", "8", "--dataset_size", "8"],
    "latentlm": ["--dataset_size", "8", "--latent_stats_batches", "1", "--hidden_size", "32", "--depth", "2",
                 "--num_heads", "4", "--head_width", "32", "--head_depth", "1"],
    "tokenizer": ["--quantizer", "vq", "--codebook_size", "16", "--latent_channels", "4", "--base_channels", "8",
                  "--ch_mult", "1,2", "--dataset_size", "8"],
}
COMMON = ["--batch_size", "4", "--cpu", "--report_to", "none", "--num_preview", "0", "--sample_every", "0",
          "--log_every", "0", "--checkpoint_every", "0", "--seed", "3"]
TRANSFORMERS = ["flow", "var", "causalfusion", "diffusion-forcing", "diffusion-forcing-unet", "latentlm"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """A tiny msvq tokenizer (VAR, 32 px shapes -> 8x8) and a tiny sigma-VAE (LatentLM), saved."""
    from genmod.tokenizers_vq.models import SigmaVAE, VQTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    torch.manual_seed(1)
    VQTokenizer(quantizer="msvq", latent_channels=4, codebook_size=32, base_channels=8, ch_mult=(1, 2, 2),
                num_res_blocks=1, scales=[1, 2, 4, 8]).eval().save_pretrained(root / "msvq")
    SigmaVAE(modality="image", in_channels=3, base_channels=8, ch_mult=(1, 2), num_res_blocks=1,
             latent_channels=4).eval().save_pretrained(root / "vae")
    return {"var": ["--tokenizer", str(root / "msvq")], "latentlm": ["--tokenizer", str(root / "vae")]}


def make_family(name, tokenizer_dirs, out, *extra):
    import importlib

    from genmod.families import family_row

    importlib.import_module(family_row(name.replace("-unet", "")).module)  # registers the family
    registered = get_family(name.replace("-unet", ""))
    flags = [*TINY[name], *tokenizer_dirs.get(name, []), *COMMON, "--output_dir", str(out), *extra]
    return registered(parse_config(registered.config_class, flags))


def first_batch(family, n=4):
    dataset = family.build_dataset()
    return default_collate_fn()([dataset[i] for i in range(n)])


def loss_and_grads(family, model, batch, seed=5, saved=None):
    """The family's loss, gradients and the generator's state after backward, for one micro-batch;
    ``saved`` (a list) collects the tensors autograd keeps for backward outside checkpointed blocks."""
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(seed)
    saved = [] if saved is None else saved
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = family.loss(model, batch, generator)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, generator.get_state()


# ---------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_gradient_checkpointing_keeps_loss_grads_and_draws(name, tokenizer_dirs, tmp_path):
    family = make_family(name, tokenizer_dirs, tmp_path)
    batch = first_batch(family)
    torch.manual_seed(0)
    plain = family.build_model().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    saved_a, saved_b = [], []
    torch.manual_seed(7)  # DropPath modules draw from the global RNG; checkpointing restores it
    loss_a, grads_a, state_a = loss_and_grads(family, plain, batch, saved=saved_a)
    torch.manual_seed(7)
    loss_b, grads_b, state_b = loss_and_grads(family, checkpointed, batch, saved=saved_b)
    assert sum(saved_b) < 0.8 * sum(saved_a)  # the blocks' activations were not kept: recomputed in backward
    assert torch.equal(state_a, state_b)  # the recomputation left the trainer's generator where it was
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-5, atol=1e-6)


def test_plain_checkpointing_would_redraw_var_drop_path(tokenizer_dirs, tmp_path, monkeypatch):
    """The negative control: without replaying the generator, drop-path masks of the recomputation differ."""
    import genmod.var.transformer as var_transformer
    from genmod.nn import checkpoint_block

    family = make_family("var", tokenizer_dirs, tmp_path)
    batch = first_batch(family)
    torch.manual_seed(0)
    plain = family.build_model().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    monkeypatch.setattr(var_transformer, "checkpoint_block",
                        lambda enabled, fn, *args, generator=None: checkpoint_block(enabled, fn, *args))
    loss_a, grads_a, _ = loss_and_grads(family, plain, batch)
    loss_b, grads_b, _ = loss_and_grads(family, checkpointed, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)  # the forward is the same ...
    assert max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a) > 1e-4  # ... its gradient is not


def test_trainer_gradient_checkpointing_flag(tokenizer_dirs, tmp_path):
    runs = {}
    for flag in ([], ["--gradient_checkpointing"]):
        out = tmp_path / ("ckpt" if flag else "plain")
        family = make_family("var", tokenizer_dirs, out, "--max_steps", "2", *flag)
        trainer = Trainer(family.config, family)
        trainer.train()
        runs[bool(flag)] = [m["loss"] for m in read_metrics(str(out))]
        assert trainer.model.gradient_checkpointing is bool(flag)
    assert runs[True] == pytest.approx(runs[False], abs=1e-6)


def test_gradient_checkpointing_without_support_is_a_one_line_error(tokenizer_dirs, tmp_path):
    family = make_family("tokenizer", tokenizer_dirs, tmp_path, "--max_steps", "1", "--gradient_checkpointing")
    with pytest.raises(ConfigError, match=r"^--gradient_checkpointing: the tokenizer family's model \w+ does not "
                                          r"support gradient checkpointing$"):
        Trainer(family.config, family).train()


# ---------------------------------------------------------------------------------- compile
def test_compile_matches_eager_and_saves_plain_weights(tokenizer_dirs, tmp_path, monkeypatch):
    """TorchDynamo capture with the ``aot_eager`` backend (no C++ build: seconds, not a minute of cold
    Inductor compilation); benchmarks/speed_switches.py runs the default Inductor backend."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    runs = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flag else "eager")
        family = make_family("flow", tokenizer_dirs, out, "--max_steps", "3", "--ema_decay", "0.5", *flag)
        trainer = Trainer(family.config, family)
        summary = trainer.train()
        assert hasattr(trainer.model, "_orig_mod") is bool(flag)
        runs[bool(flag)] = ([m["loss"] for m in read_metrics(str(out))], load_weights(summary.final_model))
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs[False], runs[True]
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert compiled_weights.keys() == eager_weights.keys()  # no _orig_mod. prefixes in the export
    for key in eager_weights:
        torch.testing.assert_close(compiled_weights[key], eager_weights[key], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- bf16
# relative error of (loss, whole gradient) under bf16 autocast vs fp32, measured max over 5 seeds x ~10
# (docs/scale/speed.md); the tokenizer's codes flip between near-tied codebook entries of a random init
BF16_TOLERANCE = {"flow": (2e-4, 0.03), "var": (3e-4, 0.03), "causalfusion": (2e-4, 0.03),
                  "diffusion-forcing": (1e-3, 0.03), "diffusion-forcing-unet": (1e-3, 0.05), "latentlm": (2e-4, 0.03),
                  "tokenizer": (0.15, None)}


def perturbed(model, seed=0, scale=0.02):
    """``model`` with N(0, scale^2) added to every weight: zero-initialised output layers (adaLN-Zero)
    would make the first loss independent of the precision."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(BF16_TOLERANCE))
def test_bf16_autocast_loss_is_close_to_fp32(name, tokenizer_dirs, tmp_path):
    family = make_family(name, tokenizer_dirs, tmp_path)
    batch = first_batch(family)
    model = perturbed(family.build_model().train())
    loss32, grads32, _ = loss_and_grads(family, model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Accelerator(mixed_precision="bf16").autocast() does on CPU
        loss16, grads16, _ = loss_and_grads(family, model, batch)
    assert torch.isfinite(loss16) and all(torch.isfinite(g).all() for g in grads16.values())
    loss_tolerance, grad_tolerance = BF16_TOLERANCE[name]
    relative = abs(loss16.item() - loss32.item()) / abs(loss32.item())
    assert relative < loss_tolerance, relative
    if grad_tolerance is not None:
        error = sum((grads16[k] - grads32[k]).norm() ** 2 for k in grads32) ** 0.5
        assert error / sum(g.norm() ** 2 for g in grads32.values()) ** 0.5 < grad_tolerance


def test_vq_distances_stay_fp32_under_bf16_autocast(monkeypatch):
    import genmod.tokenizers_vq.quantizers.vector_quantizer as vq_module
    from genmod.tokenizers_vq.quantizers import VectorQuantizer

    seen = []
    original = vq_module.nearest_codes

    def recording(e, codes, *args):
        indices, sq_err = original(e, codes, *args)
        seen.append((e.dtype, codes.dtype, sq_err.dtype, torch.is_autocast_enabled("cpu")))
        return indices, sq_err

    monkeypatch.setattr(vq_module, "nearest_codes", recording)
    torch.manual_seed(0)
    quantizer = VectorQuantizer(codebook_size=16, dim=4)
    z = torch.randn(2, 8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert seen == [(torch.float32, torch.float32, torch.float32, False)]
    assert out.z_q.dtype == torch.float32 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.z_q, quantizer.indices_to_codes(out.indices))


def test_trainer_bf16_steps_stay_close_to_fp32(tokenizer_dirs, tmp_path):
    runs = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        family = make_family("flow", tokenizer_dirs, out, "--max_steps", "3", "--mixed_precision", precision)
        Trainer(family.config, family).train()
        runs[precision] = [m["loss"] for m in read_metrics(str(out))]
    assert all(map(torch.isfinite, torch.tensor(runs["bf16"])))
    assert runs["bf16"] == pytest.approx(runs["no"], rel=0.02)


# ---------------------------------------------------------------------------------- trackers
def _run_toy(out, *flags):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trainer import Points, ToyConfig, ToyFamily

    config = parse_config(ToyConfig, ["--cpu", "--max_steps", "2", "--batch_size", "4", "--checkpoint_every", "0",
                                      "--sample_every", "0", "--log_every", "1", "--output_dir", str(out), *flags])
    Trainer(config, ToyFamily(config), Points()).train()
    return config


def _event_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_is_the_default_and_logs_the_metrics(tmp_path):
    config = _run_toy(tmp_path)
    assert config.report_to == "tensorboard" and config.trackers() == ["tensorboard"]
    scalars = _event_scalars(tmp_path / "logs")
    losses = [m["loss"] for m in read_metrics(str(tmp_path))]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses, rel=1e-6)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]


@pytest.mark.parametrize("flags", [["--report_to", "none"], ["--no-tensorboard"]])
def test_report_to_none_writes_no_logs(tmp_path, flags):
    config = _run_toy(tmp_path, *flags)
    assert config.trackers() == [] and not (tmp_path / "logs").exists() and not (tmp_path / "wandb").exists()
    assert len(read_metrics(str(tmp_path))) == 2


def test_old_saved_tensorboard_field_still_loads(tmp_path):
    from genmod.train import TrainConfig, load_config

    (tmp_path / "c.json").write_text('{"tensorboard": false, "max_steps": 3}')
    config = load_config(TrainConfig, tmp_path / "c.json")
    assert config.trackers() == [] and config.max_steps == 3


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_wandb_without_wandb_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^--report_to wandb: the wandb package is not installed"):
        _run_toy(tmp_path, "--report_to", "wandb")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install 'genmod[wandb]')")
def test_report_to_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run_toy(tmp_path, "--report_to", "wandb")
    runs = [n for n in os.listdir(tmp_path / "wandb") if n.startswith("offline-run-")]
    assert len(runs) == 1 and any(n.endswith(".wandb") for n in os.listdir(tmp_path / "wandb" / runs[0]))
    assert not (tmp_path / "logs").exists()
