"""Collect the `genmod eval` reports of benchmarks/flow_reflow.sh into one JSON / markdown table and a sample grid.

    python benchmarks/flow_reflow_collect.py --runs runs/flow18b --dataset shapes --out benchmarks/results/flow_core [--grid]

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
    """Rows of one eval folder (``FOLDER_DATASET``, or the unsuffixed name the shapes run of session 6 used)."""
    path = next((os.path.join(f, "report.json") for f in (folder, folder.rsplit("_", 1)[0])
                 if os.path.exists(os.path.join(f, "report.json"))), None)
    if path is None:
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
def grid(runs: str, dataset: str, path: str) -> None:
    """One row per model x steps: 8 samples (classes cycled), the same noise everywhere."""
    from PIL import Image

    from genmod.pipelines import load_pipeline

    rows = []
    teacher = f"teacher_euler_{dataset}" if os.path.isdir(os.path.join(runs, f"teacher_euler_{dataset}")) else "teacher_euler"
    models = [(teacher, 2.0), (f"reflow_{dataset}/pipeline", 1.0), (f"distill2_{dataset}/pipeline", 1.0)]
    noise = None
    for folder, w in models:
        pipe = load_pipeline(os.path.join(runs, folder))
        if noise is None:
            cfg = pipe.transformer.config
            noise = torch.randn(8, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(0))
        pipe.set_progress_bar_config(disable=True)
        labels = torch.arange(8) % pipe.transformer.config.num_classes
        for steps in (1, 2, 4):
            x = pipe(class_labels=labels.tolist(), latents=noise.clone(), num_inference_steps=steps, guidance_scale=w,
                     output_type="pt").images
            rows.append(torch.cat(list(x), dim=2))
    image = (torch.cat(rows, dim=1).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/flow18b")
    parser.add_argument("--dataset", default="shapes", help="the DATASET the run of flow_reflow.sh used")
    parser.add_argument("--out", default="benchmarks/results/flow_core")
    parser.add_argument("--grid", action="store_true", help="also write reflow_DATASET_grid.png (rows: teacher, "
                        "reflow, student at 1 / 2 / 4 Euler steps)")
    args = parser.parse_args(argv)
    results = {name: read_runs(os.path.join(args.runs, f"{folder}_{args.dataset}")) for name, folder in EVALS.items()}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"reflow_{args.dataset}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    if args.grid:
        grid(args.runs, args.dataset, stem + "_grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
