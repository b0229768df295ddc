"""CausalFusion (causalfusion/causalfusion at e138d8d) through ``genmod import causalfusion``: the official outputs, reproduced.

Fixtures (tests/fixtures/causalfusion/README.md) come from the official code with random, perturbed
weights. The official network is fed the integer DDPM step n; genmod's time is ``t = (n + 1) / 1000`` and the
sampler feeds the network ``path.network_timestep(t) = n`` (issue 21), so a direct model call here passes n.
"""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genmod.causalfusion.pipeline import CausalFusionPipeline
from genmod.causalfusion.sampling import CausalFusionSampling, sample_tokens
from genmod.causalfusion.transformer import CausalFusionTransformer
from genmod.cli import main
from genmod.importers.causalfusion import (build_transformer, causalfusion_config, load_vae,
                                           map_causalfusion_state_dict, run)
from genmod.importers.files import ImportError_
from genmod.nn.embeddings import patchify
from genmod.samplers import combine_guidance, get_time_grid, sample_ddpm, space_timesteps

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "causalfusion")
SIZES = {"CausalFusion-L": (24, 1024, 16), "CausalFusion-XL": (32, 1280, 20)}
NULL = 10


@pytest.fixture(scope="module")
def official():
    with open(os.path.join(FIXTURES, "fixture.json")) as f:
        info = json.load(f)
    return (load_file(os.path.join(FIXTURES, "causalfusion_tiny.safetensors")),
            load_file(os.path.join(FIXTURES, "outputs.safetensors")), info)


@pytest.fixture(scope="module")
def model(official):
    return build_transformer("causalfusion_tiny", official[0])


def _train_pred(model, out, split, timestep):
    order = out["train_order"]
    with torch.no_grad():
        pred = model(out["train_noisy"], timestep, out["train_labels"], clean_sample=out["train_clean"],
                     token_order=order, step_sizes=split).sample
    return patchify(pred, 1).gather(1, order[..., None].expand(-1, -1, pred.shape[1]))  # the official shuffled layout


def test_sizes_and_conventions_come_from_the_keys(official, model):
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.in_channels, cfg.sample_size, cfg.patch_size) == (2, 64, 4, 4, 4, 1)
    assert (cfg.num_classes, cfg.num_cond_tokens, cfg.norm_eps, cfg.qkv_bias, cfg.time_convention) == (10, 3, 1e-5, False, "ddpm_index")
    # every official tensor is used: each fused bias-free qkv becomes three
    assert len(official[0]) + 2 * 2 == len(model.state_dict())


def test_training_forward_under_the_generalized_causal_mask_matches(official, model):
    _, out, info = official
    pred = _train_pred(model, out, info["split_sizes"], out["train_steps"])
    assert (pred - out["train_pred"]).abs().max() < 1e-5
    # the two conventions are needed: integer step n (not genmod's old n + 1), LayerNorm eps 1e-5
    assert (_train_pred(model, out, info["split_sizes"], out["train_steps"] + 1) - out["train_pred"]).abs().max() > 1e-3
    eps6 = CausalFusionTransformer(**{**model.config, "norm_eps": 1e-6})
    eps6.load_state_dict(model.state_dict())
    assert (_train_pred(eps6, out, info["split_sizes"], out["train_steps"]) - out["train_pred"]).abs().max() > 1e-5


@pytest.mark.parametrize("step", [999, 250])
def test_kv_cached_inference_with_cfg_matches(official, model, step):
    _, out, info = official
    labels = out["infer_labels"]
    with torch.no_grad():
        caches = model.prefill_condition(torch.cat([labels, torch.full_like(labels, NULL)]), 4)
        eps = model.forward_cached(torch.cat([out["infer_tokens"]] * 2), torch.arange(16).expand(4, -1), caches,
                                   timestep=torch.full((4,), float(step)))
    cond, uncond = eps.chunk(2)
    assert (combine_guidance(cond, uncond, info["cfg_scale"]) - out[f"infer_cfg_{step}"]).abs().max() < 1e-5
    if step == 250:
        assert (cond - out["infer_cond_250"]).abs().max() < 1e-5


def test_respaced_ddpm_sampling_matches_the_official_sampler(official, model):
    _, out, info = official
    steps = info["sample_steps"]
    assert space_timesteps(1000, steps) == out["sample_timestep_map"].tolist()
    assert space_timesteps(1000, 250)[:4] == [0, 4, 8, 12] and len(space_timesteps(1000, 250)) == 250
    grid = get_time_grid("ddpm", steps)
    assert grid.tolist() == [(n + 1) / 1000 for n in reversed(out["sample_timestep_map"].tolist())] + [0.0]
    settings = CausalFusionSampling(num_inference_steps=steps, solver="ddpm", time_grid="ddpm", path="ddpm_linear",
                                    prediction="epsilon", guidance_scale=info["cfg_scale"], order="raster")
    tokens = sample_tokens(model, out["sample_labels"], 2, settings, generator=torch.Generator().manual_seed(info["sample_seed"]))
    reference = out["sample_cfg"]
    # the random tiny net leaves values of a few hundred: fp32 agreement is relative
    assert (tokens - reference).abs().max() / reference.abs().max() < 1e-5
    pipe = CausalFusionPipeline(model, path="ddpm_linear", prediction="epsilon", solver="ddpm", time_grid="ddpm",
                                num_inference_steps=steps, guidance_scale=info["cfg_scale"], order="raster")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(class_labels=out["sample_labels"].tolist(), generator=torch.Generator().manual_seed(info["sample_seed"]),
                   output_type="latent").images
    assert torch.equal(latents, tokens.transpose(1, 2).reshape(2, 4, 4, 4))


def test_ddpm_per_sample_generators_reproduce_each_sample_alone():
    grid = get_time_grid("ddpm", 4)
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    velocity = lambda x, t: 0.3 * x  # noqa: E731
    both = sample_ddpm(velocity, x, grid, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = sample_ddpm(velocity, x[1:], grid, generator=torch.Generator().manual_seed(2))
    assert torch.equal(both[1:], alone)
    with pytest.raises(ValueError, match=r"^time_grid: sample_ddpm runs from noise to data"):
        sample_ddpm(velocity, x, [1.0, 0.5])


@pytest.mark.parametrize("name", sorted(SIZES))
def test_released_sizes_have_the_official_parameter_counts(official, name):
    depth, hidden, heads = SIZES[name]
    with torch.device("meta"):
        model = CausalFusionTransformer(in_channels=16, sample_size=16, patch_size=1, hidden_size=hidden, depth=depth,
                                        num_heads=heads, num_classes=1000, num_cond_tokens=64, norm_eps=1e-5,
                                        qkv_bias=False, time_convention="ddpm_index")
    assert sum(p.numel() for p in model.parameters()) == official[2]["parameter_counts"][name]
    state = _official_layout(model.state_dict())  # the importer reads the sizes back from the official layout
    cfg = causalfusion_config(state)
    assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["num_cond_tokens"], cfg["sample_size"]) == \
        (depth, hidden, heads, 64, 16)
    assert set(map_causalfusion_state_dict(state)) == set(model.state_dict())


def _official_layout(state):
    names = {"to_out": "proj", "norm_q": "q_norm", "norm_k": "k_norm"}
    out = {}
    for key, value in state.items():
        if ".attn.to_q." in key:
            out[key.replace(".to_q.", ".qkv.")] = torch.empty((3 * value.shape[0], value.shape[1]), device="meta")
        elif ".attn.to_k." not in key and ".attn.to_v." not in key:
            for new, old in names.items():
                key = key.replace(f".attn.{new}.", f".attn.{old}.")
            out[key.replace("norm_out.", "final_layer.0.").replace("proj_out.", "final_layer.1.")] = value
    return out


def _run(ckpt, tmp_path, vae="unused"):
    return run(SimpleNamespace(checkpoints=[ckpt], out=str(tmp_path / "o"), vae=vae, num_heads=None, patch_size=1,
                               guidance_scale=4.0, num_inference_steps=250, id2label=None))


def test_wrong_files_are_one_line_errors(tmp_path, official):
    sit_like = str(tmp_path / "sit.pt")
    torch.save({"x_embedder.proj.weight": torch.zeros(2, 4, 2, 2)}, sit_like)
    with pytest.raises(ImportError_, match=r"not a causalfusion checkpoint .*looks like a sit checkpoint"):
        _run(sit_like, tmp_path)
    with pytest.raises(ImportError_, match=r"CKPT: no such file .*drive.google.com/file/d/1Z0xly7gaXASJnbeWNMjQBwbZdUnLFLu1"):
        _run(str(tmp_path / "causalfusion_xl.pt"), tmp_path)
    bad = dict(official[0])
    bad.pop("blocks.1.mlp.fc2.bias")
    with pytest.raises(ImportError_, match=r"not a causalfusion checkpoint: 1 keys missing, 0 unexpected"):
        build_transformer("x.pt", bad)
    tiny_autoencoder_kl(tmp_path / "vae8", channels=8)
    with pytest.raises(ImportError_, match=r"--vae: .* has 8 latent channels, the transformer 4") as err:
        load_vae(str(tmp_path / "vae8"), 4)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^time_convention: expected one of genmod, ddpm_index, got 'adm'$"):
        CausalFusionTransformer(time_convention="adm")
    defaults = CausalFusionTransformer(depth=1)  # today's models are unchanged
    assert defaults.config.norm_eps == 1e-6 and defaults.blocks[0].attn.to_q.bias is not None
    assert defaults.blocks[0].attn.norm_q.eps == 1e-6 and defaults.config.time_convention == "genmod"


def tiny_autoencoder_kl(folder, channels=4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=channels, norm_num_groups=4, sample_size=8, scaling_factor=0.2325)
    vae.save_pretrained(folder)
    return vae.eval()


def test_import_end_to_end_then_genmod_sample(tmp_path, official):
    state, fixture, info = official
    ckpt = str(tmp_path / "causalfusion_tiny.pt")
    torch.save({"ema": dict(state), "model": {}}, ckpt)  # the training checkpoint layout: the EMA weights are used
    vae = tiny_autoencoder_kl(tmp_path / "vae")
    out = tmp_path / "pipe"
    assert main(["import", "causalfusion", ckpt, "--vae", str(tmp_path / "vae"), "--num_inference_steps",
                 str(info["sample_steps"]), "--out", str(out)]) == 0
    pipe = CausalFusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.sampling_settings() == dict(solver="ddpm", time_grid="ddpm", path="ddpm_linear", prediction="epsilon",
                                            num_inference_steps=info["sample_steps"], guidance_scale=4.0, order="raster")
    images = pipe(class_labels=fixture["sample_labels"].tolist(), output_type="pt",
                  generator=torch.Generator().manual_seed(info["sample_seed"])).images
    latents = fixture["sample_cfg"].transpose(1, 2).reshape(2, 4, 4, 4)
    with torch.no_grad():  # decoded as the official sample.py: vae.decode(z / 0.2325)
        expected = vae.decode(latents / 0.2325).sample
    assert torch.allclose(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-4)
    npz = tmp_path / "s.npz"
    assert main(["sample", str(out), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s.png"),
                 "--npz", str(npz), "--device", "cpu"]) == 0
    assert np.load(npz)["arr_0"].shape == (2, 8, 8, 3)
