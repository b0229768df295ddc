"""SiT (willisma/SiT at 947f95b) through ``genmod import sit``: the official outputs, reproduced.

Fixtures (tests/fixtures/sit/README.md) come from the official code with random, perturbed weights.
genmod's convention is kept at the model's edge (``time_convention="sit"``): genmod's velocity is
minus SiT's, at genmod time ``t = 1 - t_SiT``.
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genmod.cli import main
from genmod.flow.pipeline import FlowMatchingPipeline
from genmod.flow.scheduler import FlowMatchSolverScheduler
from genmod.flow.transformer import FlowTransformer
from genmod.importers.files import ImportError_
from genmod.importers.sit import build_transformer, load_vae, map_sit_state_dict, run, sit_config
from genmod.samplers import combine_guidance, sample_sde

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sit")
SIZES = {"SiT-S/2": (12, 384, 6), "SiT-B/2": (12, 768, 12), "SiT-L/2": (24, 1024, 16), "SiT-XL/2": (28, 1152, 16)}


@pytest.fixture(scope="module")
def official():
    state = load_file(os.path.join(FIXTURES, "sit_tiny.safetensors"))
    with open(os.path.join(FIXTURES, "fixture.json")) as f:
        info = json.load(f)
    return state, load_file(os.path.join(FIXTURES, "outputs.safetensors")), info


@pytest.fixture(scope="module")
def model(official):
    return build_transformer("sit_tiny", official[0], num_heads=4)


def _pipe(model, solver):
    pipe = FlowMatchingPipeline(model, FlowMatchSolverScheduler(solver=solver))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sizes_and_conventions_come_from_the_keys(official, model):
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.sample_size, cfg.num_classes) == (2, 64, 2, 4, 8, 10)
    assert cfg.learn_sigma and cfg.time_convention == "sit" and cfg.guidance_channels == 3
    # every official tensor is used: 2 x (qkv weight, bias) split in three, pos_embed dropped
    assert len(official[0]) - 1 + 2 * 2 * 2 == len(model.state_dict())


def test_velocity_and_learned_sigma_match_the_official_network(official, model):
    _, out, _ = official
    with torch.no_grad():
        pred = model(out["x"], 1000 * (1 - out["t_sit"]), out["y"]).sample
    assert pred.shape == (3, 8, 8, 8)
    assert torch.allclose(pred[:, :4], -out["velocity"], atol=1e-5)          # genmod v = -v_SiT
    assert torch.allclose(pred[:, 4:], out["full_output"][:, 4:], atol=1e-5)  # the unused sigma channels


def test_cfg_guides_the_first_three_channels_as_forward_with_cfg(official, model):
    _, out, info = official
    pipe, w = _pipe(model, "euler"), info["cfg_scale"]
    # the pipeline's CFG, one row at a time (the fixture's rows have their own t; row 3 is the null class)
    guided = torch.cat([pipe.guided_output(out["x"][i:i + 1], 1000 * (1 - out["t_sit"][i]), out["y"][i:i + 1], (w, None))
                        for i in range(3)])
    assert guided.shape == (3, 4, 8, 8)
    assert torch.allclose(guided, -out["cfg_output"], atol=1e-5)
    with torch.no_grad():  # guiding all four channels is not what SiT's published numbers use
        pred = model(torch.cat([out["x"]] * 2), torch.cat([1000 * (1 - out["t_sit"])] * 2),
                     torch.cat([out["y"], torch.full_like(out["y"], 10)])).sample[:, :4]
    cond, uncond = pred.chunk(2)
    assert (combine_guidance(cond, uncond, w)[:2, 3] + out["cfg_output"][:2, 3]).abs().max() > 1e-3


def test_ode_sampling_matches_the_official_torchdiffeq_solvers(official, model):
    _, out, info = official
    steps = info["ode_steps"] - 1  # official num_steps counts grid points of linspace(0, 1, n)
    euler = _pipe(model, "euler")(class_labels=out["sample_labels"], num_inference_steps=steps, guidance_scale=info["cfg_scale"],
                                  latents=out["sample_noise"], output_type="latent").images
    heun = _pipe(model, "heun")(class_labels=out["sample_labels"], num_inference_steps=steps,
                                latents=out["sample_noise"], output_type="latent").images
    assert torch.allclose(euler, out["ode_euler_cfg"], atol=1e-5)
    assert torch.allclose(heun, out["ode_heun"], atol=1e-5)


def test_sde_sampling_matches_the_official_euler_maruyama_with_its_mean_last_step(official, model):
    _, out, info = official
    grid = torch.cat([1 - torch.linspace(0, 1 - info["sde_last_step_size"], info["sde_steps"], dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)])
    labels = out["sample_labels"]

    def velocity(x, t):
        return model(x, 1000 * t, labels).sample[:, :4]

    x = sample_sde(velocity, out["sample_noise"], grid, diffusion="sit", last_step="mean",
                   generator=torch.Generator().manual_seed(info["sde_seed"]))
    assert torch.allclose(x, out["sde_euler"], atol=1e-5)
    # genmod's default g = sigma is another SDE with the same marginals, not SiT's sampler
    other = sample_sde(velocity, out["sample_noise"], grid, generator=torch.Generator().manual_seed(info["sde_seed"]))
    assert (other - out["sde_euler"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", sorted(SIZES))
def test_released_sizes_have_the_official_parameter_counts(official, name):
    depth, hidden, heads = SIZES[name]
    with torch.device("meta"):
        model = FlowTransformer(in_channels=4, sample_size=32, patch_size=2, hidden_size=hidden, depth=depth,
                                num_heads=heads, num_classes=1000, learn_sigma=True, time_convention="sit",
                                guidance_channels=3)
    counts = official[2]["parameter_counts"][name]
    assert sum(p.numel() for p in model.parameters()) == counts["trainable"]
    assert counts["total"] - counts["trainable"] == 256 * hidden  # the frozen pos_embed, a buffer in genmod
    # the importer reads these sizes back from an official-layout state dict
    state = _official_layout(model.state_dict(), hidden)
    cfg = sit_config(state)
    assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["sample_size"], cfg["learn_sigma"]) == \
        (depth, hidden, heads, 32, True)
    assert set(map_sit_state_dict(state)) == set(model.state_dict())


def _official_layout(state, hidden):
    out = {"pos_embed": torch.empty(1, 256, hidden, device="meta")}
    for key, value in state.items():
        if ".attn.to_q." in key:
            out[key.replace(".to_q.", ".qkv.")] = torch.empty((3 * value.shape[0], *value.shape[1:]), device="meta")
        elif ".attn.to_k." not in key and ".attn.to_v." not in key:
            out[key.replace(".attn.to_out.", ".attn.proj.")] = value
    return out


def test_wrong_files_are_one_line_errors(tmp_path, official, monkeypatch):
    var_like = str(tmp_path / "var.pth")
    torch.save({"blocks.0.attn.mat_qkv.weight": torch.zeros(3, 1)}, var_like)
    with pytest.raises(ImportError_, match=r"not a sit checkpoint .*looks like a var checkpoint \(genmod import var"):
        build_and_run(var_like, tmp_path)
    with pytest.raises(ImportError_, match=r"SIT_CKPT: no such file .*dropboxusercontent.com/.*SiT-XL-2-256"):
        build_and_run(str(tmp_path / "SiT-XL-2-256x256.pt"), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImportError_, match=r"--vae: could not get 'stabilityai/sd-vae-ft-ema' .*huggingface.co/stabilityai/sd-vae-ft-ema") as info:
        load_vae("stabilityai/sd-vae-ft-ema")
    assert "\n" not in str(info.value)
    bad = dict(official[0])
    bad.pop("blocks.1.mlp.fc2.bias")
    with pytest.raises(ImportError_, match=r"not a sit checkpoint: 1 keys missing, 0 unexpected"):
        build_transformer("x.pt", bad, num_heads=4)


def build_and_run(ckpt, tmp_path):
    from types import SimpleNamespace

    return run(SimpleNamespace(checkpoints=[ckpt], out=str(tmp_path / "o"), vae="unused", num_heads=4,
                               solver="euler", id2label=None))


def tiny_autoencoder_kl(folder):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)
    vae.save_pretrained(folder)
    return vae.eval()


def test_import_end_to_end_then_genmod_sample(tmp_path, official):
    ckpt = str(tmp_path / "SiT-tiny.pt")
    torch.save(dict(official[0]), ckpt)  # the official format: a plain state dict
    vae = tiny_autoencoder_kl(tmp_path / "vae")
    out = tmp_path / "pipe"
    assert main(["import", "sit", ckpt, "--vae", str(tmp_path / "vae"), "--num_heads", "4", "--solver", "euler",
                 "--out", str(out)]) == 0
    pipe = FlowMatchingPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    _, fixture, info = official
    latents = pipe(class_labels=fixture["sample_labels"], num_inference_steps=info["ode_steps"] - 1,
                   guidance_scale=info["cfg_scale"], latents=fixture["sample_noise"], output_type="latent").images
    assert torch.allclose(latents, fixture["ode_euler_cfg"], atol=1e-5)
    with torch.no_grad():  # the pipeline decodes as SiT's sample.py: vae.decode(z / 0.18215)
        expected = vae.decode(fixture["ode_euler_cfg"] / 0.18215).sample
    images = pipe(class_labels=fixture["sample_labels"], num_inference_steps=info["ode_steps"] - 1,
                  guidance_scale=info["cfg_scale"], latents=fixture["sample_noise"], output_type="pt").images
    assert torch.allclose(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5)
    assert pipe.config.id2label["7"] == "7"
    npz = tmp_path / "s.npz"
    assert main(["sample", str(out), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s.png"),
                 "--npz", str(npz), "--device", "cpu"]) == 0
    assert np.load(npz)["arr_0"].shape == (2, 16, 16, 3)


def test_new_options_reject_bad_values_in_one_line():
    with pytest.raises(ValueError, match=r"^time_convention: expected one of genmod, sit, got 'SiT'$"):
        FlowTransformer(in_channels=4, sample_size=8, hidden_size=32, depth=1, num_heads=2, time_convention="SiT")
    with pytest.raises(ValueError, match=r"^guidance_channels: must be in \[1, 4\] or None, got 5$"):
        FlowTransformer(in_channels=4, sample_size=8, hidden_size=32, depth=1, num_heads=2, guidance_channels=5)
    with pytest.raises(ValueError, match=r"^last_step: expected one of ode, mean, got 'Mean'$"):
        sample_sde(lambda x, t: x, torch.zeros(1, 2), [1.0, 0.0], last_step="Mean")
    defaults = FlowTransformer(in_channels=4, sample_size=8, hidden_size=32, depth=1, num_heads=2)
    assert defaults.config.time_convention == "genmod" and defaults.config.guidance_channels is None
