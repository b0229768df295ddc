"""OT / Sinkhorn / Schrodinger-bridge couplings vs independent, and reflow / 1-step distillation, on 2-D targets.

    flock /tmp/heavy3.lock python benchmarks/flow_couplings_2d.py [--steps 1500] [--out benchmarks/results/flow_core]

Part 1 (Tong et al. 2023, Table 2 setting, smaller): a 3x64 SELU MLP trained ``--steps`` steps (batch 256,
Adam 1e-3) on 8-gaussians and moons with each coupling. Reported: the mean transport cost
``E ||x0 - eps||^2`` of the coupled training batches, the straightness of the learned flow (Liu et al.
2022, eq. 7, on a 100-step RK4 solve), the Euler error ``E ||x_K - x_ref||`` against that RK4 solve at
K = 1, 2, 4, 8 steps (no adaptive solver needed), and the W2 of the K-step samples to the target.
Part 2 (Liu et al. 2022, Sec. 2.2-2.3): on the 3-mode mixture whose flow is known exactly (``flow/gmm.py``),
1-rectified flow (independent coupling), 2-rectified flow (reflow on 8192 pairs of the exact teacher ODE,
RK4 64 steps) and the 1-step and 2-step students distilled on the same pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from genmod.core.couplings import couple, mean_transport_cost
from genmod.flow.gmm import three_mode_mixture_2d
from genmod.flow.reflow import PairDataset, generate_pairs
from genmod.flow.toy import TARGETS, path_report, train_toy_flow, trajectory, wasserstein2
from genmod.samplers import get_time_grid, sample_ode

COUPLINGS = ("independent", "ot", "sinkhorn", "sb")
SB_SIGMA, SINKHORN_REG = 0.2, 0.5


def coupling_cost(target, coupling: str, batches: int = 20) -> float:
    g = torch.Generator().manual_seed(123)
    costs = []
    for _ in range(batches):
        x0 = target(256, g)
        noise = couple(x0, torch.randn(x0.shape, generator=g), coupling, SINKHORN_REG, SB_SIGMA, g)
        costs.append(mean_transport_cost(x0, noise))
    return sum(costs) / len(costs)


def part_couplings(steps: int) -> tuple[dict, dict]:
    results, models = {}, {}
    for name, target in TARGETS.items():
        g = torch.Generator().manual_seed(7)
        data, noise = target(1000, g), torch.randn(1000, 2, generator=g)
        for coupling in COUPLINGS:
            start = time.process_time()
            model = train_toy_flow(target, coupling, steps=steps, batch_size=256, sb_sigma=SB_SIGMA, reg=SINKHORN_REG)
            report = path_report(model, data, noise)
            report.update(transport_cost=coupling_cost(target, coupling), train_cpu_s=time.process_time() - start)
            results[f"{name}/{coupling}"] = report
            models[(name, coupling)] = model
            print(name, coupling, json.dumps(report), flush=True)
    return results, models


def part_reflow(steps: int) -> dict:
    mixture = three_mode_mixture_2d()
    teacher = lambda noise, labels=None: sample_ode(mixture.velocity_fn(), noise, get_time_grid("uniform", 64),  # noqa: E731
                                                    method="rk4")
    sample_data = lambda n, gen: mixture.sample(n, gen).float()  # noqa: E731
    g = torch.Generator().manual_seed(8)
    data, noise = mixture.sample(1000, g).float(), torch.randn(1000, 2, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        generate_pairs(teacher, 8192, tmp, (2,), shard_size=2048, seed=1, progress=False)
        pairs_ds = PairDataset(tmp)
        pairs = (pairs_ds.sample, pairs_ds.noise)
    runs = {"1-rectified (independent)": {}, "2-rectified (reflow)": {"pairs": pairs},
            "1-step student": {"pairs": pairs, "distill_steps": 1}, "2-step student": {"pairs": pairs, "distill_steps": 2}}
    results = {}
    for label, kwargs in runs.items():
        model = train_toy_flow(sample_data, steps=steps, batch_size=256, **kwargs)
        results[label] = path_report(model, data, noise)
        print(label, json.dumps(results[label]), flush=True)
    teacher_x = teacher(noise)
    results["exact teacher (RK4 64)"] = {"w2_reference": wasserstein2(teacher_x, data)}
    return results


def plot(models: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(14, 7))
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(3))
    for row, name in enumerate(TARGETS):
        for col, coupling in enumerate(COUPLINGS):
            ax = axes[row, col]
            with torch.no_grad():
                _, states, _ = trajectory(lambda x, t: models[(name, coupling)](x, t), noise, 50, method="rk4")
            paths = torch.stack(states).numpy()
            ax.plot(paths[:, :, 0], paths[:, :, 1], color="olive", alpha=0.15, lw=0.6)
            ax.scatter(paths[0, :, 0], paths[0, :, 1], s=2, c="k")
            ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=2, c="royalblue")
            ax.set_title(f"{name}: {coupling}")
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=60)


def markdown(coupling_results: dict, reflow_results: dict) -> str:
    lines = ["| target | coupling | batch transport cost | straightness | Euler err 1 / 2 / 4 / 8 | W2 @4 / @8 / RK4-100 |",
             "|---|---|---|---|---|---|"]
    for key, r in coupling_results.items():
        name, coupling = key.split("/")
        err = " / ".join(f"{r['euler_error'][k]:.3f}" for k in (1, 2, 4, 8))
        lines.append(f"| {name} | {coupling} | {r['transport_cost']:.2f} | {r['straightness']:.3f} | {err} | "
                     f"{r['w2'][4]:.3f} / {r['w2'][8]:.3f} / {r['w2_reference']:.3f} |")
    lines += ["", "| 3-mode mixture | straightness | Euler err 1 / 2 / 4 | W2 @1 / @2 / @4 / RK4-100 |", "|---|---|---|---|"]
    for label, r in reflow_results.items():
        if "straightness" not in r:
            lines.append(f"| {label} | 0 | - | W2 of the teacher's own samples: {r['w2_reference']:.3f} |")
            continue
        err = " / ".join(f"{r['euler_error'][k]:.3f}" for k in (1, 2, 4))
        w2 = " / ".join(f"{r['w2'][k]:.3f}" for k in (1, 2, 4))
        lines.append(f"| {label} | {r['straightness']:.3f} | {err} | {w2} / {r['w2_reference']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default="benchmarks/results/flow_core")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.process_time()
    coupling_results, models = part_couplings(args.steps)
    reflow_results = part_reflow(args.steps)
    os.makedirs(args.out, exist_ok=True)
    meta = {"train_steps": args.steps, "batch_size": 256, "sb_sigma": SB_SIGMA, "sinkhorn_reg": SINKHORN_REG,
            "cpu_s": time.process_time() - start, "command": " ".join(["python"] + sys.argv)}
    with open(os.path.join(args.out, "couplings_2d.json"), "w") as f:
        json.dump({"meta": meta, "couplings": coupling_results, "reflow": reflow_results}, f, indent=1)
    with open(os.path.join(args.out, "couplings_2d.md"), "w") as f:
        f.write(markdown(coupling_results, reflow_results))
    plot(models, os.path.join(args.out, "couplings_2d_paths.png"))
    print(markdown(coupling_results, reflow_results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
