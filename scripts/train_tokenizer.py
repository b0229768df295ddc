#!/usr/bin/env python
"""Train a tokenizer with the shared trainer, then evaluate it.

    python scripts/train_tokenizer.py --quantizer fsq --dataset shapes --max_steps 2000 --cpu \
        --output_dir runs/tokenizers/fsq_shapes

Every ``TokenizerConfig`` field is a flag (``--help`` lists them). At the end the final model is
evaluated on ``--eval_split`` (``evaluate_tokenizer``): ``OUTPUT/eval/metrics.json`` plus a side-by-side
PNG (WAVs for audio); the model is in ``OUTPUT/final_model`` (``tokenizers_vq.models.load_tokenizer``).
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> dict:
    from genmod.train import Trainer, parse_config
    from tokenizers_vq.family import TokenizerConfig, TokenizerFamily, evaluate_tokenizer, load_eval_dataset
    from tokenizers_vq.models import load_tokenizer

    config = parse_config(TokenizerConfig, argv)
    family = TokenizerFamily(config)
    dataset = family.build_dataset()
    callbacks = [family.trainer_callback]
    if config.time_budget_minutes > 0:
        deadline = time.monotonic() + 60 * config.time_budget_minutes

        def stop_at_deadline(trainer, step, metrics):
            # lowering max_steps ends the loop after this step; the trainer then checkpoints and exports
            if time.monotonic() > deadline:
                trainer.config.max_steps = step

        callbacks.append(stop_at_deadline)
    summary = Trainer(config, family, dataset, callbacks=callbacks).train()
    if family.discriminator is not None:  # the trainer does not checkpoint family state yet
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in family.discriminator.state_dict().items()},
                  os.path.join(config.output_dir, "discriminator.safetensors"))
    model = load_tokenizer(summary.final_model)
    eval_set = load_eval_dataset(config.dataset, config.eval_split, config.modality)
    metrics = evaluate_tokenizer(model, eval_set, os.path.join(config.output_dir, "eval"),
                                 num_samples=config.eval_samples)
    metrics["steps"] = summary.final_step
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
