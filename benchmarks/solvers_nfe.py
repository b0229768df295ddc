"""Sampling quality against network evaluations (NFE) for each solver and time grid, on the exact
Gaussian-mixture velocity (genmod.flow.gmm), so that only the solver's discretisation error is measured.

Errors, per (solver, grid, steps):
* endpoint: mean ||x - x_ref|| against a fine RK4 solve (``--ref-steps``) of the SAME noise;
* sliced W2: sliced 2-Wasserstein distance to fresh samples of the target (64 random directions);
  its finite-sample floor is measured in the same run (independent exact samples vs the target set);
* weights: max |mode weight - true weight|, mode weights read off the samples' responsibilities.

Prints markdown tables, says which solver reaches each endpoint-error level with the fewest NFE,
and writes ``results.json`` and ``solvers_nfe.png`` into ``--out`` (default runs/bench_solvers).

    python benchmarks/solvers_nfe.py [--out runs/bench_solvers] [--num 4000] [--steps 2,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from genmod.flow.gmm import GaussianMixture, three_mode_mixture_2d
from genmod.core.paths import get_path
from genmod.samplers import SOLVERS, get_time_grid, sample_ode, sample_sde, velocity_singular_at_zero

GRIDS = {"uniform": {}, "shifted": {"shift": 3.0}, "karras": {}, "cosine": {}}
THRESHOLDS = (1e-1, 3e-2, 1e-2, 1e-3)


def sliced_w2(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples (sorted 1-D projections)."""
    px, _ = torch.sort(x @ directions.T, dim=0)
    py, _ = torch.sort(y @ directions.T, dim=0)
    return ((px - py) ** 2).mean().sqrt().item()


def mode_weight_error(mixture: GaussianMixture, x: torch.Tensor) -> float:
    return (mixture.component_posteriors(x).mean(0) - mixture.weights).abs().max().item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_solvers", help="output folder for results.json and the PNG")
    p.add_argument("--num", type=int, default=4000, help="samples per solve")
    p.add_argument("--steps", default="2,4,8,16,32,64", help="comma-separated step counts")
    p.add_argument("--ref-steps", type=int, default=256, help="RK4 steps of the reference solve")
    p.add_argument("--path", default="linear", help="probability path: linear, cosine or vp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny ops: 1 is fastest on a shared machine)")
    args = p.parse_args(argv)
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        p.error(f"--steps: expected comma-separated ints, got {args.steps!r}")
    if args.num < 2 or any(s < 1 for s in args.steps):
        p.error("--num must be >= 2 and every --steps entry >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = get_path(args.path)
    mixture = three_mode_mixture_2d()
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num, 2, dtype=torch.float64, generator=gen)
    target = mixture.sample(args.num, gen)
    directions = torch.nn.functional.normalize(torch.randn(64, 2, dtype=torch.float64, generator=gen), dim=-1)
    velocity = mixture.velocity_fn(path)

    start = time.perf_counter()
    # VP: sigma^2 ~ t near the data, so the reference resolves t -> 0 with a Karras grid down to sigma 1e-4
    ref_grid = (get_time_grid("karras", args.ref_steps, sigma_min=1e-4, path=path) if velocity_singular_at_zero(path)
                else get_time_grid("uniform", args.ref_steps))
    reference = sample_ode(velocity, noise, ref_grid, "rk4", path=path)
    # finite-sample floors: the same metrics between independent exact samples (mean of 8 draws)
    fresh = [mixture.sample(args.num, gen) for _ in range(8)]
    floor = {"sliced_w2": sum(sliced_w2(f, target, directions) for f in fresh) / 8,
             "weights": sum(mode_weight_error(mixture, f) for f in fresh) / 8}
    reference_stats = {"sliced_w2": sliced_w2(reference, target, directions), "weights": mode_weight_error(mixture, reference)}
    print(f"reference: RK4 {args.ref_steps} steps ({len(ref_grid) * 4 - 4} NFE) in {time.perf_counter() - start:.1f}s; "
          f"sliced W2 {reference_stats['sliced_w2']:.4f}, mode-weight error {reference_stats['weights']:.4f} "
          f"(exact samples vs the target set, mean of 8: {floor['sliced_w2']:.4f}, {floor['weights']:.4f})")

    records = []
    methods = list(SOLVERS) + ["euler_maruyama"]
    for grid_name, grid_kwargs in GRIDS.items():
        for method in methods:
            for steps in args.steps:
                grid = get_time_grid(grid_name, steps, **grid_kwargs, **({"path": path} if grid_name in ("karras", "cosine") else {}))
                tic = time.perf_counter()
                if method == "euler_maruyama":
                    x, stats = sample_sde(velocity, noise, grid, path=path, generator=torch.Generator().manual_seed(args.seed + 1), return_stats=True)
                else:
                    x, stats = sample_ode(velocity, noise, grid, method, path=path, return_stats=True)
                records.append({
                    "method": method, "grid": grid_name, "steps": steps, "nfe": stats.nfe,
                    "endpoint": None if method == "euler_maruyama" else (x - reference).norm(dim=-1).mean().item(),
                    "sliced_w2": sliced_w2(x, target, directions), "weights": mode_weight_error(mixture, x),
                    "seconds": time.perf_counter() - tic,
                })

    # ---- tables ------------------------------------------------------------------------------
    header = "| solver | grid | " + " | ".join(f"{s} steps" for s in args.steps) + " |"
    rule = "|---|---|" + "---|" * len(args.steps)
    print(f"\n### Endpoint error vs fine RK4 from the same noise (mean L2; NFE in brackets), {args.path} path, {args.num} samples\n")
    print(header + "\n" + rule)
    for grid_name in GRIDS:
        for method in SOLVERS:
            cells = [f"{r['endpoint']:.1e} ({r['nfe']})" for r in records if r["method"] == method and r["grid"] == grid_name]
            print(f"| {method} | {grid_name} | " + " | ".join(cells) + " |")
    print(f"\n### Sliced W2 to the target / mode-weight error (exact samples vs the same target set, mean of 8: {floor['sliced_w2']:.3f} / {floor['weights']:.3f}; "
          f"all solvers share one noise draw, whose own weight error is {reference_stats['weights']:.3f})\n")
    print(header + "\n" + rule)
    for grid_name in GRIDS:
        for method in methods:
            cells = [f"{r['sliced_w2']:.3f} / {r['weights']:.3f}" for r in records if r["method"] == method and r["grid"] == grid_name]
            print(f"| {method} | {grid_name} | " + " | ".join(cells) + " |")

    print("\n### Fewest NFE reaching an endpoint error (best grid per solver)\n")
    print("| endpoint error <= | " + " | ".join(SOLVERS) + " | winner |")
    print("|---|" + "---|" * (len(SOLVERS) + 1))
    winners = {}
    for threshold in THRESHOLDS:
        best = {}
        for method in SOLVERS:
            hits = [r for r in records if r["method"] == method and r["endpoint"] is not None and r["endpoint"] <= threshold]
            best[method] = min(hits, key=lambda r: r["nfe"]) if hits else None
        reached = {m: r for m, r in best.items() if r is not None}
        winner = min(reached.items(), key=lambda kv: (kv[1]["nfe"], kv[1]["endpoint"])) if reached else None
        winners[str(threshold)] = None if winner is None else {"method": winner[0], "grid": winner[1]["grid"], "nfe": winner[1]["nfe"]}
        cells = [f"{r['nfe']} ({r['grid']})" if r else "-" for r in best.values()]
        won = f"**{winner[0]}** + {winner[1]['grid']}, {winner[1]['nfe']} NFE" if winner else "none"
        print(f"| {threshold:g} | " + " | ".join(cells) + f" | {won} |")

    # ---- files -------------------------------------------------------------------------------
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": {k: v for k, v in vars(args).items()}, "floor": floor, "reference": reference_stats,
                   "records": records, "fewest_nfe": winners}, f, indent=1)
    plot_path = os.path.join(args.out, "solvers_nfe.png")
    plot(records, floor, reference_stats, list(GRIDS), methods, plot_path)
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and {plot_path}")
    return records


def plot(records, floor, reference_stats, grids, methods, out_file):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(grids), figsize=(4 * len(grids), 7), sharex=True)
    for col, grid_name in enumerate(grids):
        for method in methods:
            rows = [r for r in records if r["method"] == method and r["grid"] == grid_name]
            nfe = [r["nfe"] for r in rows]
            if method != "euler_maruyama":
                axes[0, col].loglog(nfe, [r["endpoint"] for r in rows], marker="o", ms=3, label=method)
            axes[1, col].loglog(nfe, [r["sliced_w2"] for r in rows], marker="o", ms=3, label=method)
        axes[1, col].axhline(floor["sliced_w2"], color="gray", ls="--", lw=1, label="exact samples (mean of 8)")
        axes[1, col].axhline(reference_stats["sliced_w2"], color="black", ls=":", lw=1, label="fine RK4, same noise")
        axes[0, col].set_title(f"{grid_name} grid")
        axes[1, col].set_xlabel("NFE")
    axes[0, 0].set_ylabel("endpoint error vs fine RK4")
    axes[1, 0].set_ylabel("sliced W2 to target")
    axes[1, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
