"""``genmod import sit SIT_CKPT --vae AUTOENCODERKL --out DIR``: released SiT weights as a FlowMatchingPipeline.

SiT (Ma et al. 2024, "Scalable Interpolant Transformers"; willisma/SiT) is DiT's network trained as a
velocity model on the linear interpolant ``x_t = t x + (1 - t) eps`` (Sec. 2, t = 0 noise). Its weights
map onto genmod's ``FlowTransformer`` with two changes: timm's fused ``attn.qkv`` is split into
``to_q / to_k / to_v`` and ``attn.proj`` is ``to_out``; the frozen ``pos_embed`` parameter is dropped
(genmod rebuilds the same 2D sin-cos table as a buffer). The conventions are kept at the model's edge by
config options: ``time_convention="sit"`` (the embedder gets ``1 - t``, the velocity sign is flipped),
``learn_sigma`` (8 output channels, the first 4 are the velocity) and ``guidance_channels=3`` (SiT's
``forward_with_cfg`` guides 3 of the 4 latent channels, which its published FIDs use).

The released file ``SiT-XL-2-256x256.pt`` is a plain state dict; depth, width, patch size, channels,
latent size, classes and learn_sigma are read from its keys and shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time

import torch

from genmod.importers.files import ImportError_, atomic_output, check_keys, guess_kind, read_official

SIT_XL_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
              "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0")
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}  # SiT-S / B / L / XL (models.py of the official code)
GUIDED_CHANNELS = 3
# key fragments of other released models, for the one-line "looks like" hint
OTHER_KINDS = (("mat_qkv", "var"), ("cond_pos_embed", "causalfusion"), ("x_proj", "causalfusion"))


def add_arguments(parser) -> None:
    parser.add_argument("--vae", default=DEFAULT_VAE,
                        help=f"diffusers AutoencoderKL folder or hub id (default {DEFAULT_VAE}; SiT's sample.py uses -mse)")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads (default: the official size for the width, else width // 64)")
    parser.add_argument("--solver", default="heun", help="the scheduler's solver (euler, midpoint, heun, rk4)")
    parser.add_argument("--id2label", default=None, help="JSON file {id: name} of class names (default: numbers)")


def sit_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """``FlowTransformer`` config of a SiT state dict: sizes from the keys, SiT's conventions switched on."""
    proj = state["x_embedder.proj.weight"]                       # [D, C, p, p]
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    grid = math.isqrt(state["pos_embed"].shape[1]) if "pos_embed" in state else 32 // patch
    num_heads = num_heads or HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
    return dict(in_channels=channels, sample_size=grid * patch, patch_size=patch, hidden_size=hidden, depth=depth,
                num_heads=num_heads, mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1, class_dropout_prob=0.1,
                learn_sigma=out_channels == 2 * channels, time_convention="sit",
                guidance_channels=min(GUIDED_CHANNELS, channels))


def map_sit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SiT keys -> ``FlowTransformer`` keys (qkv split, proj -> to_out, pos_embed dropped)."""
    mapped = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
            prefix, kind = key.rsplit(".qkv.", 1)
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                mapped[f"{prefix}.{name}.{kind}"] = part.clone()
        else:
            mapped[key.replace(".attn.proj.", ".attn.to_out.")] = value
    return mapped


def _read_checkpoint(spec: str) -> tuple[str, dict]:
    path, state = read_official(spec, "SIT_CKPT", f"download SiT-XL-2-256x256.pt from {SIT_XL_URL} "
                                "(the official README's link)", key=("ema", "model"))
    if "x_embedder.proj.weight" not in state or "final_layer.linear.weight" not in state:
        guess = guess_kind(state, OTHER_KINDS)
        hint = f"; it looks like a {guess} checkpoint (genmod import {guess} ...)" if guess else ""
        if any(k.startswith(("encoder.down", "decoder.up")) for k in state):
            hint = "; it looks like an autoencoder (pass its diffusers folder as --vae)"
        raise ImportError_(f"{path}: not a sit checkpoint (no x_embedder / final_layer keys){hint}")
    return path, state


def build_transformer(path: str, state: dict, num_heads: int | None):
    """A ``FlowTransformer`` holding the checkpoint's weights (keys checked in one line first)."""
    from diffusers.models.modeling_utils import no_init_weights

    from genmod.flow.transformer import FlowTransformer

    config = sit_config(state, num_heads)
    with torch.device("meta"):
        model = FlowTransformer(**config)
    mapped = map_sit_state_dict(state)
    check_keys(path, "sit", model.state_dict().keys(), mapped.keys(), guess=guess_kind(state, OTHER_KINDS))
    with no_init_weights():  # every parameter is overwritten below: skip the random init (minutes at XL)
        model = FlowTransformer(**config)
    model.load_state_dict(mapped, strict=True)
    if "pos_embed" in state and not torch.allclose(state["pos_embed"].float(), model.pos_embed.float(), atol=1e-5):
        raise ImportError_(f"{path}: pos_embed is not the 2D sin-cos table FlowTransformer rebuilds")
    return model.eval()


def load_vae(spec: str):
    """The SD-VAE (or any AutoencoderKL): a local diffusers folder, or a hub id downloaded when online."""
    from genmod.tokenizers_vq.models import DiffusersAutoencoderKL

    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ImportError_(f"--vae: {spec!r} has no config.json (expected a diffusers AutoencoderKL folder)")
        return DiffusersAutoencoderKL.from_pretrained(spec)
    manual = (f"download config.json and diffusion_pytorch_model.safetensors of https://huggingface.co/{spec} "
              f"into a folder by hand and pass --vae FOLDER")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"])
    except Exception as err:  # offline, unknown id, no huggingface_hub
        raise ImportError_(f"--vae: could not get {spec!r} ({type(err).__name__}); {manual}") from None
    return DiffusersAutoencoderKL.from_pretrained(folder)


def class_names(num_classes: int, id2label_file: str | None) -> dict[int, str]:
    """``{id: name}`` from ``--id2label`` (JSON), else the ids as numbers."""
    if id2label_file is None:
        return {i: str(i) for i in range(num_classes)}
    try:
        with open(id2label_file) as f:
            names = {int(k): str(v) for k, v in json.load(f).items()}
    except (OSError, ValueError) as err:
        raise ImportError_(f"--id2label: cannot read {id2label_file!r} ({type(err).__name__})") from None
    return {i: names.get(i, str(i)) for i in range(num_classes)}


def run(args) -> str:
    """Map the checkpoint, attach the VAE and the linear-path flow scheduler, write the pipeline folder."""
    from genmod.flow.pipeline import FlowMatchingPipeline
    from genmod.flow.scheduler import FlowMatchSolverScheduler

    if len(args.checkpoints) != 1:
        raise ImportError_(f"genmod import sit: expected one SIT_CKPT, got {len(args.checkpoints)}")
    start = time.perf_counter()
    path, state = _read_checkpoint(args.checkpoints[0])
    transformer = build_transformer(path, state, args.num_heads)
    vae = load_vae(args.vae)
    scheduler = FlowMatchSolverScheduler(solver=args.solver, path="linear", prediction_type="velocity")
    pipe = FlowMatchingPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                id2label=class_names(transformer.config.num_classes, args.id2label))
    with atomic_output(args.out) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    print(f"sit: {len(state)} official tensors -> {len(transformer.state_dict())} genmod tensors "
          f"({sum(p.numel() for p in transformer.parameters()):,} parameters) in {time.perf_counter() - start:.1f} s")
    return args.out
