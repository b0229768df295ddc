"""``--init_weights``: fine-tuning starts from a model folder or a pipeline folder (e.g. one `genmod import` wrote)."""

import json

import pytest
import torch

import genmod.flow.family  # noqa: F401  (registers "flow", as the CLI does)
from genmod.train import CheckpointError, load_weights, run_family

TINY = ["--dataset", "shapes", "--dataset_size", "8", "--batch_size", "4", "--backbone", "dit", "--hidden_size", "32", "--depth", "1",
        "--num_heads", "2", "--patch_size", "8", "--cpu", "--report_to", "none", "--num_preview", "0",
        "--sample_every", "0", "--log_every", "1", "--seed", "3", "--checkpoint_every", "0",
        "--warmup_steps", "0"]  # the lr acts from step 1 (flow's default warms up over 100 steps since issue 19)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    return run_family("flow", [*TINY, "--max_steps", "2", "--lr", "1e-2", "--ema_decay", "0", "--output_dir", str(out)])


def test_a_run_starts_from_a_pipeline_folders_generator(pretrained, tmp_path):
    # a vanishing lr (1e-30) and no EMA: the fine-tuned model must still be the pipeline's transformer
    summary = run_family("flow", [*TINY, "--max_steps", "1", "--lr", "1e-30", "--ema_decay", "0",
                                  "--init_weights", pretrained.pipeline, "--output_dir", str(tmp_path / "tuned")])
    start = load_weights(f"{pretrained.pipeline}/transformer")
    tuned = load_weights(f"{summary.pipeline}/transformer")
    assert start.keys() == tuned.keys()
    for key in start:
        torch.testing.assert_close(tuned[key], start[key], rtol=1e-6, atol=1e-20)
    fresh = load_weights(f"{run_family('flow', [*TINY, '--max_steps', '1', '--lr', '1e-30', '--ema_decay', '0', '--output_dir', str(tmp_path / 'fresh')]).pipeline}/transformer")
    assert any((fresh[k] - start[k]).abs().max() > 1e-3 for k in start)  # without the flag: a different start


def test_a_different_architecture_is_one_line_naming_the_field(pretrained, tmp_path):
    with pytest.raises(CheckpointError, match=r"^--init_weights: .*transformer does not fit the configured "
                                              r"FlowTransformer: hidden_size: 32 != 64 \(pass the same flags"):
        run_family("flow", [*TINY, "--max_steps", "1", "--hidden_size", "64", "--init_weights", pretrained.pipeline,
                            "--output_dir", str(tmp_path / "wrong")])


def test_released_model_conventions_are_flags_so_an_import_can_be_fine_tuned(tmp_path):
    """A SiT import sets learn_sigma / time_convention / guidance_channels; the same flags rebuild that model."""
    sit = ["--learn_sigma", "--time_convention", "sit", "--guidance_channels", "2"]
    first = run_family("flow", [*TINY, *sit, "--max_steps", "1", "--ema_decay", "0", "--output_dir", str(tmp_path / "a")])
    config = json.load(open(f"{first.pipeline}/transformer/config.json"))
    assert (config["learn_sigma"], config["time_convention"], config["guidance_channels"]) == (True, "sit", 2)
    tuned = run_family("flow", [*TINY, *sit, "--max_steps", "1", "--lr", "1e-30", "--ema_decay", "0",
                                "--init_weights", first.pipeline, "--output_dir", str(tmp_path / "b")])
    start, end = load_weights(f"{first.pipeline}/transformer"), load_weights(f"{tuned.pipeline}/transformer")
    assert config["in_channels"] == 3 and start["final_layer.linear.weight"].shape[0] == 8 * 8 * 2 * 3  # 2C outputs
    for key in start:
        torch.testing.assert_close(end[key], start[key], rtol=1e-6, atol=1e-20)


def test_a_dit_pipeline_into_the_default_unet_names_the_backbone_flag(pretrained, tmp_path):
    with pytest.raises(CheckpointError, match=r"^--init_weights: .* has no FlowUNet component .*--backbone dit"):
        run_family("flow", [*TINY, "--backbone", "unet", "--max_steps", "1", "--init_weights", pretrained.pipeline,
                            "--output_dir", str(tmp_path / "unet")])
