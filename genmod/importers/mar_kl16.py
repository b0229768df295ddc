"""``genmod import mar-kl16 kl16.ckpt --out DIR``: MAR's KL-16 VAE as a diffusers ``AutoencoderKL`` tokenizer folder.

MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization"; LTH14/mar) trains
and decodes its generator in the latents of its own KL-16 autoencoder, ``models/vae.py``: LDM's KL-VAE
(Rombach et al. 2022) with ``ch=128, ch_mult=(1, 1, 2, 2, 4)``, 2 ResNet blocks a level, 16 latent
channels at stride 16. Attention sits in the encoder's lowest level (``attn_resolutions=(16,)`` at
``resolution=256``) and in both mid blocks; the decoder's up levels have none. CausalFusion uses the
same file. diffusers' ``AutoencoderKL`` holds exactly this network: ``AttnDownEncoderBlock2D`` (one head
of the full width, as the LDM ``AttnBlock``) for the encoder levels that carry attention, and the
standard decoder. The map is LDM's key layout onto diffusers' (1x1 attention convs become linears).

Both MAR (``engine_mar.py``) and CausalFusion train on ``posterior.sample() * 0.2325`` and decode
``vae.decode(z / 0.2325)``: the folder's ``scaling_factor`` is 0.2325, so genmod's
``encode(x, sample=True)`` / ``decode(latents)`` are those calls (``encode(x)`` gives the scaled mean).
"""

from __future__ import annotations

import re
import time

import torch

from genmod.importers.files import ImportError_, atomic_output, check_keys, guess_kind, read_official

KL16_URL = "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=0"
SCALING_FACTOR = 0.2325       # engine_mar.py (MAR) and CausalFusion: x = posterior.sample() * 0.2325
NORM_NUM_GROUPS = 32          # models/vae.py Normalize(); a state dict does not store it
RESNET = {"nin_shortcut": "conv_shortcut"}
ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# key fragments of other checkpoints, for the one-line "looks like" hint
OTHER_KINDS = (("quantize.embedding", "var"), ("mat_qkv", "var"), ("x_embedder", "sit"), ("x_proj", "causalfusion"),
               ("cond_pos_embed", "causalfusion"))


def add_arguments(parser) -> None:
    parser.add_argument("--scaling_factor", "--scaling-factor", type=float, default=SCALING_FACTOR,
                        help=f"latents = z * scaling_factor (default {SCALING_FACTOR}, MAR's and CausalFusion's)")
    parser.add_argument("--norm_num_groups", type=int, default=NORM_NUM_GROUPS,
                        help=f"GroupNorm groups (default {NORM_NUM_GROUPS}, the official; not stored in the file)")


def _count(state, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def kl16_config(path: str, state: dict, norm_num_groups: int = NORM_NUM_GROUPS,
                scaling_factor: float = SCALING_FACTOR) -> dict:
    """diffusers ``AutoencoderKL`` config of an official state dict: widths, depth and attention from its keys."""
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    layers = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    up_layers = _count(state, r"decoder\.up\.0\.block\.(\d+)\.")
    latent = state["post_quant_conv.weight"].shape[0]
    if up_layers != layers + 1 or _count(state, r"decoder\.up\.(\d+)\.") != levels:
        raise ImportError_(f"{path}: decoder has {up_layers} blocks a level for {layers} in the encoder "
                           f"(LDM's KL-VAE has one more); not a mar-kl16 checkpoint")
    if any(re.match(r"decoder\.up\.\d+\.attn\.", k) for k in state):
        raise ImportError_(f"{path}: attention in the decoder's up levels is not MAR's KL-16 decoder (not supported)")
    if state["quant_conv.weight"].shape[0] != 2 * latent:
        raise ImportError_(f"{path}: quant_conv has {state['quant_conv.weight'].shape[0]} outputs for {latent} latent "
                           f"channels: a non-variational VAE (use_variational=False) is not supported")
    attn = [any(k.startswith(f"encoder.down.{i}.attn.") for k in state) for i in range(levels)]
    return dict(in_channels=state["encoder.conv_in.weight"].shape[1], out_channels=state["decoder.conv_out.weight"].shape[0],
                down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
                up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=widths, layers_per_block=layers,
                latent_channels=latent, norm_num_groups=norm_num_groups, sample_size=256,
                scaling_factor=scaling_factor, act_fn="silu")


def map_key(key: str, levels: int) -> str:
    """One official (LDM) key -> diffusers ``AutoencoderKL`` key; a key of no known form comes back unchanged."""
    rules = (
        (r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)",
         lambda m: f"{m[1]}.{_blocks(m[2], m[3], levels)}.resnets.{m[4]}.{RESNET.get(m[5], m[5])}.{m[6]}"),
        (r"encoder\.down\.(\d+)\.attn\.(\d+)\.(\w+)\.(weight|bias)",
         lambda m: f"encoder.down_blocks.{m[1]}.attentions.{m[2]}.{ATTENTION.get(m[3], m[3])}.{m[4]}"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)",
         lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)",
         lambda m: f"decoder.{_blocks('up', m[1], levels)}.upsamplers.0.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid\.block_(\d)\.(\w+)\.(weight|bias)",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{RESNET.get(m[3], m[3])}.{m[4]}"),
        (r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)",
         lambda m: f"{m[1]}.mid_block.attentions.0.{ATTENTION.get(m[2], m[2])}.{m[3]}"),
        (r"(encoder|decoder)\.norm_out\.(weight|bias)", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
    )
    for pattern, rename in rules:
        if m := re.fullmatch(pattern, key):
            return rename(m)
    return key


def _blocks(direction: str, level: str, levels: int) -> str:
    """LDM numbers the decoder's levels from the top resolution, diffusers from the bottom."""
    return f"down_blocks.{level}" if direction == "down" else f"up_blocks.{levels - 1 - int(level)}"


def map_kl16_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> diffusers keys; the attention's 1x1 convs ``[C, C, 1, 1]`` become linears ``[C, C]``."""
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    mapped = {}
    for key, value in state.items():
        new = map_key(key, levels)
        if ".attentions." in new and value.ndim == 4:
            value = value[:, :, 0, 0]
        mapped[new] = value
    return mapped


def _read_checkpoint(spec: str) -> tuple[str, dict]:
    path, state = read_official(spec, "VAE_CKPT", f"download kl16.ckpt from {KL16_URL} (MAR's util/download.py)",
                                key="model")
    probe = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight",
             "quant_conv.weight", "post_quant_conv.weight")
    if not all(k in state for k in probe):
        guess = guess_kind(state, OTHER_KINDS)
        hint = f"; it looks like a {guess} checkpoint (genmod import {guess} ...)" if guess else ""
        if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
            hint = "; it looks like a diffusers AutoencoderKL already (pass its folder as --tokenizer / --vae)"
        elif any(k.startswith("diffloss.") for k in state):
            hint = "; it looks like a MAR generator checkpoint (checkpoint-last.pth), not the VAE kl16.ckpt"
        raise ImportError_(f"{path}: not a mar-kl16 checkpoint (no LDM encoder.down / decoder.up / quant_conv keys){hint}")
    return path, state


def build_vae(path: str, state: dict, norm_num_groups: int = NORM_NUM_GROUPS, scaling_factor: float = SCALING_FACTOR):
    """A genmod ``DiffusersAutoencoderKL`` holding the official weights (keys checked in one line first)."""
    from diffusers.models.modeling_utils import no_init_weights

    from genmod.tokenizers_vq.models import DiffusersAutoencoderKL

    config = kl16_config(path, state, norm_num_groups, scaling_factor)
    if any(w % norm_num_groups for w in config["block_out_channels"]):
        raise ImportError_(f"--norm_num_groups: {norm_num_groups} does not divide the widths {config['block_out_channels']}")
    with no_init_weights():  # every parameter is overwritten below: skip the random init
        vae = DiffusersAutoencoderKL(**config)
    mapped = map_kl16_state_dict(state)
    check_keys(path, "mar-kl16", vae.state_dict().keys(), mapped.keys(), guess=guess_kind(state, OTHER_KINDS))
    vae.load_state_dict(mapped, strict=True)
    vae.register_to_config(modality="image")
    return vae.eval()


def run(args) -> str:
    """Map ``kl16.ckpt`` (weights under ``["model"]``) and write the tokenizer folder."""
    if len(args.checkpoints) != 1:
        raise ImportError_(f"genmod import mar-kl16: expected one VAE_CKPT (kl16.ckpt), got {len(args.checkpoints)}")
    if not args.scaling_factor > 0:
        raise ImportError_(f"--scaling_factor: must be > 0, got {args.scaling_factor}")
    start = time.perf_counter()
    path, state = _read_checkpoint(args.checkpoints[0])
    vae = build_vae(path, state, args.norm_num_groups, args.scaling_factor)
    with atomic_output(args.out) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
    print(f"mar-kl16: {len(state)} official tensors -> {len(vae.state_dict())} diffusers tensors "
          f"({sum(p.numel() for p in vae.parameters()):,} parameters, scaling_factor {args.scaling_factor}) "
          f"in {time.perf_counter() - start:.1f} s")
    return args.out
