#!/usr/bin/env python
"""Domain-FID of a trained CausalFusion model against the number of AR steps at equal network evaluations.

For a budget of ``--nfe`` noisy-token network calls per sample, ``N`` AR steps get ``nfe / N`` Euler
steps each (N = 1 is plain diffusion; N = number of tokens, one step each, is pure AR and is run at
its own NFE). The flow model of the same size and training budget is sampled with ``--nfe`` Euler
steps as the peer. Every row reports domain-FID / KID against held-out real images next to the
real-vs-real floor at the same N, and the domain classifier's accuracy on the generated classes.
Also writes inpainting / outpainting examples of the CausalFusion model.

    python benchmarks/causalfusion_ar_steps_fid.py --cf runs/causalfusion/shapes_cf --flow runs/causalfusion/shapes_flow \
        --out runs/causalfusion/ar_steps_fid
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def load(path):
    from genmod.sampling import load_for_sampling

    pipe = load_for_sampling(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, labels, guidance, seed, batch=100, **kwargs):
    images = []
    for start in range(0, len(labels), batch):
        chunk = labels[start:start + batch].tolist()
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images.append(pipe(class_labels=chunk, guidance_scale=guidance, generator=gens, output_type="pt", **kwargs).images)
    return torch.cat(images) * 2 - 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--cf", required=True, help="CausalFusion training output or pipeline folder")
    p.add_argument("--flow", default=None, help="flow peer of the same size / budget (training output or pipeline)")
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--nfe", type=int, default=16)
    p.add_argument("--ar-steps", default="1,2,4,8,16")
    p.add_argument("--num-eval", type=int, default=500)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--solver", default="euler", help="ODE solver of both models (NFE counts assume one call per step)")
    p.add_argument("--pure-ar", action="store_true", help="also run N = number of tokens with one step each")
    p.add_argument("--out", default="runs/causalfusion/ar_steps_fid")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    os.makedirs(args.out, exist_ok=True)

    from genmod.evals.held_out import domain_fidelity, held_out_pair
    from genmod.data import get_dataset

    n = args.num_eval
    test = get_dataset(args.dataset, split="test", num_samples=2 * n)
    real_a, real_b = held_out_pair(args.dataset, n)

    def fidelity(images, labels):
        """Domain FID / KID (and the floor) of ``images``; the one implementation in ``genmod.evals.held_out``."""
        return domain_fidelity(images, real_a, real_b, args.dataset, labels=labels, kid_subset_size=min(n, 1000))

    cf = load(args.cf)
    num_classes = cf.transformer.config.num_classes
    labels = torch.arange(n) % num_classes
    rows = []

    def add_row(model, ar_steps, steps, images, seconds):
        m = fidelity(images, labels)
        rows.append({"model": model, "ar_steps": ar_steps, "steps_per_ar_step": steps, "nfe": ar_steps * steps,
                     "fid": m["domain_fid"], "kid": m["domain_kid"], "accuracy": m["classifier_accuracy"],
                     "fid_floor": m["domain_fid_floor"], "kid_floor": m["domain_kid_floor"], "sample_seconds": seconds})
        print(f"  {model} N={ar_steps} steps={steps}: FID {m['domain_fid']:.2f} (floor {m['domain_fid_floor']:.2f})",
              flush=True)

    settings = [(int(a), args.nfe // int(a)) for a in args.ar_steps.split(",") if args.nfe // int(a) >= 1]
    if args.pure_ar:
        settings.append((cf.transformer.num_tokens, 1))
    for ar_steps, steps in settings:
        start = time.time()
        images = generate(cf, labels, args.guidance, 10_000, num_ar_steps=ar_steps, num_inference_steps=steps,
                          solver=args.solver)
        add_row("causalfusion", ar_steps, steps, images, time.time() - start)
    if args.flow:
        flow = load(args.flow)
        flow.scheduler = type(flow.scheduler).from_config(flow.scheduler.config, solver=args.solver)
        start = time.time()
        images = generate(flow, labels, args.guidance, 10_000, num_inference_steps=args.nfe)
        add_row("flow", 1, args.nfe, images, time.time() - start)

    # zero-shot editing examples: held-out images, in-painting and out-painting with 4 AR steps
    from torchvision.utils import save_image

    originals = real_b[:8]
    edit_labels = [int(test[n + i]["label"]) for i in range(8)]
    panels = [originals]
    for kind in ("inpaint", "outpaint", "left"):
        keep = cf.edit_mask(kind, originals.shape[-1])
        panels.append(torch.where(keep, originals, torch.zeros_like(originals)))
        edited = cf.edit(originals, kind, class_labels=edit_labels, num_ar_steps=4, num_inference_steps=4, solver=args.solver,
                         guidance_scale=args.guidance, generator=[torch.Generator().manual_seed(i) for i in range(8)],
                         output_type="pt").images
        panels.append(edited * 2 - 1)
    save_image(torch.cat(panels) / 2 + 0.5, os.path.join(args.out, "editing.png"), nrow=8, padding=2)
    grid = generate(cf, torch.arange(64) % num_classes, args.guidance, 0, num_ar_steps=4, num_inference_steps=args.nfe // 4,
                    solver=args.solver)
    save_image(grid / 2 + 0.5, os.path.join(args.out, "samples_ar4.png"), nrow=8, padding=2)

    print("\n| model | AR steps N | steps / AR step | NFE | domain-FID | KID | accuracy | FID floor | FID / floor | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ar_steps']} | {r['steps_per_ar_step']} | {r['nfe']} | {r['fid']:.2f} | {r['kid']:.4f} | "
              f"{r['accuracy']:.3f} | {r['fid_floor']:.2f} | {r['fid'] / max(r['fid_floor'], 1e-9):.1f} | {r['sample_seconds']:.0f} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"num_eval": n, "guidance": args.guidance, "nfe": args.nfe, "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cf_rows = [r for r in rows if r["model"] == "causalfusion" and r["nfe"] == args.nfe]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["ar_steps"] for r in cf_rows], [r["fid"] for r in cf_rows], "o-", label=f"CausalFusion ({args.nfe} NFE)")
    for r in rows:
        if r["model"] == "flow":
            ax.axhline(r["fid"], color="C1", ls="--", label=f"flow ({r['nfe']} NFE)")
    ax.axhline(rows[0]["fid_floor"], color="gray", ls=":", label=f"real vs real (N={n})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("AR steps N")
    ax.set_ylabel("domain-FID")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fid_vs_ar_steps.png"), dpi=120)
    print(f"wrote {args.out}/results.json, fid_vs_ar_steps.png, editing.png, samples_ar4.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
