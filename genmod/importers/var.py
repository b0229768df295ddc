"""``genmod import var VAE_CKPT VAR_CKPT --out DIR``: the released VAR models (Tian et al. 2024,
FoundationVision/VAR) as a ``VARPipeline`` folder.

* ``VAE_CKPT``: ``vae_ch160v4096z32.pth`` (the multi-scale VQVAE, Sec. 3.2), mapped onto a
  ``VQTokenizer`` with ``quantizer="msvq"``, ``attn_levels`` (self-attention after each ResNet block
  of the last level) and ``quant_conv_kernel=3``; sizes are read from the tensors.
* ``VAR_CKPT``: ``var_d{16,20,24,30,36}.pth`` (Sec. 3.3), mapped onto a ``VARTransformer``; depth =
  number of blocks, width / heads / classes / vocabulary from the tensor shapes, shared adaLN (d36)
  when ``shared_ada_lin`` is present. The fused ``mat_qkv`` is split into q / k / v, ``q_bias`` /
  ``v_bias`` become the q / v biases and the zero k-bias buffer, ``lvl_1L`` and the training mask are
  dropped (official ``models/basic_var.py`` ``SelfAttention`` / ``AdaLNSelfAttn``, ``models/var.py``).
* The scale schedule is read from the number of tokens (680 -> 256px ``1,2,...,13,16``, 2240 -> 512px
  ``1,2,3,4,6,9,13,18,24,32``, as the official ``--pn``) or given with ``--scales``.
* Sampling defaults are the official FID setting (README "cfg=1.5, top_p=0.96, top_k=900"):
  ``guidance_scale = 1 + cfg = 2.5`` with VAR's linear ramp over scales (docs/DESIGN.md §1).
"""

from __future__ import annotations

import re

import torch

from genmod.importers.files import ImportError_, atomic_output, check_keys, load_state_dict, resolve_file

HUB_FILES = ("hub:FoundationVision/var/vae_ch160v4096z32.pth", "hub:FoundationVision/var/var_d16.pth")
KNOWN_SCALES = {  # official utils/arg_util.py --pn 256 / 512 / 1024, keyed by the token count L
    680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    9451: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
SAMPLING = {"guidance_scale": 2.5, "top_k": 900, "top_p": 0.96}
VAE_PROBE = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "quantize.embedding.weight")
VAR_PROBE = ("pos_1LC", "class_emb.weight", "blocks.0.attn.mat_qkv.weight", "head.weight")
SIGNATURES = (("var-vae", "quantize.embedding.weight"), ("var", "blocks.0.attn.mat_qkv.weight"),
              ("causalfusion", "cond_pos_embed"), ("sit", "x_embedder.proj.weight"))
FILE_NAMES = {"var-vae": "VQVAE (vae_ch160v4096z32.pth)", "var": "VAR transformer (var_dNN.pth)"}


def guess_kind(keys) -> str | None:
    """The KIND a state dict's keys look like (``var-vae`` = VAR's VQVAE file), or None."""
    keys = set(keys)
    return next((kind for kind, key in SIGNATURES if key in keys or f"model.{key}" in keys), None)


def _other_kind(state: dict) -> str | None:
    guess = guess_kind(state)
    return None if guess in FILE_NAMES else guess


def _probe(state: dict, path: str, role: str, probe) -> None:
    """The wrong-model line before sizes are read: the probe keys must all be there. ``role``: the
    file expected here (``var-vae`` or ``var``); swapped files get their own line."""
    if all(k in state for k in probe):
        return
    guess = guess_kind(state)
    if guess in FILE_NAMES and guess != role:
        raise ImportError_(f"{path}: this is the {FILE_NAMES[guess]}, not the {FILE_NAMES[role]}; "
                           f"the order is genmod import var VAE_CKPT VAR_CKPT")
    check_keys(path, "var", set(probe), set(state), _other_kind(state))


def _count(state: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state for m in [regex.fullmatch(k)] if m})


def parse_scales(spec, num_tokens: int, num_scales: int, path: str) -> tuple:
    """The scale schedule: ``--scales`` (``"1,2,3"``) or the official one with ``num_tokens`` tokens."""
    if spec:
        scales = tuple(int(v) for v in str(spec).split(","))
    elif num_tokens in KNOWN_SCALES:
        scales = KNOWN_SCALES[num_tokens]
    else:
        raise ImportError_(f"{path}: {num_tokens} tokens match no official scale schedule; pass --scales 1,2,...")
    if sum(s * s for s in scales) != num_tokens or len(scales) != num_scales:
        raise ImportError_(f"--scales: {list(scales)} gives {sum(s * s for s in scales)} tokens in {len(scales)} scales; "
                           f"{path} has {num_tokens} tokens in {num_scales} scales")
    return scales


# ------------------------------------------------------------------------------------------ VQVAE
def vae_config(state: dict, path: str, scales) -> dict:
    """``VQTokenizer`` keywords of an official VQVAE state dict (sizes read from the tensors)."""
    _probe(state, path, "var-vae", VAE_PROBE)
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = _count(state, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    num_phi = _count(state, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight")
    if num_phi != 4:
        raise ImportError_(f"{path}: {num_phi} phi convs (quant_resi); genmod's msvq maps share_quant_resi=4 only")
    conv = state.get("quant_conv.weight")
    return dict(modality="image", in_channels=state["encoder.conv_in.weight"].shape[1], base_channels=ch,
                ch_mult=[state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)],
                num_res_blocks=_count(state, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight"),
                attention="encoder.mid.attn_1.qkv.weight" in state,
                attn_levels=[i for i in range(levels) if f"encoder.down.{i}.attn.0.qkv.weight" in state],
                quant_conv_kernel=0 if conv is None else conv.shape[-1], quantizer="msvq",
                latent_channels=state["quantize.embedding.weight"].shape[1],
                codebook_size=state["quantize.embedding.weight"].shape[0], scales=list(scales))


def _mid_map(side: str, attention: bool) -> dict:
    names = ["block_1", "attn_1", "block_2"] if attention else ["block_1", "block_2"]
    return {f"{side}.mid.{i}": f"{side}.mid.{name}" for i, name in enumerate(names)}


def _encoder_map(cfg: dict) -> dict:
    """genmod module prefix -> official module prefix for the encoder (same order as ``Encoder2d``)."""
    table, i = {"encoder.quant_conv": "quant_conv"}, 0
    for level in range(len(cfg["ch_mult"])):
        for b in range(cfg["num_res_blocks"]):
            table[f"encoder.down.{i}"], i = f"encoder.down.{level}.block.{b}", i + 1
            if level in cfg["attn_levels"]:
                table[f"encoder.down.{i}"], i = f"encoder.down.{level}.attn.{b}", i + 1
        if level != len(cfg["ch_mult"]) - 1:
            table[f"encoder.down.{i}.1"], i = f"encoder.down.{level}.downsample.conv", i + 1
    return {**table, **_mid_map("encoder", cfg["attention"])}


def _decoder_map(cfg: dict) -> dict:
    """genmod module prefix -> official module prefix for the decoder (same order as ``Decoder2d``)."""
    table, i = {"decoder.post_quant_conv": "post_quant_conv"}, 0
    for level in reversed(range(len(cfg["ch_mult"]))):
        for b in range(cfg["num_res_blocks"] + 1):
            table[f"decoder.up.{i}"], i = f"decoder.up.{level}.block.{b}", i + 1
            if level in cfg["attn_levels"]:
                table[f"decoder.up.{i}"], i = f"decoder.up.{level}.attn.{b}", i + 1
        if level != 0:
            table[f"decoder.up.{i}.1"], i = f"decoder.up.{level}.upsample.conv", i + 1
    return {**table, **_mid_map("decoder", cfg["attention"])}


LEAF_RENAMES = {"skip": "nin_shortcut", "proj": "proj_out", "codebook": "embedding"}


def vae_source(key: str, table: dict) -> str:
    """The official key of a genmod ``VQTokenizer`` key (module prefix table, then leaf renames)."""
    if key == "quantize_layer.ema_hits_per_scale":
        return "quantize.ema_vocab_hit_SV"
    phi = re.fullmatch(r"quantize_layer\.phis\.(\d+)\.conv\.(weight|bias)", key)
    if phi:
        return f"quantize.quant_resi.qresi_ls.{phi.group(1)}.{phi.group(2)}"
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix]] + [LEAF_RENAMES.get(p, p) for p in parts[cut:]])
    return ".".join([LEAF_RENAMES.get(p, p) for p in parts]).replace("quantize_layer.", "quantize.", 1)


def convert_vae(state: dict, path: str, scales):
    """An official VQVAE state dict -> ``VQTokenizer`` (every tensor placed, shapes checked)."""
    from genmod.tokenizers_vq.models import VQTokenizer

    cfg = vae_config(state, path, scales)
    model = VQTokenizer(**cfg)
    table = {**_encoder_map(cfg), **_decoder_map(cfg)}
    sources = {k: vae_source(k, table) for k in model.state_dict()}
    optional = {"quantize.ema_vocab_hit_SV"}  # usage statistics only (official load_state_dict resets them too)
    if state.get("quantize.ema_vocab_hit_SV", torch.empty(0)).shape != model.quantize_layer.ema_hits_per_scale.shape:
        sources.pop("quantize_layer.ema_hits_per_scale")
    return _load_mapped(model, state, path, {k: (v, None) for k, v in sources.items()}, optional)


# ------------------------------------------------------------------------------------- transformer
def var_config(state: dict, path: str, scales_spec=None) -> dict:
    """``VARTransformer`` keywords of an official VAR state dict."""
    _probe(state, path, "var", VAR_PROBE)
    if "blocks.0.attn.scale_mul_1H11" not in state:
        raise ImportError_(f"{path}: attention without l2-normalised q/k (attn_l2_norm=False) is not supported")
    width, depth = state["pos_1LC"].shape[-1], _count(state, r"blocks\.(\d+)\.attn\.mat_qkv\.weight")
    return dict(vocab_size=state["head.weight"].shape[0], latent_channels=state["word_embed.weight"].shape[1],
                scales=list(parse_scales(scales_spec, state["pos_1LC"].shape[1], state["lvl_embed.weight"].shape[0], path)),
                num_classes=state["class_emb.weight"].shape[0] - 1, depth=depth, width=width,
                num_heads=state["blocks.0.attn.scale_mul_1H11"].shape[1],
                mlp_ratio=state["blocks.0.ffn.fc1.weight"].shape[0] / width,
                shared_adaln="shared_ada_lin.1.weight" in state, init_adaln_gamma=1e-5)


VAR_RENAMES = (("class_embed.embedding_table.", "class_emb."), ("pos_embed", "pos_1LC"), ("level_embed.", "lvl_embed."),
               ("head_norm.", "head_nm."), (".attn.to_out.", ".attn.proj."), (".attn.log_temperature", ".attn.scale_mul_1H11"),
               (".mlp.", ".ffn."), (".attn.to_q.bias", ".attn.q_bias"), (".attn.to_v.bias", ".attn.v_bias"))


def var_source(key: str, width: int):
    """``(official key, rows)`` of a genmod ``VARTransformer`` key; ``rows`` slices the fused qkv."""
    qkv = re.fullmatch(r"(blocks\.\d+\.attn)\.to_([qkv])\.weight", key)
    if qkv:
        start = "qkv".index(qkv.group(2)) * width
        return f"{qkv.group(1)}.mat_qkv.weight", slice(start, start + width)
    for new, old in VAR_RENAMES:
        if new in key:
            return key.replace(new, old, 1), None
    return key, None


def convert_var(state: dict, path: str, scales_spec=None):
    """An official VAR state dict -> ``VARTransformer``."""
    from genmod.var.transformer import VARTransformer

    cfg = var_config(state, path, scales_spec)
    model = VARTransformer(**cfg)
    sources = {k: var_source(k, cfg["width"]) for k in model.state_dict()}
    optional = {"lvl_1L", "attn_bias_for_masking"} | {k for k in state if k.endswith(".attn.zero_k_bias")}
    return _load_mapped(model, state, path, sources, optional)


def _load_mapped(model, state: dict, path: str, sources: dict, optional: set):
    """Check the official keys (one line), gather each genmod tensor from its source, load strictly."""
    expected = {src for src, _ in sources.values()}
    check_keys(path, "var", expected, set(state) - (optional - expected), _other_kind(state))
    target = model.state_dict()
    mapped = {}
    for key, (src, rows) in sources.items():
        tensor = state[src] if rows is None else state[src][rows]
        if tensor.numel() != target[key].numel():
            raise ImportError_(f"{path}: {src} has shape {tuple(tensor.shape)}, expected {tuple(target[key].shape)} "
                               f"for genmod's {key}")
        mapped[key] = tensor.reshape(target[key].shape).to(target[key].dtype)
    model.load_state_dict(mapped, strict=True)
    return model.eval()


# -------------------------------------------------------------------------------------- the command
def build_pipeline(vae_path: str, var_path: str, scales_spec=None, **sampling):
    """A ``VARPipeline`` from the two official files (local paths)."""
    from genmod.var.pipeline import VARPipeline

    transformer = convert_var(load_state_dict(var_path), var_path, scales_spec)
    vqvae = convert_vae(load_state_dict(vae_path), vae_path, transformer.config.scales)
    return VARPipeline(transformer=transformer, vqvae=vqvae, **{**SAMPLING, **sampling})


def add_arguments(parser) -> None:
    parser.add_argument("--scales", default=None, help="scale schedule, e.g. 1,2,3,4,5,6,8,10,13,16 (default: "
                                                       "read from the token count)")
    parser.add_argument("--guidance_scale", "--guidance", type=float, default=SAMPLING["guidance_scale"],
                        help="saved default CFG weight w = 1 + official cfg (2.5 = cfg 1.5)")
    parser.add_argument("--top_k", type=int, default=SAMPLING["top_k"], help="saved default top-k (official 900)")
    parser.add_argument("--top_p", type=float, default=SAMPLING["top_p"], help="saved default top-p (official 0.96)")


def run(args) -> str:
    if len(args.checkpoints) != 2:
        raise ImportError_(f"CHECKPOINT: var needs VAE_CKPT VAR_CKPT (e.g. {' '.join(HUB_FILES)}), "
                           f"got {len(args.checkpoints)} file(s)")
    vae_path = resolve_file(args.checkpoints[0], "VAE_CKPT")
    var_path = resolve_file(args.checkpoints[1], "VAR_CKPT")
    pipe = build_pipeline(vae_path, var_path, args.scales, guidance_scale=args.guidance_scale,
                          top_k=args.top_k, top_p=args.top_p)
    with atomic_output(args.out) as staging:
        pipe.save_pretrained(staging)
    return args.out
