"""``genmod train X`` end to end: the time budget, a family's after-training evaluation, the scripts,
and the tokenizer's GAN delay across resumes (discriminator state checkpointed by the trainer)."""

import json
import os
import runpy
import sys

import pytest
import torch

from genmod.cli import main as cli_main
from genmod.train import Trainer, load_weights, parse_config, read_metrics, run_family
from genmod.train.checkpoint import load_training_state

FLOW_FLAGS = ["--dataset", "shapes", "--dataset_size", "16", "--batch_size", "4", "--backbone", "dit", "--hidden_size", "32", "--depth", "1",
              "--num_heads", "2", "--cpu", "--no-tensorboard", "--num_preview", "0", "--sample_every", "0",
              "--log_every", "0", "--seed", "3"]


def _flags(out, *extra):
    return [*FLOW_FLAGS, "--output_dir", str(out), *extra]


def test_time_budget_stops_early_then_checkpoints_and_exports(tmp_path):
    import genmod.flow.family  # noqa: F401  (registers "flow", as the CLI does)

    summary = run_family("flow", _flags(tmp_path / "run", "--max_steps", "50", "--checkpoint_every", "0",
                                        "--time_budget_minutes", "1e-6"))
    # one step always runs; the budget ends the loop right after it
    assert summary.stopped_early and summary.final_step == 1
    assert [m["step"] for m in read_metrics(summary.output_dir)] == [1]
    assert summary.checkpoint.endswith("step-00000001")
    assert json.load(open(os.path.join(summary.checkpoint, "trainer_state.json")))["step"] == 1
    assert os.path.isfile(os.path.join(summary.pipeline, "model_index.json"))
    assert os.path.isfile(os.path.join(summary.final_model, "config.json"))
    # the budget is a per-run option: the saved config keeps max_steps, so --resume continues to it
    assert json.load(open(tmp_path / "run" / "train_config.json"))["max_steps"] == 50
    assert cli_main(["train", "flow", *_flags(tmp_path / "run", "--max_steps", "3", "--checkpoint_every", "0",
                                             "--resume", "latest")]) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_time_budget_off_runs_to_max_steps(tmp_path):
    import genmod.flow.family  # noqa: F401

    summary = run_family("flow", _flags(tmp_path / "run", "--max_steps", "2", "--checkpoint_every", "0"))
    assert not summary.stopped_early and summary.final_step == 2 and summary.evaluation is None
    assert not os.path.exists(tmp_path / "run" / "eval")


def test_negative_time_budget_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["train", "flow", *_flags(tmp_path / "run", "--time_budget_minutes", "-1")]) == 2
    assert "--time_budget_minutes: must be >= 0" in capsys.readouterr().err


def _run_script(name, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "scripts", name), run_name="__main__")
    return exit_info.value.code


def test_script_and_cli_give_the_same_run(tmp_path, monkeypatch):
    extra = ["--max_steps", "3", "--checkpoint_every", "2"]
    assert _run_script("train_flow.py", _flags(tmp_path / "script", *extra), monkeypatch) == 0
    assert cli_main(["train", "flow", *_flags(tmp_path / "cli", *extra)]) == 0
    configs = [json.load(open(tmp_path / d / "train_config.json")) for d in ("script", "cli")]
    assert [{k: v for k, v in c.items() if k != "output_dir"} for c in configs][0] == \
        {k: v for k, v in configs[1].items() if k != "output_dir"}
    assert read_metrics(tmp_path / "script") == read_metrics(tmp_path / "cli")  # losses, lr, grad norms: bitwise
    states = [json.load(open(tmp_path / d / "checkpoints" / "step-00000003" / "trainer_state.json"))
              for d in ("script", "cli")]
    assert states[0] == states[1]


# ------------------------------------------------------------------------------------------ tokenizer
TOKENIZER_FLAGS = ["--quantizer", "fsq", "--fsq_levels", "5,5,5", "--latent_channels", "3", "--base_channels", "8",
                   "--ch_mult", "1,2", "--dataset", "shapes", "--dataset_size", "8", "--batch_size", "4", "--cpu",
                   "--no-tensorboard", "--num_preview", "0", "--log_every", "0", "--seed", "1"]


def test_tokenizer_evaluate_runs_from_the_cli_path(tmp_path):
    import genmod.tokenizer  # noqa: F401  (registers "tokenizer", as the CLI does)
    from genmod.tokenizer import evaluate_tokenizer, load_eval_dataset
    from genmod.tokenizers_vq.models import load_tokenizer

    out = tmp_path / "tok"
    summary = run_family("tokenizer", [*TOKENIZER_FLAGS, "--output_dir", str(out), "--max_steps", "2",
                                       "--eval_samples", "6", "--checkpoint_every", "0"])
    written = json.load(open(out / "eval" / "metrics.json"))
    assert written == json.loads(json.dumps(summary.evaluation))
    assert written["steps"] == 2 and written["num_samples"] == 6 and not written["stopped_early"]
    assert (out / "eval" / "reconstructions.png").stat().st_size > 100
    # the numbers are evaluate_tokenizer's on the exported model and the eval split
    again = evaluate_tokenizer(load_tokenizer(summary.final_model), load_eval_dataset("shapes", "test", "image"),
                               str(tmp_path / "again"), num_samples=6)
    assert written["psnr"] == pytest.approx(again["psnr"], rel=1e-6)
    assert written["ssim"] == pytest.approx(again["ssim"], rel=1e-6)
    assert written["codebook_usage"] == again["codebook_usage"]


class _Kill(Exception):
    """Stands in for SIGKILL: raised by a callback after a checkpoint was written."""


def _gan_run(out, kill_at=None):
    from genmod.tokenizer import TokenizerConfig, TokenizerFamily

    flags = [*TOKENIZER_FLAGS, "--output_dir", str(out), "--max_steps", "6", "--checkpoint_every", "2",
             "--keep_last", "0", "--gan_weight", "0.5", "--gan_start", "3", "--disc_channels", "8", "--disc_layers",
             "2", "--eval_samples", "0"]
    if os.path.isdir(os.path.join(out, "checkpoints")):
        flags += ["--resume", "latest"]
    config = parse_config(TokenizerConfig, flags)
    family = TokenizerFamily(config)

    def kill(trainer, step, metrics):
        if step == kill_at:
            raise _Kill(step)

    try:
        Trainer(config, family, callbacks=[kill]).train()
    except _Kill:
        return None
    return family


def test_gan_delay_and_discriminator_survive_resume(tmp_path):
    """The discriminator starts at optimizer step ``gan_start`` (0-based; metrics step 4) whether or not the
    run was killed and resumed before it, and its weights and AdamW state come back from the checkpoint."""
    straight = _gan_run(tmp_path / "straight")
    # killed at step 3 (last checkpoint: 2, before the delay ends), then at step 5 (checkpoint 4, after)
    assert _gan_run(tmp_path / "resumed", kill_at=3) is None
    assert _gan_run(tmp_path / "resumed", kill_at=5) is None
    resumed = _gan_run(tmp_path / "resumed")
    for run in ("straight", "resumed"):
        metrics = read_metrics(tmp_path / run)
        assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
        assert [m["step"] for m in metrics if "d_loss" in m] == [4, 5, 6]
    # the checkpoint before the delay has no discriminator; the one after it has, with its optimizer
    ckpt = tmp_path / "resumed" / "checkpoints"
    assert load_training_state(str(ckpt / "step-00000002"))["family"] == {}
    family_state = load_training_state(str(ckpt / "step-00000004"))["family"]
    assert family_state["step"] == 4 and family_state["disc_optimizer"]["state"]
    assert not (tmp_path / "resumed" / "discriminator.safetensors").exists()  # no side file
    # resumed == uninterrupted: discriminator weights, its AdamW moments, tokenizer weights, losses
    for key, value in straight.discriminator.state_dict().items():
        assert torch.equal(value, resumed.discriminator.state_dict()[key]), key
    adam_a, adam_b = straight.disc_optimizer.state_dict()["state"], resumed.disc_optimizer.state_dict()["state"]
    assert adam_a.keys() == adam_b.keys()
    for index in adam_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(adam_a[index][name], adam_b[index][name])
    assert read_metrics(tmp_path / "straight") == read_metrics(tmp_path / "resumed")

    final = [load_weights(str(tmp_path / run / "checkpoints" / "step-00000006" / "model"))
             for run in ("straight", "resumed")]
