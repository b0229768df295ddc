#!/usr/bin/env python
"""Train VAR on a trained multi-scale tokenizer, then (optionally) score it with the domain metrics.

    python scripts/train_tokenizer.py --quantizer msvq --scales 1,2,3,4,6,8 --codebook_size 1024 \
        --latent_channels 16 --ch_mult 1,2,2 --dataset shapes --cpu --output_dir runs/var/tokenizer
    python scripts/train_var.py --tokenizer runs/var/tokenizer/final_model --dataset shapes --depth 6 \
        --cpu --time_budget_minutes 12 --max_steps 3000 --eval_samples 500 --output_dir runs/var/shapes

Every ``VARConfig`` field is a flag (``genmod train var --help``). ``--time_budget_minutes`` stops the
run cleanly (checkpoint + pipeline export) once that much wall-clock time is spent; the wall and
process CPU minutes of training are reported. With ``--eval_samples N`` the
exported pipeline draws N class-cycled samples (per-sample seeds) and ``OUTPUT/eval/metrics.json``
gets the domain classifier accuracy, domain FID/KID against held-out data and the real-vs-real floor
at the same N; ``OUTPUT/eval/grid.png`` shows 8 samples per class (one class per row).
``python scripts/train_var.py --eval-only PIPELINE_DIR N OUT_DIR`` scores an exported pipeline alone.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch


def evaluate(pipe, dataset_name: str, num: int, out_dir: str, num_classes: int) -> dict:
    """Domain metrics of ``num`` class-cycled samples vs held-out data, with the floor at the same N."""
    from torchvision.utils import save_image

    from evals.feature_net import classifier_accuracy, get_feature_net, register_feature_net
    from evals.generator_adapter import SampleDataset, to_uint8
    from evals.metrics import fidelity_metrics
    from genmod.data import get_dataset

    os.makedirs(out_dir, exist_ok=True)
    labels = torch.arange(num) % num_classes
    fake = []
    start_time = time.perf_counter()
    for start in range(0, num, 100):
        batch = labels[start:start + 100].tolist()
        gens = [torch.Generator().manual_seed(10_000 + start + i) for i in range(len(batch))]
        fake.append(pipe(class_labels=batch, generator=gens, output_type="pt").images * 2 - 1)
    sample_seconds = time.perf_counter() - start_time
    fake = torch.cat(fake)
    grid = torch.cat([fake[labels == c][:8] for c in range(num_classes)])
    save_image(grid, os.path.join(out_dir, "grid.png"), nrow=8, normalize=True, value_range=(-1, 1))
    metrics = {"num_eval": num, "sample_seconds": sample_seconds, "settings": pipe.sampling_settings()}
    if dataset_name != "shapes":
        return metrics
    net = get_feature_net("shapes")
    extractor = register_feature_net(net)
    test = get_dataset("shapes", split="test", num_samples=2 * num)
    real_a = torch.stack([test[i]["image"] for i in range(num)])
    real_b = torch.stack([test[i]["image"] for i in range(num, 2 * num)])

    def fidelity(a, b):
        return fidelity_metrics(SampleDataset(to_uint8(a)), SampleDataset(to_uint8(b)), metrics=("fid", "kid"),
                                feature_extractor=extractor, kid_subset_size=min(1000, num))

    gen, floor = fidelity(fake, real_a), fidelity(real_b, real_a)
    metrics.update(classifier_accuracy=classifier_accuracy(net, fake, labels),
                   domain_fid=gen["frechet_inception_distance"], domain_fid_floor=floor["frechet_inception_distance"],
                   domain_kid=gen["kernel_inception_distance_mean"], domain_kid_floor=floor["kernel_inception_distance_mean"])
    return metrics


def main(argv: list[str]) -> dict:
    from genmod.pipelines import load_pipeline
    from genmod.train import Trainer, parse_config
    from genmod.var.family import VARConfig, VARFamily

    if argv and argv[0] == "--eval-only":  # score an exported pipeline: --eval-only PIPELINE_DIR NUM OUT_DIR
        pipe = load_pipeline(argv[1])
        pipe.set_progress_bar_config(disable=True)
        out_dir = argv[3]
        result = evaluate(pipe, "shapes", int(argv[2]), out_dir, pipe.transformer.config.num_classes)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2, default=str))
        return result
    config = parse_config(VARConfig, argv)
    family = VARFamily(config)
    callbacks = []
    if config.time_budget_minutes > 0:
        deadline = time.monotonic() + 60 * config.time_budget_minutes

        def stop_at_deadline(trainer, step, metrics):
            # lowering max_steps ends the loop after this step; the trainer then checkpoints and exports
            if time.monotonic() > deadline:
                trainer.config.max_steps = step

        callbacks.append(stop_at_deadline)
    wall, cpu = time.monotonic(), time.process_time()
    summary = Trainer(config, family, callbacks=callbacks).train()
    result = {"steps": summary.final_step, "last_loss": summary.last_loss, "pipeline": summary.pipeline,
              "train_wall_minutes": (time.monotonic() - wall) / 60, "train_cpu_minutes": (time.process_time() - cpu) / 60}
    if config.eval_samples > 0 and summary.pipeline:
        pipe = load_pipeline(summary.pipeline)
        pipe.set_progress_bar_config(disable=True)
        num_classes = pipe.transformer.config.num_classes
        result.update(evaluate(pipe, config.dataset, config.eval_samples, os.path.join(config.output_dir, "eval"), num_classes))
        with open(os.path.join(config.output_dir, "eval", "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
