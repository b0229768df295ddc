#!/usr/bin/env python
"""LatentLM on shapes: quality against the diffusion head's DPM-Solver++ steps, plus captioning.

    OMP_NUM_THREADS=1 python benchmarks/latentlm_head_steps.py runs/latentlm/shapes/pipeline --num 200 \
        --json runs/latentlm/shapes/head_steps.json --grid-dir runs/latentlm/shapes

For each number of head steps (default 5, 10, 25, 50) the pipeline generates ``--num`` images from the
captions of held-out shapes (text-to-image) and reports the shapes domain classifier's accuracy
against the prompt's shape, domain FID / KID against held-out real images, and the real-vs-real floor
at the same N (``genmod.evals.feature_net``). Captioning: the same model captions ``--num`` held-out real
images greedily; a caption counts as right when it names the true shape (and, separately, the exact
caption). With ``--grid-dir`` it also draws ``prompt_grid.png``: one row per shape, one column per colour,
for the prompt "a large <colour> <shape> in the center". Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def shape_of(caption: str, class_names: list[str]) -> int:
    """The class whose name appears in the caption (longest match first, so 'ring' is not inside 'string')."""
    words = caption.replace(",", " ").split()
    for idx in sorted(range(len(class_names)), key=lambda i: -len(class_names[i])):
        if class_names[idx] in words:
            return idx
    return -1


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", help="a saved LatentLMPipeline folder (text-conditional, shapes)")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--steps", default="5,10,25,50")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="scale of the head's initial noise (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", default=None)
    parser.add_argument("--grid-dir", default=None, help="write one PNG grid per step count here")
    args = parser.parse_args(argv)

    from genmod.evals.feature_net import classifier_accuracy, get_feature_net
    from genmod.evals.held_out import domain_fidelity
    from genmod.data import get_dataset
    from genmod.data.io import save_image_grid
    from genmod.latentlm.pipeline import LatentLMPipeline

    torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "1")))))
    pipe = LatentLMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    n = args.num
    test = get_dataset("shapes", split="test", num_samples=3 * n)
    class_names = list(test.class_names)
    items = [test[i] for i in range(3 * n)]
    prompts = [it["caption"] for it in items[:n]]
    labels = torch.tensor([int(it["label"]) for it in items[:n]])
    real_a = torch.stack([it["image"] for it in items[n:2 * n]])
    real_b = torch.stack([it["image"] for it in items[2 * n:]])
    net = get_feature_net("shapes")

    def fidelity(fake):
        """Domain FID / KID (and the floor) of ``fake``; the one implementation in ``genmod.evals.held_out``."""
        return domain_fidelity(fake, real_a, real_b, "shapes", kid_subset_size=n)

    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        images, start_time = [], time.perf_counter()
        for start in range(0, n, args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            out = pipe(prompt=chunk, num_head_steps=steps, guidance_scale=args.guidance, temperature=args.temperature,
                       output_type="pt",
                       generator=[torch.Generator().manual_seed(10_000 + start + i) for i in range(len(chunk))]).images
            images.append(out * 2 - 1)
        seconds = time.perf_counter() - start_time
        fake = torch.cat(images)
        scores = fidelity(fake)
        fid, kid = scores["domain_fid"], scores["domain_kid"]
        floor_fid, floor_kid = scores["domain_fid_floor"], scores["domain_kid_floor"]
        rows.append({"head_steps": steps, "accuracy_vs_prompt": classifier_accuracy(net, fake, labels),
                     "domain_fid": fid, "domain_kid": kid, "seconds": seconds})
        if args.grid_dir:
            save_image_grid(fake[:64], os.path.join(args.grid_dir, f"t2i_head_steps_{steps}.png"), nrow=8, scale=3)
            with open(os.path.join(args.grid_dir, f"t2i_head_steps_{steps}_prompts.txt"), "w") as f:
                f.write("\n".join(prompts[:64]))
    if args.grid_dir:  # shape x colour grid of fixed prompts at the pipeline's default head steps
        from genmod.data.shapes import COLOUR_NAMES

        grid_prompts = [f"a large {c} {shape} in the center" for shape in class_names for c in COLOUR_NAMES]
        grid = pipe(prompt=grid_prompts, guidance_scale=args.guidance, temperature=args.temperature, output_type="pt",
                    generator=[torch.Generator().manual_seed(20_000 + i) for i in range(len(grid_prompts))]).images
        save_image_grid(grid * 2 - 1, os.path.join(args.grid_dir, "prompt_grid.png"), nrow=len(COLOUR_NAMES), scale=3)
    # captioning held-out real images (greedy)
    captions = []
    real = torch.stack([it["image"] for it in items[:n]])
    for start in range(0, n, args.batch_size):
        captions += pipe.caption(real[start:start + args.batch_size])
    shape_right = sum(shape_of(c, class_names) == int(y) for c, y in zip(captions, labels)) / n
    exact = sum(c == p for c, p in zip(captions, prompts)) / n
    result = {"num": n, "floor_domain_fid": floor_fid, "floor_domain_kid": floor_kid, "rows": rows,
              "caption_shape_accuracy": shape_right, "caption_exact_match": exact,
              "caption_examples": [{"truth": p, "caption": c} for p, c in zip(prompts[:12], captions[:12])],
              "guidance_scale": args.guidance if args.guidance is not None else pipe.config.guidance_scale,
              "temperature": args.temperature if args.temperature is not None else pipe.config.temperature,
              "feature_net": net.describe(), "pipeline": args.pipeline}
    print(f"LatentLM text-to-image on shapes, N={n}, guidance {result['guidance_scale']}, temperature {result['temperature']}; "
          f"real-vs-real floor: domain FID {floor_fid:.2f}, KID {floor_kid:.4f}")
    print("| head steps | accuracy vs prompt | domain FID | domain KID | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head_steps']} | {r['accuracy_vs_prompt']:.3f} | {r['domain_fid']:.2f} | {r['domain_kid']:.4f} | {r['seconds']:.1f} |")
    print(f"captioning: shape named correctly {shape_right:.3f}, exact caption {exact:.3f}")
    for ex in result["caption_examples"][:6]:
        print(f"  truth: {ex['truth']!r:45s} caption: {ex['caption']!r}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
