"""``--distributed fsdp`` on the transformer families that need no saved tokenizer, two gloo processes on
CPU: each trains 3 steps sharded (DTensor parameters checked on every rank), exports, and the 2-process
losses are printed next to a 1-process DDP-mode run of the same global batch. The per-rank noise seeds
differ from one process's, so the losses agree only in size, not to 1e-6 (tests/test_fsdp.py checks
exact agreement with a per-sample-noise family).

    python benchmarks/fsdp_families.py            # runs both families, prints one JSON line each
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--max_steps", "3", "--checkpoint_every", "0", "--sample_every", "0", "--num_preview", "0", "--log_every", "0",
          "--no-tensorboard", "--cpu", "--seed", "1", "--lr", "1e-3"]
FAMILIES = {
    "causalfusion": ("genmod.causalfusion.family", ["--patch_size", "4", "--hidden_size", "32", "--depth", "2",
                                                    "--num_heads", "2", "--num_cond_tokens", "2", "--dataset_size", "8"]),
    "diffusion-forcing": ("genmod.diffusion_forcing.family", ["--dataset", "oscillators", "--num_frames", "8",
                                                              "--frame_stack", "2", "--hidden_size", "16", "--depth", "2",
                                                              "--num_heads", "2", "--dataset_size", "8"]),
}


def _worker(name: str, out: str, extra: list[str]) -> None:
    import torch

    from genmod.train import Trainer, get_family, parse_config

    torch.set_num_threads(1)
    importlib.import_module(FAMILIES[name][0])
    entry = get_family(name)
    config = parse_config(entry.config_class, [*COMMON, *FAMILIES[name][1], *extra, "--output_dir", out])
    kinds = {}

    def record(trainer, step, metrics):
        kinds["kinds"] = sorted({type(p).__name__ for p in trainer.model.parameters()})

    Trainer(config, entry(config), callbacks=[record]).train()
    with open(os.path.join(out, f"kinds{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(kinds, f)


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [round(json.loads(line)["loss"], 5) for line in f]


def main() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            two, one = os.path.join(tmp, "two"), os.path.join(tmp, "one")
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                  __file__, "--worker", name, two, "--batch_size", "2", "--distributed", "fsdp"],
                                 capture_output=True, text=True, env=env, timeout=600)
            if run.returncode != 0:
                print(json.dumps({"family": name, "error": run.stderr[-1500:]}))
                continue
            single = subprocess.run([sys.executable, __file__, "--worker", name, one, "--batch_size", "4"],
                                    capture_output=True, text=True, env=env, timeout=600)
            kinds = [json.load(open(os.path.join(two, f"kinds{r}.json")))["kinds"] for r in range(2)]
            print(json.dumps({"family": name, "param_kinds_per_rank": kinds, "fsdp_2proc_losses": _losses(two),
                              "one_proc_losses": _losses(one) if single.returncode == 0 else single.stderr[-800:],
                              "pipeline_exported": os.path.isfile(os.path.join(two, "pipeline", "model_index.json"))}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
