#!/usr/bin/env python
"""LatentLM sampling throughput with and without the KV cache (same samples either way).

    OMP_NUM_THREADS=1 python benchmarks/latentlm_kv_cache.py [PIPELINE_DIR] --batch 16 --json out.json

With a pipeline folder the trained model is timed (text prompts); without one, a randomly initialised
LatentLMTransformer of the given size over an 8x8 latent grid. Both variants run in the same process,
interleaved over ``--rounds`` so machine load hits them alike; the table reports samples/s (median
over rounds), the speed-up ratio and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", nargs="?", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--head-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from genmod.latentlm.sampling import generate_latents
    from genmod.latentlm.text import BOL, BOS, LatentLMTokenizer
    from genmod.latentlm.transformer import LatentLMTransformer

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if args.pipeline:
        from genmod.latentlm.pipeline import LatentLMPipeline

        model = LatentLMPipeline.from_pretrained(args.pipeline).transformer.eval()
    else:
        torch.manual_seed(0)
        model = LatentLMTransformer(latent_channels=8, latent_grid=(args.grid, args.grid), hidden_size=args.hidden_size,
                                    depth=args.depth, num_heads=4, head_width=args.hidden_size).eval()
    tok = LatentLMTokenizer(model.config.num_classes)
    prompts = [[BOS, *tok.encode(f"a small red circle number {i}"), BOL] for i in range(args.batch)]
    null = [[BOS, BOL]] * args.batch
    times = {True: [], False: []}
    outputs = {}
    for _ in range(args.rounds):
        for cached in (True, False):
            start = time.perf_counter()
            outputs[cached] = generate_latents(model, prompts, null, args.head_steps, args.guidance, 1.0,
                                               torch.Generator().manual_seed(0), use_kv_cache=cached)
            times[cached].append(time.perf_counter() - start)
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    result = {"batch": args.batch, "latent_tokens": model.num_latent_tokens, "head_steps": args.head_steps,
              "guidance": args.guidance, "samples_per_s_cached": rate[True], "samples_per_s_uncached": rate[False],
              "speedup": rate[True] / rate[False], "max_abs_diff": float((outputs[True] - outputs[False]).abs().max()),
              "model": "pipeline " + args.pipeline if args.pipeline else f"random h{args.hidden_size} d{args.depth}",
              "threads": torch.get_num_threads()}
    print(f"LatentLM sampling, {result['model']}, batch {args.batch}, {result['latent_tokens']} latent tokens, "
          f"{args.head_steps} head steps, CFG {args.guidance}, {result['threads']} thread(s), median of {args.rounds}")
    print("| KV cache | samples/s | ratio |")
    print("|---|---|---|")
    print(f"| on | {rate[True]:.2f} | {result['speedup']:.2f}x |")
    print(f"| off (recompute) | {rate[False]:.2f} | 1.00x |")
    print(f"max |cached - recomputed| = {result['max_abs_diff']:.2e}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
