"""Issue 18 measurements: solvers x schedules x NFE on the Gaussian mixture (exact answer known), the
likelihood check (exact vs Hutchinson vs the true log-density), and bits/dim of a trained flow pipeline.

    python benchmarks/flow_likelihood_ays.py mixture [--out benchmarks/results/flow_core]
    python benchmarks/flow_likelihood_ays.py bpd PIPELINE --dataset shapes [--num 128] [--out ...]

``mixture``: endpoint error = mean ||x - x_exact|| over 2000 noises, x_exact from rk4 with 1000 steps (error
~1e-11) of the same noise. Grids: uniform, shifted (SD3 shift 3), karras (EDM rho 7), cosine, and two AYS
grids optimised at 8 steps on separate noise and data (``klub``: the paper's bound, solver-independent;
``ays-global``: the solve's own error for that solver), re-spaced log-linearly to 4 and 16 steps.
Adaptive solvers (torchdiffeq) at three tolerances, with the calls they used. Then the likelihood check.
``bpd``: bits/dim of test images under the pipeline's unconditional flow (null class, no guidance), with
uniform dequantisation, Hutchinson (Rademacher, one probe per image) and dopri5 (rtol = atol = 1e-5).
Every table is printed and written as JSON and markdown into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from genmod.flow.gmm import three_mode_mixture_2d
from genmod.samplers import get_time_grid, sample_ode
from genmod.samplers.ays import interpolate_time_grid, optimize_time_grid
from genmod.samplers.likelihood import image_bits_per_dim, log_likelihood

SOLVERS = ("euler", "heun", "dpm_solver_pp_2m")
STEPS = (4, 8, 16)
ADAPTIVE = (("dopri5", (1e-3, 1e-5, 1e-7)), ("bosh3", (1e-3, 1e-5)), ("adaptive_heun", (1e-3, 1e-5)))


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def mixture_grids(mixture, solver: str, klub_grid) -> dict:
    """Every grid of the table for ``solver``: hand-made ones per step count, AYS ones re-spaced from 8 steps."""
    x0 = mixture.sample(1024, generator=torch.Generator().manual_seed(0))
    ays = optimize_time_grid(mixture.velocity_fn(), x0, 8, objective="global", method=solver, num_candidates=15,
                             generator=torch.Generator().manual_seed(1)).time_grid
    grids = {}
    for steps in STEPS:
        grids[steps] = {"uniform": get_time_grid("uniform", steps), "shifted": get_time_grid("shifted", steps, shift=3.0),
                        "karras": get_time_grid("karras", steps), "cosine": get_time_grid("cosine", steps),
                        "ays-klub": interpolate_time_grid(klub_grid, steps), "ays-global": interpolate_time_grid(ays, steps)}
    return grids


def solver_table(mixture, noise, exact) -> tuple[list[dict], dict]:
    """Endpoint error of every solver x grid x steps, and of the adaptive solvers with their NFE."""
    x0 = mixture.sample(1024, generator=torch.Generator().manual_seed(0))
    klub_grid = optimize_time_grid(mixture.velocity_fn(), x0, 8, objective="klub",
                                   generator=torch.Generator().manual_seed(1)).time_grid
    rows, ays_grids = [], {"ays-klub": klub_grid.tolist()}
    for solver in SOLVERS:
        grids = mixture_grids(mixture, solver, klub_grid)
        ays_grids[f"ays-global/{solver}"] = grids[8]["ays-global"].tolist()
        for steps, by_name in grids.items():
            for name, grid in by_name.items():
                x, stats = sample_ode(mixture.velocity_fn(), noise, grid, method=solver, return_stats=True)
                rows.append({"solver": solver, "schedule": name, "steps": steps, "nfe": stats.nfe,
                             "endpoint_error": (x - exact).norm(dim=1).mean().item()})
    for solver, tolerances in ADAPTIVE:
        for tol in tolerances:
            x, stats = sample_ode(mixture.velocity_fn(), noise, [1.0, 0.0], method=solver, rtol=tol, atol=tol,
                                  return_stats=True)
            rows.append({"solver": solver, "schedule": f"adaptive rtol=atol={tol:g}", "steps": "-", "nfe": stats.nfe,
                         "endpoint_error": (x - exact).norm(dim=1).mean().item()})
    return rows, ays_grids


def likelihood_table(mixture, num_points: int = 32, num_probes: int = 64) -> list[dict]:
    """log p of mixture points: exact divergence (rk4 / dopri5), Hutchinson (mean +- standard error), truth."""
    points = mixture.sample(num_points, generator=torch.Generator().manual_seed(2))
    truth = mixture.log_prob(points)
    rows = []
    for label, options in (("exact, rk4 100 steps", {"method": "rk4", "num_steps": 100}),
                           ("exact, dopri5 1e-7", {"method": "dopri5", "rtol": 1e-7, "atol": 1e-7})):
        result = log_likelihood(mixture.velocity_fn(), points, **options)
        rows.append({"estimator": label, "nfe": result.nfe, "mean_log_p": result.log_prob.mean().item(),
                     "max_abs_error": (result.log_prob - truth).abs().max().item(), "standard_error": 0.0})
    for probe in ("rademacher", "gaussian"):
        x = points.repeat_interleave(num_probes, 0)
        result = log_likelihood(mixture.velocity_fn(), x, method="rk4", num_steps=100, divergence="hutchinson",
                                probe=probe, generator=torch.Generator().manual_seed(3))
        per_point = result.log_prob.reshape(num_points, num_probes)
        se = per_point.std(1) / math.sqrt(num_probes)
        within = ((per_point.mean(1) - truth).abs() < 3 * se).float().mean().item()
        rows.append({"estimator": f"hutchinson {probe}, {num_probes} probes, rk4 100", "nfe": result.nfe,
                     "mean_log_p": per_point.mean().item(), "max_abs_error": (per_point.mean(1) - truth).abs().max().item(),
                     "standard_error": se.mean().item(), "single_probe_std": per_point.std(1).mean().item(),
                     "fraction_within_3se": within})
    rows.append({"estimator": "truth (mixture log_prob)", "mean_log_p": truth.mean().item()})
    return rows


def run_mixture(args) -> dict:
    mixture = three_mode_mixture_2d()
    noise = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    start = time.time(), time.process_time()
    exact = sample_ode(mixture.velocity_fn(), noise, get_time_grid("uniform", 1000), method="rk4")
    rows, grids = solver_table(mixture, noise, exact)
    likelihood = likelihood_table(mixture)
    report = {"solver_table": rows, "ays_grids": grids, "likelihood": likelihood,
              "wall_s": round(time.time() - start[0], 1), "cpu_s": round(time.process_time() - start[1], 1)}
    pivot = {}
    for row in rows:
        if row["steps"] != "-":
            pivot.setdefault((row["solver"], row["steps"], row["nfe"]), {})[row["schedule"]] = row["endpoint_error"]
    names = ["uniform", "shifted", "karras", "cosine", "ays-klub", "ays-global"]
    table = [{"solver": s, "steps": n, "nfe": nfe, **errors} for (s, n, nfe), errors in pivot.items()]
    text = ("### Endpoint error on the mixture (mean ||x - x_exact||, 2000 noises)\n\n"
            + markdown(table, ["solver", "steps", "nfe"] + names)
            + "\n\n### Adaptive solvers\n\n"
            + markdown([r for r in rows if r["steps"] == "-"], ["solver", "schedule", "nfe", "endpoint_error"])
            + "\n\n### Likelihood check (32 mixture points; Hutchinson: 64 probes per point)\n\n"
            + markdown(likelihood, ["estimator", "nfe", "mean_log_p", "max_abs_error", "standard_error",
                                    "single_probe_std", "fraction_within_3se"]))
    report["markdown"] = text
    return report


def run_bpd(args) -> dict:
    """Bits/dim of ``args.num`` test images under the pipeline's unconditional flow."""
    from genmod.data import get_dataset
    from genmod.flow.ays import pipeline_velocity
    from genmod.pipelines import load_pipeline

    pipe = load_pipeline(args.pipeline)
    data = get_dataset(args.dataset, split="test")
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.num].tolist()
    images = torch.stack([torch.as_tensor(data[i]["image"]) for i in index]).float()
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    num_classes = getattr(pipe.transformer.config, "num_classes", 0)
    start = time.time(), time.process_time()
    bpds, nfe = [], 0
    for chunk in pixels.split(args.batch_size):
        labels = torch.full((len(chunk),), num_classes, dtype=torch.long) if num_classes else None  # the null class
        velocity = pipeline_velocity(pipe, labels, 1.0)
        bpd, result = image_bits_per_dim(velocity, chunk, torch.Generator().manual_seed(args.seed + len(bpds)),
                                         method="dopri5", rtol=1e-5, atol=1e-5, divergence="hutchinson")
        bpds.append(bpd)
        nfe += result.nfe
    bpd = torch.cat(bpds).double()
    report = {"pipeline": os.path.abspath(args.pipeline), "dataset": args.dataset, "num_images": len(bpd),
              "bits_per_dim": bpd.mean().item(), "standard_error": (bpd.std() / math.sqrt(len(bpd))).item(),
              "estimator": "Hutchinson (Rademacher, 1 probe/image), dopri5 rtol=atol=1e-5, null class, uniform dequantisation",
              "nfe_total": nfe, "wall_s": round(time.time() - start[0], 1), "cpu_s": round(time.process_time() - start[1], 1)}
    report["markdown"] = (f"bits/dim of {len(bpd)} {args.dataset} test images: {report['bits_per_dim']:.3f} "
                          f"+- {report['standard_error']:.3f} (standard error; {report['estimator']}; {nfe} network calls "
                          f"in all, {report['wall_s']} s wall, {report['cpu_s']} s CPU)")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    mix = sub.add_parser("mixture")
    bpd = sub.add_parser("bpd")
    bpd.add_argument("pipeline")
    bpd.add_argument("--dataset", required=True)
    bpd.add_argument("--num", type=int, default=128)
    bpd.add_argument("--batch-size", type=int, default=64)
    bpd.add_argument("--seed", type=int, default=0)
    for parser in (mix, bpd):
        parser.add_argument("--out", default="benchmarks/results/flow_core")
    args = p.parse_args(argv)
    report = run_mixture(args) if args.command == "mixture" else run_bpd(args)
    name = "mixture" if args.command == "mixture" else f"bpd_{args.dataset}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(report["markdown"] + "\n")
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
