"""A diffusers ``AutoencoderKL`` folder as a genmod tokenizer: diffusers' own numbers, training, caching."""

import math
import os

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from genmod.cli import main
from genmod.tokenizers_vq.models import DiffusersAutoencoderKL, load_tokenizer


def _save_vae(folder, **norm):
    """A tiny random AutoencoderKL (2 levels: 32 px -> 16 x 16 x 4) saved as diffusers saves SD-VAE."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, **norm)
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.mark.parametrize("norm", [{"scaling_factor": 0.18215},                        # SD-VAE: no shift
                                  {"scaling_factor": 0.3611, "shift_factor": 0.1159}])  # FLUX-VAE
def test_round_trip_is_diffusers_own_encode_and_decode(tmp_path, norm):
    reference = _save_vae(tmp_path, **norm)
    tokenizer = load_tokenizer(str(tmp_path))
    assert isinstance(tokenizer, DiffusersAutoencoderKL) and tokenizer.config.modality == "image"
    scale, shift = norm["scaling_factor"], norm.get("shift_factor", 0.0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = tokenizer.encode(x)
        expected = (reference.encode(x).latent_dist.mean - shift) * scale
        assert latents.shape == (2, 4, 16, 16)
        assert torch.allclose(latents, expected, atol=1e-6)
        assert torch.allclose(tokenizer.decode(latents), reference.decode(latents / scale + shift).sample, atol=1e-6)
        # sample=True draws the posterior sample of diffusers with the same generator
        drawn = tokenizer.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        dist = reference.encode(x).latent_dist
        assert torch.allclose(drawn, (dist.sample(torch.Generator().manual_seed(5)) - shift) * scale, atol=1e-6)


def test_a_saved_adapter_reloads_and_stays_a_diffusers_folder(tmp_path):
    _save_vae(tmp_path / "vae", scaling_factor=0.5)
    tokenizer = load_tokenizer(str(tmp_path / "vae"))
    tokenizer.save_pretrained(tmp_path / "again")
    again = load_tokenizer(str(tmp_path / "again"))
    plain = AutoencoderKL.from_pretrained(tmp_path / "again")  # diffusers still reads it
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.encode(x), tokenizer.encode(x))
        assert torch.equal(plain.encode(x).latent_dist.mean * 0.5, tokenizer.encode(x))


def test_flow_trains_on_its_latents_and_exports_a_pipeline_that_decodes(tmp_path):
    import genmod.flow.family  # noqa: F401  (registers "flow", as the CLI does)
    from genmod.flow.pipeline import FlowMatchingPipeline
    from genmod.train import read_metrics, run_family

    _save_vae(tmp_path / "vae", scaling_factor=0.18215)
    summary = run_family("flow", ["--dataset", "shapes", "--dataset_size", "8", "--batch_size", "4", "--backbone", "dit", "--hidden_size", "32",
                                  "--depth", "1", "--num_heads", "2", "--patch_size", "2", "--cpu", "--no-tensorboard",
                                  "--num_preview", "0", "--sample_every", "0", "--log_every", "1", "--seed", "3",
                                  "--max_steps", "2", "--checkpoint_every", "0", "--tokenizer", str(tmp_path / "vae"),
                                  "--output_dir", str(tmp_path / "run")])
    losses = [m["loss"] for m in read_metrics(summary.output_dir)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    pipe = FlowMatchingPipeline.from_pretrained(summary.pipeline)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, DiffusersAutoencoderKL) and pipe.transformer.config.in_channels == 4
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_genmod_tokenize_caches_its_latents(tmp_path):
    from genmod.data import get_dataset

    _save_vae(tmp_path / "vae", scaling_factor=0.18215)
    out = tmp_path / "cache"
    assert main(["tokenize", str(tmp_path / "vae"), "--dataset", "shapes", "--num_samples", "3", "--batch_size", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    cached = load_file(os.path.join(out, "shard-00000.safetensors"))["latents"]
    dataset = get_dataset("shapes", split="train")
    tokenizer = load_tokenizer(str(tmp_path / "vae"))
    with torch.no_grad():
        expected = tokenizer.encode(torch.stack([dataset[i]["image"] for i in range(3)]))
    assert cached.shape == (3, 4, 16, 16)
    assert torch.allclose(cached, expected, atol=1e-6)


def test_latentlm_trains_on_its_latents_and_samples_images(tmp_path):
    """LatentLM takes any continuous tokenizer (issue 16: KL autoencoders for flow / CausalFusion / LatentLM)."""
    import genmod.latentlm.family  # noqa: F401  (registers "latentlm", as the CLI does)
    from genmod.pipelines import load_pipeline
    from genmod.train import read_metrics, run_family

    _save_vae(tmp_path / "vae", scaling_factor=0.18215)
    summary = run_family("latentlm", [
        "--dataset", "shapes", "--dataset_size", "8", "--batch_size", "4", "--hidden_size", "32", "--depth", "1",
        "--num_heads", "4", "--head_width", "32", "--head_depth", "1", "--latent_patch_size", "4", "--cpu",
        "--report_to", "none", "--num_preview", "0", "--sample_every", "0", "--log_every", "1", "--seed", "3",
        "--max_steps", "2", "--checkpoint_every", "0", "--tokenizer", str(tmp_path / "vae"),
        "--output_dir", str(tmp_path / "run")])
    losses = [m["loss"] for m in read_metrics(summary.output_dir)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    pipe = load_pipeline(summary.pipeline)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, DiffusersAutoencoderKL)
    images = pipe(prompt="a red circle", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("family_name", ["flow", "causalfusion"])
@pytest.mark.parametrize("latent_sample", [True, False])
def test_image_families_train_on_posterior_samples_as_dit_and_mar_do(tmp_path, family_name, latent_sample):
    """Flow and CausalFusion encode each batch with ``latent_dist.sample()`` on the trainer's generator (the
    DiT / SiT / MAR / CausalFusion trainings); ``--no-latent_sample`` keeps the posterior mean."""
    import genmod.causalfusion.family  # noqa: F401
    import genmod.flow.family  # noqa: F401
    from genmod.train import get_family, parse_config

    _save_vae(tmp_path / "vae", scaling_factor=0.5)
    entry = get_family(family_name)
    flags = ["--dataset", "shapes", "--dataset_size", "4", "--tokenizer", str(tmp_path / "vae"), "--cpu",
             "--output_dir", str(tmp_path / "run")] + ([] if latent_sample else ["--no-latent_sample"])
    family = entry.factory(parse_config(entry.config_class, flags))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    got = family.clean_data({"image": x}, torch.Generator().manual_seed(7))
    with torch.no_grad():
        mean = family.tokenizer.encode(x)
        drawn = family.tokenizer.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, drawn if latent_sample else mean)
    assert (got - mean).abs().max() > 1e-4 if latent_sample else True
    assert torch.equal(family.clean_data({"image": x}), mean)  # no generator (data_shape, previews): the mean
