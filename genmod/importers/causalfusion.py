"""``genmod import causalfusion CKPT --vae DIR --out DIR``: released CausalFusion weights as a CausalFusionPipeline.

CausalFusion (Deng et al. 2024, "Causal Diffusion Transformers for Generative Modeling", arXiv 2412.12095;
causalfusion/causalfusion) is genmod's ``CausalFusionTransformer`` once three things are matched, all config
options: LayerNorm epsilon 1e-5 everywhere (``norm_eps``), one fused ``qkv`` Linear without bias
(split into ``to_q / to_k / to_v`` with ``qkv_bias=False``; its q/k LayerNorms are ``norm_q / norm_k``), and
the network timestep: the official ADM-style DDPM (linear betas 1e-4..0.02, 1000 steps, epsilon
prediction) feeds the integer step n of ``alpha_bar[n]``; genmod's discrete path puts step n at
``t = (n + 1) / 1000`` and feeds ``path.network_timestep(t) = n`` (``time_convention="ddpm_index"`` records the
provenance). The official sampler, ancestral
DDPM with FIXED_LARGE variance respaced to 250 steps and CFG on epsilon with scale 4 (README), is the
pipeline's saved default (``solver="ddpm"``, ``time_grid="ddpm"``); one AR step, as the release samples.

The released file holds the state dict (or ``{"ema": ...}``); depth, width, class tokens, patch size,
latent channels, latent size and classes are read from its keys and shapes. Its VAE is MAR's KL-16
(16 channels, latents times 0.2325): pass any tokenizer folder ``load_tokenizer`` reads as ``--vae``
(``genmod import mar-kl16 ...`` writes one).
"""

from __future__ import annotations

import math
import os
import re
import time

import torch

from genmod.importers.files import ImportError_, atomic_output, check_keys, guess_kind, read_official

CHECKPOINT_URL = "https://drive.google.com/file/d/1Z0xly7gaXASJnbeWNMjQBwbZdUnLFLu1/view"  # the official README's link
HEADS_BY_WIDTH = {1024: 16, 1280: 20, 1408: 22}  # CausalFusion-L / XL / H (official models.py)
LATENT_SCALE = 0.2325                            # MAR KL-16 latents as CausalFusion trains on them
OFFICIAL_SAMPLING = dict(num_inference_steps=250, guidance_scale=4.0, num_ar_steps=1, order="raster")
OTHER_KINDS = (("mat_qkv", "var"), ("x_embedder.proj", "sit"), ("adaLN_modulation", "sit"))


def add_arguments(parser) -> None:
    parser.add_argument("--vae", required=True,
                        help="tokenizer folder (MAR KL-16 as a diffusers AutoencoderKL: genmod import mar-kl16 ...)")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads (default: the official size for the width, else width // 64)")
    parser.add_argument("--patch_size", type=int, default=1, help="latent patch size (1 for every released model)")
    parser.add_argument("--guidance_scale", type=float, default=OFFICIAL_SAMPLING["guidance_scale"],
                        help="saved CFG scale (default 4.0, the official README's sample command)")
    parser.add_argument("--num_inference_steps", type=int, default=OFFICIAL_SAMPLING["num_inference_steps"],
                        help="saved respaced DDPM steps (default 250, the official sample.py)")
    parser.add_argument("--id2label", default=None, help="JSON file {id: name} of class names (default: numbers)")


def causalfusion_config(state: dict[str, torch.Tensor], num_heads: int | None = None, patch: int = 1) -> dict:
    """``CausalFusionTransformer`` config of an official state dict: sizes from the keys, official conventions on.

    Tokens are ``patch^2 * C`` values, which the keys cannot split: ``patch`` is 1 for every released model."""
    hidden, token_dim = state["x_proj.weight"].shape
    out_dim = state["final_layer.1.weight"].shape[0]
    if out_dim != token_dim:
        raise ImportError_(f"final_layer.1.weight: {out_dim} outputs for {token_dim}-dim tokens (learned sigma is not CausalFusion)")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = math.isqrt(state["pos_embed"].shape[1])
    num_cond_tokens = state["cond_pos_embed"].shape[1]
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    num_heads = num_heads or HEADS_BY_WIDTH.get(hidden, hidden // head_dim)
    if token_dim % (patch * patch):
        raise ImportError_(f"x_proj.weight: {token_dim}-dim tokens do not split into patch_size {patch} patches")
    return dict(in_channels=token_dim // (patch * patch), sample_size=grid * patch, patch_size=patch, hidden_size=hidden,
                depth=depth, num_heads=num_heads, mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1, num_cond_tokens=num_cond_tokens,
                class_dropout_prob=0.1, norm_eps=1e-5, qkv_bias=False, time_convention="ddpm_index")


RENAMES = ((".attn.proj.", ".attn.to_out."), (".attn.q_norm.", ".attn.norm_q."), (".attn.k_norm.", ".attn.norm_k."),
           ("final_layer.0.", "norm_out."), ("final_layer.1.", "proj_out."))


def map_causalfusion_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> ``CausalFusionTransformer`` keys (fused bias-free qkv split in three, renames)."""
    mapped = {}
    for key, value in state.items():
        if key.endswith(".attn.qkv.weight"):
            prefix = key[: -len(".qkv.weight")]
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                mapped[f"{prefix}.{name}.weight"] = part.clone()
            continue
        for old, new in RENAMES:
            key = key.replace(old, new)
        mapped[key] = value
    return mapped


def read_checkpoint(spec: str) -> tuple[str, dict]:
    """The official state dict (``ckpt["ema"]`` when present), or a one-line error naming the file."""
    path, state = read_official(spec, "CKPT", f"download the CausalFusion-XL checkpoint from {CHECKPOINT_URL} "
                                "(the official README's link)", key=("ema", "model"))
    needed = ("x_proj.weight", "cond_pos_embed", "pos_embed", "final_layer.1.weight", "blocks.0.attn.q_norm.weight")
    if not all(k in state for k in needed):
        guess = guess_kind(state, OTHER_KINDS)
        hint = f"; it looks like a {guess} checkpoint (genmod import {guess} ...)" if guess else ""
        if any(k.startswith(("encoder.", "decoder.")) for k in state):
            hint = "; it looks like an autoencoder (pass its folder as --vae)"
        raise ImportError_(f"{path}: not a causalfusion checkpoint (no x_proj / cond_pos_embed / final_layer keys){hint}")
    return path, state


def build_transformer(path: str, state: dict, num_heads: int | None = None, patch: int = 1):
    """A ``CausalFusionTransformer`` holding the checkpoint's weights (keys checked in one line first)."""
    from diffusers.models.modeling_utils import no_init_weights

    from genmod.causalfusion.transformer import CausalFusionTransformer

    config = causalfusion_config(state, num_heads, patch)
    with torch.device("meta"):
        model = CausalFusionTransformer(**config)
    mapped = map_causalfusion_state_dict(state)
    check_keys(path, "causalfusion", model.state_dict().keys(), mapped.keys(), guess=guess_kind(state, OTHER_KINDS))
    with no_init_weights():  # every parameter is overwritten below: skip the random init (minutes at XL)
        model = CausalFusionTransformer(**config)
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
    return model.eval()


def load_vae(folder: str, channels: int):
    """The tokenizer folder (any ``load_tokenizer`` folder); its latent channels must be the transformer's."""
    from genmod.tokenizers_vq.models import load_tokenizer

    if not os.path.isdir(folder):
        raise ImportError_(f"--vae: no such folder {folder!r} (make one with genmod import mar-kl16 KL16_CKPT --out DIR)")
    try:
        vae = load_tokenizer(folder)
    except (OSError, ValueError) as err:
        raise ImportError_(f"--vae: {folder!r} is not a tokenizer folder ({(str(err).splitlines() or [''])[0][:160]})") from None
    found = getattr(vae.config, "latent_channels", None) or getattr(vae.config, "z_channels", None)
    if found is not None and int(found) != channels:
        raise ImportError_(f"--vae: {folder!r} has {found} latent channels, the transformer {channels} (MAR KL-16 has 16)")
    scale = getattr(vae.config, "scaling_factor", None)
    if scale is not None and abs(float(scale) - LATENT_SCALE) > 1e-6:
        print(f"causalfusion: note: --vae scaling_factor is {scale}; CausalFusion was trained on KL-16 latents x {LATENT_SCALE}")
    return vae.eval()


def run(args) -> str:
    """Map the checkpoint, attach the VAE and the official DDPM sampling defaults, write the pipeline folder."""
    from genmod.causalfusion.pipeline import CausalFusionPipeline
    from genmod.importers.sit import class_names

    if len(args.checkpoints) != 1:
        raise ImportError_(f"genmod import causalfusion: expected one CKPT, got {len(args.checkpoints)}")
    start = time.perf_counter()
    path, state = read_checkpoint(args.checkpoints[0])
    transformer = build_transformer(path, state, args.num_heads, args.patch_size)
    cfg = transformer.config
    vae = load_vae(args.vae, cfg.in_channels)
    pipe = CausalFusionPipeline(transformer=transformer, vae=vae, id2label=class_names(cfg.num_classes, args.id2label),
                                path="ddpm_linear", prediction="epsilon", solver="ddpm", time_grid="ddpm",
                                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                order=OFFICIAL_SAMPLING["order"])
    with atomic_output(args.out) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    print(f"causalfusion: {len(state)} official tensors -> {len(transformer.state_dict())} genmod tensors "
          f"({sum(p.numel() for p in transformer.parameters()):,} parameters) in {time.perf_counter() - start:.1f} s")
    return args.out
