"""Released VAR (FoundationVision/VAR): genmod reproduces the official code (tests/fixtures/var/README.md).

The fixtures hold tiny official models with perturbed weights in the official key layout and the
official outputs; they are read through the importer's own mapping (genmod.importers.var).
"""

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from genmod.cli import main
from genmod.importers.files import ImportError_, load_state_dict
from genmod.importers.var import convert_vae, convert_var
from genmod.var.pipeline import VARPipeline, VARSampling, var_generate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "var")
VAE = os.path.join(FIXTURES, "vae_tiny.pth")
VARS = ("var_tiny_d3", "var_tiny_saln_d2")
TOL = 1e-5
# parameter counts of the official models, built with the official code on the meta device (README.md here)
OFFICIAL_COUNTS = {"vae_ch160v4096z32": 108948355, 16: 310283520, 20: 600917136, 24: 1033399360, 30: 2010020356,
                   36: 2353893904}


@pytest.fixture(scope="module")
def official():
    with open(os.path.join(FIXTURES, "settings.json")) as fh:
        settings = json.load(fh)
    return load_file(os.path.join(FIXTURES, "outputs.safetensors")), settings


@pytest.fixture(scope="module")
def vae(official):
    return convert_vae(load_state_dict(VAE), VAE, official[1]["patch_nums"])


def _transformer(name, settings):
    path = os.path.join(FIXTURES, f"{name}.pth")
    return convert_var(load_state_dict(path), path, ",".join(map(str, settings["patch_nums"])))


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_vqvae_latent_indices_and_decoding_match_official(vae, official):
    out, _ = official
    latent = vae.encoder(out["image"])  # encoder + quant_conv
    assert _max_diff(latent, out["latent"]) < TOL
    indices = vae.encode_indices(out["image"])
    assert torch.equal(indices, out["indices"])  # every scale's indices
    assert _max_diff(vae.decode_indices(indices), out["recon"]) < TOL  # post_quant_conv + decoder
    tf_input = vae.quantize_layer.scales_to_teacher_forcing_inputs(indices)
    assert _max_diff(tf_input, out["tf_input"]) < TOL


@pytest.mark.parametrize("name", VARS)
@torch.no_grad()
def test_teacher_forced_logits_match_official(name, official):
    out, settings = official
    transformer = _transformer(name, settings)
    assert transformer.config.shared_adaln == ("saln" in name)
    logits = transformer(torch.tensor(settings["labels"]), out["tf_input"]).logits
    assert logits.shape == out[f"{name}.logits"].shape
    assert _max_diff(logits, out[f"{name}.logits"]) < TOL


@pytest.mark.parametrize("name", VARS)
def test_sampling_with_the_same_seed_draws_the_official_tokens(name, vae, official):
    out, settings = official
    s = settings["sampling"]  # official cfg 1.5 = genmod guidance_scale 2.5 (linear ramp over scales)
    sampling = VARSampling(guidance_scale=1 + s["cfg"], top_k=s["top_k"], top_p=s["top_p"])
    result = var_generate(_transformer(name, settings), vae.quantize_layer, torch.tensor(settings["labels"]), sampling,
                          generator=torch.Generator().manual_seed(s["g_seed"]))
    indices = torch.cat([m.flatten(1) for m in result.index_maps], dim=1)
    assert torch.equal(indices, out[f"{name}.sample_indices"])
    with torch.no_grad():
        image = vae.decoder(result.f_hat).clamp(-1, 1) * 0.5 + 0.5
    assert _max_diff(image, out[f"{name}.sample_image"]) < TOL


def test_import_command_writes_a_pipeline_that_samples_like_official(tmp_path, official, capsys):
    out, settings = official
    folder = str(tmp_path / "var-pipe")
    start = time.perf_counter()
    assert main(["import", "var", VAE, os.path.join(FIXTURES, "var_tiny_d3.pth"), "--out", folder,
                 "--scales", "1,2,3,4,6,8"]) == 0
    assert time.perf_counter() - start < 30
    pipe = VARPipeline.from_pretrained(folder)
    assert pipe.sampling_settings() == {"guidance_scale": 2.5, "guidance_schedule": "linear", "top_k": 900,
                                        "top_p": 0.96, "temperature": 1.0}  # the official FID setting
    s = settings["sampling"]
    images = pipe(class_labels=settings["labels"], top_k=s["top_k"], top_p=s["top_p"], output_type="pt",
                  generator=torch.Generator().manual_seed(s["g_seed"])).images
    assert _max_diff(images, out["var_tiny_d3.sample_image"]) < TOL
    grid = str(tmp_path / "grid.png")
    assert main(["sample", folder, "--num", "4", "--out", grid, "--class-labels", "1,2,3,4"]) == 0
    from PIL import Image
    assert Image.open(grid).size[0] >= 2 * 16


def test_wrong_files_are_one_line_errors(tmp_path, capsys):
    sit = {"x_embedder.proj.weight": torch.zeros(4, 4, 2, 2), "t_embedder.mlp.0.weight": torch.zeros(4, 4),
           "blocks.0.attn.qkv.weight": torch.zeros(12, 4)}
    sit_path = str(tmp_path / "SiT-XL-2-256x256.pt")
    torch.save(sit, sit_path)
    with pytest.raises(ImportError_, match=r"not a var checkpoint: .*looks like a sit checkpoint") as info:
        convert_var(load_state_dict(sit_path), sit_path)
    assert "\n" not in str(info.value)
    with pytest.raises(ImportError_, match=r"this is the VQVAE .*order is genmod import var VAE_CKPT VAR_CKPT"):
        convert_var(load_state_dict(VAE), VAE)
    evil = str(tmp_path / "var_d16.pth")
    torch.save({"blocks.0.attn.mat_qkv.weight": torch.zeros(3), "args": argparse_like()}, evil)
    assert main(["import", "var", VAE, evil, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused: unpickling it would execute code" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(ImportError_, match=r"--scales: \[1, 2\] gives 5 tokens in 2 scales"):
        convert_var(load_state_dict(os.path.join(FIXTURES, "var_tiny_d3.pth")), "x", "1,2")


class argparse_like:  # a pickled object (like the official checkpoints' args), refused by weights_only
    pass


def test_released_sizes_have_the_official_parameter_counts():
    from genmod.importers.var import KNOWN_SCALES
    from genmod.tokenizers_vq.models import VQTokenizer
    from genmod.var.transformer import VARTransformer

    from accelerate import init_empty_weights  # parameters on the meta device, as the official count

    count = lambda m: sum(p.numel() for p in m.parameters())
    with init_empty_weights(include_buffers=False):
        vae = VQTokenizer(base_channels=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attention=True,
                          attn_levels=(4,), quant_conv_kernel=3, quantizer="msvq", latent_channels=32,
                          codebook_size=4096, scales=KNOWN_SCALES[680])
        assert count(vae) == OFFICIAL_COUNTS["vae_ch160v4096z32"]
        for depth in (16, 20, 24, 30, 36):
            scales = KNOWN_SCALES[2240 if depth == 36 else 680]
            model = VARTransformer(scales=scales, depth=depth, shared_adaln=depth == 36)
            assert count(model) == OFFICIAL_COUNTS[depth], depth
