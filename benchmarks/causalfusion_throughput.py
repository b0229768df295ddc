#!/usr/bin/env python
"""CausalFusion sampling throughput against the number of AR steps, with and without the KV cache.

At a fixed budget of ``--nfe`` noisy-token network calls per sample (N AR steps x nfe/N Euler steps;
pure AR runs one step per token), the cached sampler runs each step's tokens against the cached
prefix, the uncached one re-runs ``[cond | clean prefix | noisy step]`` under the generalized causal
mask every call. The peer is a FlowTransformer (DiT) of the same width and depth at the same NFE,
measured in the same run. Weights are random: throughput does not depend on them.

    python benchmarks/causalfusion_throughput.py --batch 16 --out runs/causalfusion/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--nfe", type=int, default=16)
    p.add_argument("--ar-steps", default="1,2,4,8,16,64")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/causalfusion/throughput.json")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    from genmod.causalfusion import CausalFusionTransformer, sample_tokens
    from genmod.flow.transformer import FlowTransformer
    from genmod.samplers import get_time_grid, sample_ode

    torch.manual_seed(0)
    size = dict(in_channels=3, sample_size=32, patch_size=4, hidden_size=args.hidden_size, depth=args.depth,
                num_heads=args.hidden_size // 32, num_classes=8)
    cf = CausalFusionTransformer(**size, num_cond_tokens=4).to(args.device).eval()
    flow = FlowTransformer(**size).to(args.device).eval()
    labels = torch.arange(args.batch, device=args.device) % 8
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def flow_run():
        x = torch.randn(args.batch, 3, 32, 32, device=args.device)
        with torch.no_grad():
            sample_ode(lambda x, t: flow(x, 1000 * t, labels).sample, x, get_time_grid("uniform", args.nfe), method="euler")
        sync()

    flow_seconds = timed(flow_run, args.repeats)
    rows = [{"model": "flow (DiT peer)", "ar_steps": 1, "steps": args.nfe, "nfe": args.nfe, "cached": None,
             "seconds": flow_seconds, "images_per_s": args.batch / flow_seconds}]
    for ar_steps in [int(a) for a in args.ar_steps.split(",")]:
        steps = max(1, args.nfe // ar_steps)
        for cached in (True, False):
            def run():
                sample_tokens(cf, labels, args.batch, num_ar_steps=ar_steps, num_inference_steps=steps,
                              generator=torch.Generator().manual_seed(0), use_cache=cached)
                sync()

            seconds = timed(run, args.repeats)
            rows.append({"model": "causalfusion", "ar_steps": ar_steps, "steps": steps, "nfe": ar_steps * steps,
                         "cached": cached, "seconds": seconds, "images_per_s": args.batch / seconds})
            print(f"  N={ar_steps} cached={cached}: {seconds:.2f} s", flush=True)

    print(f"\nbatch {args.batch}, width {args.hidden_size}, depth {args.depth}, 64 tokens, device {args.device}, "
          f"threads {torch.get_num_threads()}\n")
    print("| model | AR steps | steps / AR step | NFE | KV cache | seconds / batch | images / s | time vs flow | uncached / cached |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["ar_steps"], r["cached"]): r for r in rows if r["model"] == "causalfusion"}
    for r in rows:
        ratio = ""
        if r["cached"] is False:
            ratio = f"{r['seconds'] / by_key[(r['ar_steps'], True)]['seconds']:.2f}"
        cache = "-" if r["cached"] is None else ("yes" if r["cached"] else "no")
        print(f"| {r['model']} | {r['ar_steps']} | {r['steps']} | {r['nfe']} | {cache} | {r['seconds']:.3f} | "
              f"{r['images_per_s']:.1f} | {r['seconds'] / flow_seconds:.2f} | {ratio} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"batch": args.batch, "device": args.device, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
