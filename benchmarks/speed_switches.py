"""``--compile`` with the default TorchInductor backend (the test uses ``aot_eager`` to stay fast):
the flow family's smallest config, 3 steps eager vs compiled; prints losses and wall times.

    python benchmarks/speed_switches.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
import time

from genmod.train import Trainer, get_family, parse_config, read_metrics

FLOW = ["--dataset", "shapes", "--dataset_size", "16", "--batch_size", "4", "--hidden_size", "32", "--depth", "2",
        "--num_heads", "2", "--patch_size", "8", "--cpu", "--report_to", "none", "--num_preview", "0",
        "--sample_every", "0", "--log_every", "0", "--checkpoint_every", "0", "--seed", "3", "--max_steps", "3"]


def run(out: str, compile_: bool) -> dict:
    import genmod.flow.family  # noqa: F401  (registers "flow")

    entry = get_family("flow")
    config = parse_config(entry.config_class, [*FLOW, "--output_dir", out, *(["--compile"] if compile_ else [])])
    start = time.monotonic()
    Trainer(config, entry(config)).train()
    return {"seconds": round(time.monotonic() - start, 2), "losses": [m["loss"] for m in read_metrics(out)]}


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/bench_speed"
    eager, compiled = run(f"{root}/eager", False), run(f"{root}/compiled", True)
    worst = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"]))
    print(json.dumps({"eager": eager, "inductor": compiled, "max_abs_loss_difference": worst}, indent=1))
