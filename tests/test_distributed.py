"""Two processes on CPU with gloo: the trainer under ``ACCELERATE_USE_CPU=1 torchrun`` matches one
process at the same global batch (2 x 2 vs 1 x 4); plain ``torchrun`` on CPU is refused.

Also the torchrun worker:  torchrun --standalone --nproc_per_node 2 tests/test_distributed.py OUT [flags]
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import REPO, Points, ToyConfig, ToyFamily  # noqa: E402

from genmod.train import Trainer, load_weights, parse_config, read_metrics  # noqa: E402

RUN_FLAGS = ["--no-tensorboard", "--max_steps", "3", "--lr", "1e-2", "--deterministic_loss", "--ema_decay", "0.5",
             "--checkpoint_every", "0", "--sample_every", "0", "--log_every", "0", "--grad_clip", "0", "--seed", "11"]


def _record_first_step_grads(path):
    """Save the gradients the optimizer sees on its first step (after the all-reduce)."""
    from safetensors.torch import save_file

    state = {"done": False}

    def hook(optimizer, args, kwargs):
        if not state["done"]:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            save_file({f"p{i}": p.grad.detach().clone().contiguous() for i, p in enumerate(params)}, path)
            state["done"] = True

    return register_optimizer_step_pre_hook(hook)


def _torchrun(out, extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), **extra_env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(out), *RUN_FLAGS, "--batch_size", "2", "--output_dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def one_process_reference(tmp_path, out) -> dict:
    """Train the toy run on one process at the global batch (4) into ``out``; its first-step gradients."""
    handle = _record_first_step_grads(str(tmp_path / "grads_single.safetensors"))
    try:
        config = parse_config(ToyConfig, [*RUN_FLAGS, "--batch_size", "4", "--output_dir", str(out), "--cpu"])
        Trainer(config, ToyFamily(config), Points()).train()
    finally:
        handle.remove()
    return load_weights(str(tmp_path))  # grads_single.safetensors


def test_two_gloo_processes_match_one_process_at_same_global_batch(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    run = _torchrun(two, {"ACCELERATE_USE_CPU": "1"})
    assert run.returncode == 0, run.stderr[-3000:]

    single = one_process_reference(tmp_path, one)
    for rank in range(2):
        grads = load_weights(str(two / f"rank{rank}"))
        assert grads.keys() == single.keys()
        for key in single:  # the all-reduced mean of 2 x 2 samples == the mean over 4
            torch.testing.assert_close(grads[key], single[key], rtol=0, atol=1e-6)
    assert [m["loss"] for m in read_metrics(two)] == pytest.approx([m["loss"] for m in read_metrics(one)], abs=1e-6)
    for sub in ("model", "ema"):
        a = load_weights(str(two / "checkpoints" / "step-00000003" / sub))
        b = load_weights(str(one / "checkpoints" / "step-00000003" / sub))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    params = [load_weights(str(two / f"params{rank}")) for rank in range(2)]
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])  # ranks stay identical


@pytest.mark.skipif(torch.cuda.is_available(), reason="plain torchrun is real DDP on GPUs")
def test_plain_torchrun_on_cpu_is_refused(tmp_path):
    run = _torchrun(tmp_path / "plain", {})
    assert run.returncode != 0
    assert "WORLD_SIZE=2 but Accelerate sees 1 process" in run.stderr
    assert not os.path.exists(tmp_path / "plain" / "metrics.jsonl")


def _worker(argv):
    from safetensors.torch import save_file

    out, argv = argv[0], argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(os.path.join(out, f"rank{rank}"), exist_ok=True)
    _record_first_step_grads(os.path.join(out, f"rank{rank}", "grads.safetensors"))
    torch.set_num_threads(1)
    config = parse_config(ToyConfig, argv)
    trainer = Trainer(config, ToyFamily(config), Points())
    trainer.train()
    os.makedirs(os.path.join(out, f"params{rank}"), exist_ok=True)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, f"params{rank}", "params.safetensors"))


if __name__ == "__main__":
    _worker(sys.argv[1:])
