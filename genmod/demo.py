"""``genmod demo``: the main job on built-in data, end to end on a CPU in a few minutes.

1. trains a small class-conditional flow-matching transformer on the built-in ``shapes`` images with
   the shared trainer (checkpoints, EMA, previews, TensorBoard logs);
2. samples a PNG grid (one row per class) through the exported diffusers pipeline;
3. evaluates: the domain classifier's accuracy on samples against the class they were generated for,
   and domain-FID / KID against held-out real images, next to the real-vs-real floor at the same N;
4. writes ``summary.json`` and prints where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genmod demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    # defaults: the flow/demo-unet preset (genmod/presets/flow/demo-unet.json)
    p.add_argument("--max-steps", "--steps", type=int, default=None, help="training steps (preset: 1500)")
    p.add_argument("--num-eval", type=int, default=500, help="samples for the evaluation (default 500)")
    p.add_argument("--num-inference-steps", "--sample-steps", type=int, default=None,
                   help="ODE steps when sampling (preset: 16)")
    p.add_argument("--guidance-scale", "--guidance", type=float, default=None,
                   help="classifier-free guidance scale (preset: 2)")
    p.add_argument("--resume", action="store_true", help="continue a killed demo run from its last checkpoint")
    return p


def demo_config(args):
    """The ``flow/demo-unet`` preset, with the demo's output folder and the flags given."""
    from genmod.flow.family import FlowConfig
    from genmod.presets import preset_files
    from genmod.train.config import read_config_values

    values = read_config_values(FlowConfig, preset_files("flow")["demo-unet"])
    values.update(output_dir=os.path.join(args.out, "train"), cpu=not torch.cuda.is_available(),
                  resume="latest" if args.resume else None)
    for name in ("max_steps", "num_inference_steps", "guidance_scale"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    config = FlowConfig(**values)
    config.validate()
    return config


def _check_arguments(args) -> None:
    """One-line errors before training: ``--num-eval`` within the held-out set, a writable ``--out``."""
    from genmod.core.arguments import check_count
    from genmod.core.files import check_output_path

    check_count("--num-eval", args.num_eval, 2, 50000)  # the held-out pair draws 2 N shapes test images
    check_output_path(args.out, folder=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_arguments(args)
    from genmod.flow.family import FlowFamily
    from genmod.pipelines import load_pipeline
    from genmod.train import Trainer

    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    config = demo_config(args)
    print(f"[demo] 1/3 training a small class-conditional flow U-Net on built-in shapes for {config.max_steps} steps")
    summary = Trainer(config, FlowFamily(config)).train()
    train_minutes = (time.time() - started) / 60

    print("[demo] 2/3 sampling a grid through the exported diffusers pipeline")
    pipe = load_pipeline(summary.pipeline)
    pipe.set_progress_bar_config(disable=True)
    class_names = list(pipe.config.id2label.values())
    num_classes = len(class_names)
    per_class = 8
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    grid = pipe(class_labels=labels, num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                generator=[torch.Generator().manual_seed(i) for i in range(len(labels))], output_type="pt").images
    from torchvision.utils import save_image

    from genmod.core.files import atomic_path, atomic_write

    grid_path = os.path.join(args.out, "samples_grid.png")
    with atomic_path(grid_path) as tmp:
        save_image(grid, tmp, nrow=per_class, padding=2)

    print(f"[demo] 3/3 evaluating {args.num_eval} samples against held-out real images")
    metrics = evaluate(pipe, config, args.num_eval, num_classes)
    result = {
        "grid": grid_path, "rows": class_names, "pipeline": summary.pipeline, "checkpoint": summary.checkpoint,
        "train_steps": summary.final_step, "final_loss": summary.last_loss, "train_minutes": round(train_minutes, 2),
        "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale, **metrics,
        "total_minutes": round((time.time() - started) / 60, 2),
    }
    with atomic_write(os.path.join(args.out, "summary.json")) as f:
        json.dump(result, f, indent=2)
    print("\n[demo] done")
    print(f"  samples grid (one row per class: {', '.join(class_names)}): {grid_path}")
    print(f"  diffusers pipeline: {summary.pipeline}")
    print(f"  training log: {summary.metrics_file}  (TensorBoard: {os.path.join(config.output_dir, 'logs')})")
    print(f"  classifier accuracy on samples: {metrics['classifier_accuracy']:.3f}")
    print(f"  domain FID: {metrics['domain_fid']:.2f} (real-vs-real floor at N={metrics['num_eval']}: "
          f"{metrics['domain_fid_floor']:.2f}); KID: {metrics['domain_kid']:.4f}")
    print(f"  numbers: {os.path.join(args.out, 'summary.json')}")
    return 0


def evaluate(pipe, config, n: int, num_classes: int) -> dict:
    """Domain metrics of generated samples against held-out real data, with the floor at the same N."""
    from genmod.evals.held_out import class_cycled_samples, domain_fidelity, held_out_pair

    fake, labels = class_cycled_samples(pipe, n, num_classes, num_inference_steps=config.num_inference_steps,
                                        guidance_scale=config.guidance_scale)
    reference, floor = held_out_pair("shapes", n)
    metrics = domain_fidelity(fake, reference, floor, "shapes", labels=labels, kid_subset_size=max(2, n // 2))
    return {"num_eval": n, **metrics}
