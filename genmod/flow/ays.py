"""``genmod ays``: optimise an Align-Your-Steps time grid for a flow pipeline and save it with the pipeline.

    genmod ays PIPELINE --steps 10 [--num-samples 128] [--objective klub|lte|global] [--guidance-scale 2]
               [--dataset NAME] [--out NEW_PIPELINE]

The optimiser is ``genmod.samplers.ays.optimize_time_grid`` (Sabour et al. 2024; see its docstring); here
the model is the pipeline's network (with classifier-free guidance at ``--guidance-scale``, converted to a
velocity on the scheduler's path) and the data are ``--num-samples`` training images with their labels.
The grid lands in the scheduler config (``ays_grids[steps]``, ``schedule = "ays"``), so
``genmod sample PIPELINE --schedule ays`` / ``genmod eval ... --schedule ays`` and
``FlowMatchSolverScheduler.from_config(config, schedule="ays")`` use it; a record of the run
(grid, objective history, settings) is written to ``PIPELINE/ays_schedule.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from genmod.core.files import atomic_write
from genmod.samplers.ays import OBJECTIVES, optimize_time_grid
from genmod.samplers.guidance import combine_guidance


def pipeline_velocity(pipe, labels: torch.Tensor | None, guidance_scale: float = 1.0):
    """``v(x, t)`` (``t`` per row, ``[N]``) of a ``FlowMatchingPipeline``'s network, guided, as a velocity."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    path, prediction = scheduler.ode_solver.path, scheduler.config.prediction_type
    num_train = scheduler.config.num_train_timesteps

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        channels, timestep = x.shape[1], (t * num_train).to(x.dtype)
        if labels is None or guidance_scale == 1.0:
            out = transformer(x, timestep, labels, return_dict=False)[0][:, :channels]
        else:
            null = torch.full_like(labels, transformer.config.num_classes)
            out = transformer(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([labels, null]),
                              return_dict=False)[0][:, :channels]
            out = combine_guidance(*out.chunk(2), guidance_scale)
        return path.convert(out, x, t.to(x.dtype), src=prediction, dst="velocity")

    return velocity


def training_images(dataset: str, num: int, seed: int, conditional: bool):
    """``num`` random training images ``[num, C, H, W]`` in [-1, 1] and their labels (None if unconditional)."""
    from genmod.data import get_dataset

    data = get_dataset(dataset, split="train")
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    items = [data[i] for i in index]
    images = torch.stack([torch.as_tensor(item["image"]) for item in items]).float()
    labels = torch.tensor([int(item["label"]) for item in items]) if conditional else None
    return images, labels


def optimize_pipeline_schedule(pipe, images: torch.Tensor, labels, num_steps: int, guidance_scale: float = 1.0,
                               objective: str = "klub", solver: str | None = None, seed: int = 0, **options):
    """Optimise a ``num_steps`` grid for ``pipe`` on ``images``; put it in the scheduler (``schedule="ays"``).

    Returns the ``AYSResult``. ``solver`` (default the scheduler's) matters for the ``lte`` / ``global``
    objectives, which measure that solver's error.
    """
    scheduler = pipe.scheduler
    method = {"dpmsolver++2m": "dpm_solver_pp_2m"}.get(solver or scheduler.config.solver, solver or scheduler.config.solver)
    device = next(pipe.transformer.parameters()).device
    velocity = pipeline_velocity(pipe, None if labels is None else labels.to(device), guidance_scale)
    result = optimize_time_grid(velocity, images.to(device), num_steps, path=scheduler.ode_solver.path,
                                objective=objective, method=method, generator=torch.Generator().manual_seed(seed),
                                **options)
    grids = dict(scheduler.config.ays_grids or {})
    grids[str(num_steps)] = [round(v, 8) for v in result.time_grid.tolist()]
    pipe.scheduler = type(scheduler).from_config(scheduler.config, ays_grids=grids, schedule="ays")
    return result


def _dataset_near(path: str) -> str | None:
    """The ``dataset`` of the first ``train_config.json`` in ``path`` or up to three folders above it."""
    folder = os.path.abspath(path)
    for _ in range(4):
        config = os.path.join(folder, "train_config.json")
        if os.path.isfile(config):
            with open(config) as f:
                return json.load(f).get("dataset")
        folder = os.path.dirname(folder)
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genmod ays", description="Optimise an Align-Your-Steps time grid for a flow "
                                "pipeline (Sabour et al. 2024) and save it in the pipeline's scheduler.")
    p.add_argument("path", help="flow pipeline folder (model_index.json)")
    p.add_argument("--steps", type=int, default=10, help="grid steps to optimise (default 10)")
    p.add_argument("--num-samples", type=int, default=128, help="training images of the Monte Carlo estimate")
    p.add_argument("--objective", choices=OBJECTIVES, default="klub",
                   help="klub: the paper's KL bound (2 calls per interval); lte: local truncation error of --solver; "
                   "global: the whole solve's error against rk4 (costliest)")
    p.add_argument("--solver", default=None, help="the solver lte / global measure (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="guidance of the model during optimisation")
    p.add_argument("--num-sweeps", type=int, default=2, help="coordinate-descent sweeps per subdivision level")
    p.add_argument("--num-candidates", type=int, default=9, help="candidate positions per point and sweep")
    p.add_argument("--dataset", default=None, help="training data (default: from train_config.json near PATH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write a copy of the pipeline here instead of updating PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 2 or args.num_samples < 2:
        raise ValueError(f"--steps and --num-samples: must be >= 2, got {args.steps}, {args.num_samples}")
    from genmod.pipelines import load_pipeline

    dataset = args.dataset or _dataset_near(args.path)
    if dataset is None:
        raise ValueError(f"--dataset: no train_config.json with a dataset found near {args.path}; pass --dataset")
    pipe = load_pipeline(args.path)
    if not hasattr(getattr(pipe, "scheduler", None), "config") or "ays_grids" not in pipe.scheduler.config:
        raise ValueError(f"{args.path}: genmod ays needs a flow pipeline with a FlowMatchSolverScheduler")
    conditional = bool(getattr(pipe.transformer.config, "num_classes", 0))
    images, labels = training_images(dataset, args.num_samples, args.seed, conditional)
    start = time.time(), time.process_time()
    result = optimize_pipeline_schedule(pipe, images, labels, args.steps, args.guidance_scale, args.objective,
                                        args.solver, args.seed, num_sweeps=args.num_sweeps,
                                        num_candidates=args.num_candidates)
    out = args.out or args.path
    if args.out:
        shutil.copytree(args.path, out, dirs_exist_ok=True)
    pipe.scheduler.save_pretrained(os.path.join(out, "scheduler"))
    record = {"steps": args.steps, "objective": args.objective, "time_grid": result.time_grid.tolist(),
              "history": result.history, "dataset": dataset, "num_samples": args.num_samples,
              "guidance_scale": args.guidance_scale, "solver": args.solver or pipe.scheduler.config.solver,
              "seed": args.seed, "wall_s": round(time.time() - start[0], 1),
              "cpu_s": round(time.process_time() - start[1], 1)}
    with atomic_write(os.path.join(out, "ays_schedule.json")) as f:
        json.dump(record, f, indent=2)
    print(f"AYS {args.steps}-step grid ({args.objective}): " + ", ".join(f"{t:.4f}" for t in record["time_grid"]))
    print(f"wrote {os.path.join(out, 'scheduler', 'scheduler_config.json')} (schedule=ays) and ays_schedule.json")
    return 0
