"""Issue 19: the old (raw) EMA of a run trained with the bias-corrected one, recovered exactly.

With a constant decay d started from the initial weights w_0, the old EMA after T updates is

    raw_T = d^T w_0 + (1 - d) sum_t d^(T-1-t) w_(t+1) = d^T w_0 + (1 - d^T) corrected_T,

since the corrected EMA is that sum divided by (1 - d^T) (genmod.train.ema). ``w_0`` is rebuilt as the
trainer built it (``set_seed(config.seed)``, then ``family.build_model()``). Writes a copy of the
checkpoint whose ``ema/`` holds raw_T, so ``genmod eval`` / ``genmod sample`` / the family benchmarks read
it unchanged (the copy has no manifest: it loads as an unverified checkpoint). ``--check RAW.safetensors``
compares the result with a raw EMA tracked during training (benchmarks/defaults_flow_ema.py).

    python benchmarks/defaults_raw_ema.py RUN/checkpoints/step-00001000 --out RUN/raw-step-1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch


def initial_weights(checkpoint: str) -> tuple[dict, object]:
    """``({name: w_0}, config)`` of the run that wrote ``checkpoint``."""
    from accelerate.utils import set_seed

    from genmod.train import load_family_from_checkpoint

    family, _ = load_family_from_checkpoint(checkpoint, use_ema=True)
    set_seed(family.config.seed)
    model = family.build_model()
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}, family.config


def raw_from_corrected(corrected: dict, initial: dict, decay: float, num_updates: int) -> dict:
    """``d^T w_0 + (1 - d^T) corrected`` for every averaged parameter (buffers are copied as they are)."""
    share = decay ** num_updates
    return {name: share * initial[name] + (1 - share) * value if name in initial else value
            for name, value in corrected.items()}


def write_raw_checkpoint(checkpoint: str, out: str) -> dict:
    from safetensors.torch import load_file, save_file

    from genmod.train.checkpoint import read_trainer_state

    initial, config = initial_weights(checkpoint)
    if not config.ema_bias_correction or config.ema_warmup:
        raise ValueError(f"{checkpoint}: the identity needs the bias-corrected EMA without warmup "
                         f"(--no-ema_warmup); this run has bias_correction={config.ema_bias_correction}, "
                         f"warmup={config.ema_warmup}")
    num_updates = int(read_trainer_state(checkpoint).get("ema_num_updates", 0))
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(checkpoint, out)
    os.remove(os.path.join(out, "manifest.json"))
    state_file = os.path.join(out, "trainer_state.json")
    with open(state_file) as f:
        state = json.load(f)
    state.pop("integrity", None)
    with open(state_file, "w") as f:
        json.dump(state, f, indent=2)
    ema_dir = os.path.join(out, "ema")
    files = [n for n in os.listdir(ema_dir) if n.endswith(".safetensors")]
    for name in files:
        path = os.path.join(ema_dir, name)
        save_file(raw_from_corrected(load_file(path), initial, config.ema_decay, num_updates), path)
    return {"checkpoint": checkpoint, "out": out, "decay": config.ema_decay, "num_updates": num_updates,
            "initial_share": config.ema_decay ** num_updates}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--check", default=None, help="a raw EMA tracked in training (safetensors) to compare with")
    args = parser.parse_args()
    info = write_raw_checkpoint(args.checkpoint, args.out)
    if args.check:
        from safetensors.torch import load_file

        from genmod.train import load_weights

        tracked, rebuilt = load_file(args.check), load_weights(os.path.join(args.out, "ema"))
        info["max_abs_diff_vs_tracked"] = max((tracked[k] - rebuilt[k]).abs().max().item() for k in tracked)
        info["max_abs_tracked"] = max(v.abs().max().item() for v in tracked.values())
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
