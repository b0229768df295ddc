"""Issue 19: one flow run, several EMAs of the same trajectory, each evaluated at the same checkpoints.

``train`` runs ``genmod train flow FLAGS`` through the shared trainer (its own EMA is the default, bias
corrected) and keeps beside it, updated after every optimizer step exactly like the trainer's:

* ``raw``: the old EMA, constant decay from the initial weights (shadow_T = d^T w_0 + ...);
* ``warmup``: bias correction plus diffusers' warmup cap ``1 - (1 + t)^-0.75``.

At each ``--save-at`` step it writes their shadows to ``OUT/ema_variants/step-N/{raw,warmup}.safetensors``;
the trainer's checkpoint of that step holds ``model/`` (the live weights) and ``ema/`` (bias corrected).

``eval`` loads, for each step and variant, the checkpoint's model with those weights, builds the flow
pipeline and runs ``genmod eval``'s protocol (``evals.cli.eval_pipeline``): N class-balanced samples,
domain-FID / KID next to the real-vs-real floor at the same N, and the domain classifier's accuracy on
the requested class. Writes ``OUT/ema_eval.json``, a markdown table and one PNG grid per evaluated model.

    python benchmarks/defaults_flow_ema.py train --save-at 500,1000,2000 -- --dataset shapes --cpu ...
    python benchmarks/defaults_flow_ema.py eval OUT --steps 500,1000,2000 --variants raw,corrected
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

VARIANTS = ("raw", "corrected", "warmup", "live")


def _trainer_class():
    from safetensors.torch import save_file

    from genmod.train import EMA, Trainer, unwrap_model

    class VariantTrainer(Trainer):
        """The shared trainer plus extra EMAs of the same weights (no effect on training itself)."""

        save_at: tuple[int, ...] = ()

        def _build(self):
            super()._build()
            model, decay = unwrap_model(self.model), self.config.ema_decay
            self.variants = {"raw": EMA(model, decay, bias_correction=False),
                             "warmup": EMA(model, decay, warmup=True)}

        def _train_step(self):
            metrics = super()._train_step()
            for ema in self.variants.values():
                ema.update(unwrap_model(self.model))
            if self.step in self.save_at:
                folder = os.path.join(self.config.output_dir, "ema_variants", f"step-{self.step:06d}")
                os.makedirs(folder, exist_ok=True)
                for name, ema in self.variants.items():
                    save_file({n: s.contiguous() for n, s in zip(ema.names, ema.shadow)},
                              os.path.join(folder, f"{name}.safetensors"))
            return metrics

    return VariantTrainer


def train(save_at: list[int], flags: list[str], family: str = "flow") -> dict:
    """``genmod train FAMILY FLAGS`` with the extra EMAs (any family; ``eval`` is flow's)."""
    import importlib

    from genmod.families import family_row
    from genmod.presets import preset_files
    from genmod.train import get_family, parse_config

    importlib.import_module(family_row(family).module)  # registers the family
    entry = get_family(family)
    config = parse_config(entry.config_class, flags, presets=preset_files(family))
    trainer_class = _trainer_class()
    trainer_class.save_at = tuple(save_at)
    cpu0, wall0 = time.process_time(), time.monotonic()
    summary = trainer_class(config, entry(config)).train()
    timing = {"steps": summary.final_step, "train_cpu_minutes": summary.train_cpu_minutes,
              "train_wall_minutes": summary.train_wall_minutes, "process_cpu_minutes": (time.process_time() - cpu0) / 60,
              "process_wall_minutes": (time.monotonic() - wall0) / 60, "flags": flags}
    with open(os.path.join(config.output_dir, "timing.json"), "w") as f:
        json.dump(timing, f, indent=2)
    print(json.dumps(timing))
    return timing


def _model_with(run_dir: str, step: int, variant: str):
    """(family, model) of the step's checkpoint carrying the variant's weights."""
    from safetensors.torch import load_file

    from genmod.train import load_family_from_checkpoint

    checkpoint = os.path.join(run_dir, "checkpoints", f"step-{step:08d}")
    family, model = load_family_from_checkpoint(checkpoint, use_ema=variant == "corrected")
    if variant in ("raw", "warmup"):
        tensors = load_file(os.path.join(run_dir, "ema_variants", f"step-{step:06d}", f"{variant}.safetensors"))
        missing = [name for name, _ in model.named_parameters() if name not in tensors]
        if missing:
            raise ValueError(f"{run_dir}: {variant} EMA at step {step} lacks {missing[0]!r}")
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(tensors[name])
    return family, model.eval()


def _grid(samples_npz: str, png: str, per_class: int = 8) -> None:
    """One row per class (the first ``per_class`` samples of each) as a PNG."""
    from torchvision.utils import save_image

    from genmod.evals.generator_adapter import load_npz

    images, labels = load_npz(samples_npz)
    rows = [images[labels == c][:per_class] for c in sorted(set(labels.tolist()))]
    save_image(torch.cat(rows).float() / 255.0, png, nrow=per_class, padding=1)


def evaluate(run_dir: str, steps: list[int], variants: list[str], num_samples: int, num_steps: int,
             guidance: float) -> list[dict]:
    from genmod.evals.cli import eval_pipeline

    rows = []
    for step in steps:
        for variant in variants:
            family, model = _model_with(run_dir, step, variant)
            out = os.path.join(run_dir, "ema_eval", f"step-{step:06d}-{variant}")
            cpu0 = time.process_time()
            report = eval_pipeline(out, ("fid", "kid"), num_samples, num_steps, guidance, dataset="shapes",
                                   features=("domain",), out_dir=out, pipeline=family.build_pipeline(model))
            run = report["runs"][0]
            domain = run["spaces"]["domain"]
            rows.append({"step": step, "ema": variant, "domain_fid": domain["model"]["fid"],
                         "floor_fid": domain["real_vs_real"]["fid"], "domain_kid": domain["model"].get("kid"),
                         "class_accuracy": run.get("classifier_accuracy"), "num_samples": num_samples,
                         "solver_steps": num_steps, "guidance": guidance,
                         "eval_cpu_minutes": (time.process_time() - cpu0) / 60})
            _grid(os.path.join(out, f"samples_steps{num_steps}_w{guidance}.npz"), os.path.join(out, "grid.png"))
            print(json.dumps(rows[-1]), flush=True)
    _write_table(run_dir, rows)
    return rows


def _write_table(run_dir: str, rows: list[dict]) -> None:
    """``ema_eval.json`` / ``.md``: these rows merged with an earlier call's (keyed by step and EMA)."""
    path = os.path.join(run_dir, "ema_eval.json")
    if os.path.isfile(path):
        with open(path) as f:
            earlier = {(r["step"], r["ema"]): r for r in json.load(f)}
        earlier.update({(r["step"], r["ema"]): r for r in rows})
        rows = sorted(earlier.values(), key=lambda r: (r["step"], VARIANTS.index(r["ema"])))
    lines = ["| step | EMA | domain-FID (floor) | domain-KID | class accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['ema']} | {r['domain_fid']:.2f} ({r['floor_fid']:.2f}) | "
                     f"{r['domain_kid']:.3f} | {r['class_accuracy']:.3f} |")
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(run_dir, "ema_eval.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train flow (flags after --) with the extra EMAs")
    p_train.add_argument("--save-at", type=_ints, required=True)
    p_train.add_argument("--family", default="flow")
    p_eval = sub.add_parser("eval", help="evaluate each EMA at each step")
    p_eval.add_argument("run_dir")
    p_eval.add_argument("--steps", type=_ints, required=True)
    p_eval.add_argument("--variants", default="raw,corrected")
    p_eval.add_argument("--num-samples", type=int, default=300)
    p_eval.add_argument("--solver-steps", type=int, default=20)
    p_eval.add_argument("--guidance", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.save_at, flags, args.family)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: expected some of {', '.join(VARIANTS)}, got {unknown[0]!r}")
    evaluate(args.run_dir, args.steps, variants, args.num_samples, args.solver_steps, args.guidance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
