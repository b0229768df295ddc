#!/usr/bin/env python
"""VAR sampling throughput with and without the KV cache (and, optionally, the official VAR code).

    python benchmarks/var_kv_cache.py                       # small config, CPU
    python benchmarks/var_kv_cache.py --depth 16 --scales 1,2,3,4,5,6,8,10,13,16 --vocab 4096 --latent 32 --device cuda
    python benchmarks/var_kv_cache.py --official /path/to/FoundationVision/VAR   # same config in their code

Both paths run the same model, the same CFG-doubled batch and the same sampler (``var_generate``):
with the cache each scale runs only its own tokens against cached keys/values; without it every scale
re-runs the whole prefix under the block-causal mask (identical logits, tests/test_var.py). Random
weights (speed does not depend on them). ``--official`` times the official ``autoregressive_infer_cfg``
(decoder stubbed out) and one training forward+backward on the same sizes, from a checkout you fetched yourself (never
vendored). Prints a markdown table with ratios measured in this run and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def timed(fns: dict, repeats: int, device: str) -> dict:
    """Median seconds of each ``fn()`` over ``repeats`` rounds after one warm-up. The functions run
    round-robin (one of each per round) so that load drifting on a shared machine hits all alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def build(args):
    from genmod.var import VARTransformer
    from genmod.tokenizers_vq.quantizers import MultiScaleResidualVQ

    scales = [int(s) for s in args.scales.split(",")]
    torch.manual_seed(0)
    quantizer = MultiScaleResidualVQ(args.latent, args.vocab, scales=scales).to(args.device).eval()
    model = VARTransformer(vocab_size=args.vocab, latent_channels=args.latent, scales=scales, num_classes=args.classes,
                           depth=args.depth).to(args.device).eval()
    return model, quantizer, scales


def official_functions(args, scales) -> dict:
    """Official VAR (a fetched checkout at ``args.official``) on the same sizes: its sampler
    (``autoregressive_infer_cfg`` with the decoder stubbed out: our timing stops at ``f_hat`` too) and a
    training forward + backward."""
    sys.path.insert(0, args.official)
    from models.var import VAR  # noqa: E402  (official code, imported from the user's checkout)
    from models.vqvae import VQVAE

    torch.manual_seed(0)
    vae = VQVAE(vocab_size=args.vocab, z_channels=args.latent, ch=32, test_mode=True, share_quant_resi=4,
                v_patch_nums=tuple(scales)).to(args.device)
    var = VAR(vae, num_classes=args.classes, depth=args.depth, embed_dim=64 * args.depth, num_heads=args.depth,
              mlp_ratio=4.0, drop_path_rate=0.1 * args.depth / 24, attn_l2_norm=True, patch_nums=tuple(scales),
              flash_if_available=False, fused_if_available=False).to(args.device)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=-1)
    labels = torch.arange(args.batch, device=args.device) % args.classes
    L = sum(s * s for s in scales)
    x = torch.randn(args.batch, L - 1, args.latent, device=args.device)
    target = torch.randint(0, args.vocab, (args.batch, L), device=args.device)

    vae.fhat_to_img = lambda f: f  # stop at f_hat as ours does (their decoder is not what is compared)

    def sample():
        var.eval()
        with torch.no_grad():
            var.autoregressive_infer_cfg(B=args.batch, label_B=labels, g_seed=0, cfg=1.5, top_k=0, top_p=0.96)

    def train_step():
        var.train()
        torch.nn.functional.cross_entropy(var(labels, x).flatten(0, 1), target.flatten()).backward()
        var.zero_grad(set_to_none=True)

    return {"official_sample": sample, "official_train": train_step}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--scales", default="1,2,3,4,6,8")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--official", default=None, help="path to a fetched FoundationVision/VAR checkout (optional)")
    p.add_argument("--json", default="benchmarks/results/var_kv_cache.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from genmod.var import var_generate
    from genmod.var.transformer import var_loss

    model, quantizer, scales = build(args)
    labels = torch.arange(args.batch, device=args.device) % args.classes

    def run(cache: bool):
        def sample():
            model.eval()
            var_generate(model, quantizer, labels, guidance_scale=2.5, top_p=0.96,
                         generator=torch.Generator(args.device).manual_seed(0), use_kv_cache=cache)
        return sample

    fns = {"kv_cache": run(True), "no_cache": run(False)}
    if args.official:
        inputs = torch.randn(args.batch, model.num_tokens - 1, args.latent, device=args.device)
        target = torch.randint(0, args.vocab, (args.batch, model.num_tokens), device=args.device)

        def ours_train():
            model.train()
            var_loss(model(labels, inputs, dropout_generator=torch.Generator(args.device).manual_seed(0)).logits,
                     target).backward()
            model.zero_grad(set_to_none=True)

        fns.update(ours_train=ours_train, **official_functions(args, scales))
    t = timed(fns, args.repeats, args.device)
    cached, uncached = t["kv_cache"], t["no_cache"]
    result = {"device": args.device, "threads": torch.get_num_threads(), "depth": args.depth, "scales": scales,
              "tokens": model.num_tokens, "vocab": args.vocab, "batch": args.batch, "cfg_doubled_batch": 2 * args.batch,
              "repeats": args.repeats, "kv_cache_seconds": cached, "no_cache_seconds": uncached,
              "kv_cache_images_per_s": args.batch / cached, "no_cache_images_per_s": args.batch / uncached,
              "no_cache_over_kv_cache": uncached / cached}
    rows = [("KV cache (per-scale append)", cached, 1.0), ("no cache (re-run prefix, masked)", uncached, uncached / cached)]
    if args.official:
        official_sample = t["official_sample"]
        result.update(official_sample_seconds=official_sample, official_train_step_seconds=t["official_train"],
                      ours_train_step_seconds=t["ours_train"],
                      official_over_ours_sampling=official_sample / cached,
                      official_over_ours_training=t["official_train"] / t["ours_train"])
        rows.append(("official VAR sampler (KV cache, stops at f_hat)", official_sample, official_sample / cached))
    print(f"\nVAR sampling, depth {args.depth} (width {model.width}), scales {scales} ({model.num_tokens} tokens), "
          f"batch {args.batch} (x2 for CFG), {args.device}, {torch.get_num_threads()} threads\n")
    print("| sampler | s / batch | images / s | time vs KV cache |")
    print("|---|---|---|---|")
    for name, seconds, ratio in rows:
        print(f"| {name} | {seconds:.3f} | {args.batch / seconds:.1f} | {ratio:.2f}x |")
    if args.official:
        print(f"\ntraining step (fwd+bwd, batch {args.batch}): ours {result['ours_train_step_seconds']:.3f} s, "
              f"official {result['official_train_step_seconds']:.3f} s (official / ours = {result['official_over_ours_training']:.2f})")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
