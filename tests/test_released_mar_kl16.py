"""MAR's KL-16 VAE (LTH14/mar at fe470ac, ``models/vae.py``) through ``genmod import mar-kl16``: the official outputs, reproduced.

Fixtures (tests/fixtures/mar_kl16/README.md) come from the official code with random, perturbed weights at
a tiny width (ch 4, 2 GroupNorm groups) and the released layout (ch_mult (1, 1, 2, 2, 4), 2 blocks a level,
encoder attention at the lowest level, mid attention, none in the decoder's up levels, 16 latent channels).
MAR and CausalFusion train on ``posterior.sample() * 0.2325`` and decode ``vae.decode(z / 0.2325)``.
"""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from genmod.cli import main
from genmod.importers import IMPORTERS
from genmod.importers.cli import main as import_main
from genmod.importers.files import ImportError_, load_state_dict
from genmod.importers.mar_kl16 import build_vae, kl16_config, map_kl16_state_dict
from genmod.tokenizers_vq.models import DiffusersAutoencoderKL, load_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "mar_kl16")
CKPT = os.path.join(FIXTURES, "kl16_tiny.ckpt")


@pytest.fixture(scope="module")
def official():
    with open(os.path.join(FIXTURES, "fixture.json")) as f:
        info = json.load(f)
    return load_state_dict(CKPT, key="model"), load_file(os.path.join(FIXTURES, "outputs.safetensors")), info


@pytest.fixture(scope="module")
def vae(official):
    return build_vae(CKPT, official[0], norm_num_groups=official[2]["norm_num_groups"])


def _check_against_official(tokenizer, out, info):
    with torch.no_grad():
        moments = AutoencoderKL.encode(tokenizer, out["image"]).latent_dist.parameters
        assert torch.allclose(moments, out["moments"], atol=1e-5)                        # official posterior.parameters
        assert torch.allclose(tokenizer.encode(out["image"]), out["mean"] * info["scale"], atol=1e-5)
        drawn = tokenizer.encode(out["image"], sample=True, generator=torch.Generator().manual_seed(info["sample_seed"]))
        assert torch.allclose(drawn, out["tokens"], atol=1e-5)                           # posterior.sample() * 0.2325
        assert torch.allclose(tokenizer.decode(out["latent"]), out["decoded"], atol=1e-5)  # vae.decode(z / 0.2325)


def test_sizes_and_attention_placement_come_from_the_keys(official, vae):
    cfg = vae.config
    assert list(cfg.block_out_channels) == [4, 4, 8, 8, 16] and cfg.layers_per_block == 2 and cfg.latent_channels == 16
    assert list(cfg.down_block_types) == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert list(cfg.up_block_types) == ["UpDecoderBlock2D"] * 5 and cfg.mid_block_add_attention
    assert (cfg.scaling_factor, cfg.norm_num_groups, vae.downsample_factor) == (0.2325, 2, 16)
    assert len(official[0]) == len(vae.state_dict()) == 312  # every official tensor has one place


def test_encode_sample_and_decode_match_the_official_vae(official, vae):
    _, out, info = official
    _check_against_official(vae, out, info)
    assert out["tokens"].shape == (2, 16, 3, 3)  # stride 16: 48 px -> 3 x 3 latents


def test_import_writes_a_tokenizer_folder_that_reloads_and_round_trips(tmp_path, official):
    _, out, info = official
    folder = tmp_path / "kl16"
    assert main(["import", "mar-kl16", CKPT, "--norm_num_groups", "2", "--out", str(folder)]) == 0
    tokenizer = load_tokenizer(str(folder))
    assert isinstance(tokenizer, DiffusersAutoencoderKL) and tokenizer.config.modality == "image"
    _check_against_official(tokenizer, out, info)
    tokenizer.save_pretrained(tmp_path / "again")
    again = load_tokenizer(str(tmp_path / "again"))
    plain = AutoencoderKL.from_pretrained(str(folder))  # still a plain diffusers folder
    with torch.no_grad():
        assert torch.equal(again.encode(out["image"]), tokenizer.encode(out["image"]))
        assert torch.equal(again.decode(out["latent"]), tokenizer.decode(out["latent"]))
        assert torch.allclose(plain.decode(out["latent"] / 0.2325).sample, out["decoded"], atol=1e-5)
    assert main(["import", "mar-kl16", CKPT, "--norm_num_groups", "2", "--scaling-factor", "0.5", "--out", str(folder)]) == 0
    with torch.no_grad():
        assert torch.allclose(load_tokenizer(str(folder)).encode(out["image"]), out["mean"] * 0.5, atol=1e-5)


def test_genmod_tokenize_caches_the_imported_vae_latents(tmp_path):
    from genmod.data import get_dataset

    assert main(["import", "mar-kl16", CKPT, "--norm_num_groups", "2", "--out", str(tmp_path / "kl16")]) == 0
    assert main(["tokenize", str(tmp_path / "kl16"), "--dataset", "shapes", "--num_samples", "3", "--batch_size", "2",
                 "--out", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    cached = load_file(os.path.join(tmp_path, "cache", "shard-00000.safetensors"))["latents"]
    dataset = get_dataset("shapes", split="train")
    with torch.no_grad():
        expected = load_tokenizer(str(tmp_path / "kl16")).encode(torch.stack([dataset[i]["image"] for i in range(3)]))
    assert cached.shape == (3, 16, 2, 2)  # 32 px shapes at stride 16
    assert torch.allclose(cached, expected, atol=1e-6)


def test_released_size_has_the_official_parameter_count(official):
    counts = official[2]["kl16_parameters"]
    state = {k: torch.empty(shape, device="meta") for k, shape in counts["shapes"].items()}  # official layout
    config = kl16_config("kl16.ckpt", state)
    assert list(config["block_out_channels"]) == [128, 128, 256, 256, 512] and config["latent_channels"] == 16
    with torch.device("meta"):
        model = DiffusersAutoencoderKL(**config)
    assert sum(p.numel() for p in model.parameters()) == counts["total"] == 66_456_019
    assert sum(p.numel() for p in model.encoder.parameters()) == counts["encoder"]
    mapped = map_kl16_state_dict(state)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_wrong_files_are_one_line_errors(tmp_path, official, capsys):
    def write(name, state):
        torch.save({"model": state}, tmp_path / name)
        return str(tmp_path / name)

    z = torch.zeros(1)
    cases = [(write("var.pth", {"quantize.embedding.weight": z, "encoder.conv_in.weight": z}),
              r"not a mar-kl16 checkpoint .*looks like a var checkpoint \(genmod import var"),
             (write("mar.pth", {"diffloss.net.weight": z}), r"looks like a MAR generator checkpoint \(checkpoint-last.pth\)"),
             (write("diffusers.pt", {"encoder.down_blocks.0.resnets.0.conv1.weight": z}), r"diffusers AutoencoderKL already"),
             (str(tmp_path / "kl16.ckpt"), r"VAE_CKPT: no such file .*dropbox.com/.*kl16.ckpt.*util/download.py")]
    for path, message in cases:
        with pytest.raises(ImportError_, match=message) as err:
            import_main(["mar-kl16", path, "--out", str(tmp_path / "o")])
        assert "\n" not in str(err.value)
    bad = dict(official[0])
    bad.pop("decoder.up.2.block.1.conv2.bias")
    with pytest.raises(ImportError_, match=r"not a mar-kl16 checkpoint: 1 keys missing, 0 unexpected"):
        build_vae("x.ckpt", bad, norm_num_groups=2)
    with pytest.raises(ImportError_, match=r"^--norm_num_groups: 32 does not divide the widths \[4, 4, 8, 8, 16\]$"):
        build_vae("x.ckpt", official[0])
    with pytest.raises(ImportError_, match=r"^--scaling_factor: must be > 0, got 0.0$"):
        import_main(["mar-kl16", CKPT, "--scaling_factor", "0", "--out", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o") and "mar-kl16" in IMPORTERS
    assert main(["import", "mar-kl16", str(tmp_path / "kl16.ckpt"), "--out", str(tmp_path / "o")]) == 2  # the CLI: one line
    assert capsys.readouterr().err.startswith("genmod import: error: VAE_CKPT: no such file")
