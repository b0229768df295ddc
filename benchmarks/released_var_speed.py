"""VAR sampling time: genmod vs the official code (FoundationVision/VAR) in one process, same random weights.

    python benchmarks/released_var_speed.py OFFICIAL_VAR_CHECKOUT [--depth 16] [--batch 8] [--repeats 1]

Builds the official VQVAE (vae_ch160v4096z32 architecture) and VAR-dN at 256px with random weights,
imports both into genmod through ``genmod.importers.var`` (the same mapping as ``genmod import var``),
then times ``autoregressive_infer_cfg(cfg=1.5, top_k=900, top_p=0.96)`` against ``VARPipeline``
(guidance 2.5, same top-k / top-p) with the same seed, image decoding included, and reports the seconds
plus whether the sampled images agree. Prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

import torch


def build_official(path: str, depth: int):
    sys.path.insert(0, os.path.abspath(path))
    from models import build_vae_var

    torch.manual_seed(0)
    vae, var = build_vae_var(device="cpu", depth=depth, shared_aln=False, attn_l2_norm=True,
                             flash_if_available=False, fused_if_available=False)
    with torch.no_grad():  # build_vae_var skips the default inits of convs / norms: give every tensor values
        for name, p in vae.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight")
                    else torch.randn_like(p) * 0.02)
    return vae.eval(), var.eval()


def to_genmod(vae, var):
    from genmod.importers.var import SAMPLING, convert_vae, convert_var
    from genmod.var.pipeline import VARPipeline

    transformer = convert_var({k: v for k, v in var.state_dict().items()}, "official VAR")
    vqvae = convert_vae({k: v for k, v in vae.state_dict().items()}, "official VQVAE", transformer.config.scales)
    return VARPipeline(transformer=transformer, vqvae=vqvae, **SAMPLING)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("official")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vae, var = build_official(args.official, args.depth)
    pipe = to_genmod(vae, var)
    labels = torch.arange(args.batch) * 97 % 1000
    official_s, official_img = timed(lambda: var.autoregressive_infer_cfg(
        B=args.batch, label_B=labels, g_seed=args.seed, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False), args.repeats)
    genmod_s, genmod_img = timed(lambda: pipe(class_labels=labels.tolist(), output_type="pt",
                                              generator=torch.Generator().manual_seed(args.seed)).images, args.repeats)
    print(json.dumps({"depth": args.depth, "batch": args.batch, "threads": torch.get_num_threads(),
                      "official_s": round(official_s, 2), "genmod_s": round(genmod_s, 2),
                      "max_image_diff": float((official_img - genmod_img).abs().max())}))


if __name__ == "__main__":
    main()
