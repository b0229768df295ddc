"""Collect the `genmod eval` reports of benchmarks/flow_reflow_shapes.sh into one JSON / markdown table and a sample grid.

    python benchmarks/flow_reflow_collect.py --runs /work/runs/flow18b --out benchmarks/results/flow_core [--grid]

Rows: Euler steps 1, 2, 4, 8; columns: the teacher (Euler, CFG 2), the reflowed model and the 2-step student
(Euler, no CFG); the teacher at 50 Euler steps (CFG 2) is the reference. Domain FID / KID at N = 300 with the
real-vs-real floor at the same N, and the domain classifier's accuracy on the samples.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

EVALS = {"teacher Euler, CFG 2": "eval_teacher_euler", "reflow (2-RF), no CFG": "eval_reflow",
         "2-step student, no CFG": "eval_distill2"}


def read_runs(folder: str) -> list[dict]:
    path = os.path.join(folder, "report.json")
    if not os.path.exists(path):
        return []
    rows = []
    for run in json.load(open(path))["runs"]:
        domain = run["spaces"]["domain"]
        rows.append({"steps": run["settings"]["steps"], "guidance": run["settings"]["guidance"],
                     "fid": domain["model"]["fid"], "kid": domain["model"]["kid"], "kid_std": domain["model"]["kid_std"],
                     "floor_fid": domain["real_vs_real"]["fid"], "accuracy": run.get("classifier_accuracy")})
    return rows


def markdown(results: dict) -> str:
    ref = [r for r in results.get("teacher Euler, CFG 2") or [] if r["steps"] == 50]
    lines = []
    if ref:
        r = ref[0]
        lines.append(f"Reference: the teacher at 50 Euler steps, CFG 2 (100 network evaluations per sample): "
                     f"domain-FID {r['fid']:.2f} (floor {r['floor_fid']:.2f}), KID {r['kid']:.2f} ± {r['kid_std']:.2f}, "
                     f"class accuracy {r['accuracy']:.3f}.\n")
    names = [n for n in EVALS if results.get(n)]
    lines.append("| Euler steps | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for steps in (1, 2, 4, 8):
        cells = []
        for name in names:
            row = next((r for r in results[name] if r["steps"] == steps), None)
            cells.append("-" if row is None else f"{row['fid']:.2f} / {row['kid']:.2f} / {row['accuracy']:.2f}")
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    lines.append("\nCells: domain-FID / domain-KID / class accuracy of the samples (N = 300).")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def grid(runs: str, path: str) -> None:
    """One row per model x steps: 8 samples (classes cycled), the same noise everywhere."""
    from PIL import Image

    from genmod.pipelines import load_pipeline

    rows = []
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    models = [("teacher_euler", 2.0), ("reflow_shapes/pipeline", 1.0), ("distill2_shapes/pipeline", 1.0)]
    for folder, w in models:
        pipe = load_pipeline(os.path.join(runs, folder))
        pipe.set_progress_bar_config(disable=True)
        labels = torch.arange(8) % pipe.transformer.config.num_classes
        for steps in (1, 2, 4):
            x = pipe(class_labels=labels.tolist(), latents=noise.clone(), num_inference_steps=steps, guidance_scale=w,
                     output_type="pt").images
            rows.append(torch.cat(list(x), dim=2))
    image = (torch.cat(rows, dim=1).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(image).save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="/work/runs/flow18b")
    parser.add_argument("--out", default="benchmarks/results/flow_core")
    parser.add_argument("--grid", action="store_true", help="also write reflow_shapes_grid.png (rows: teacher, reflow, "
                        "student at 1 / 2 / 4 Euler steps)")
    args = parser.parse_args(argv)
    results = {name: read_runs(os.path.join(args.runs, folder)) for name, folder in EVALS.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reflow_shapes.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(os.path.join(args.out, "reflow_shapes.md"), "w") as f:
        f.write(text)
    print(text)
    if args.grid:
        grid(args.runs, os.path.join(args.out, "reflow_shapes_grid.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
