"""FSDP2 (``--distributed fsdp``) on CPU with two gloo processes and a tiny flow transformer: the
parameters really are sharded (DTensor, half the rows per rank), the losses equal one process at the
same global batch, a SIGKILLed sharded run resumes to the uninterrupted losses, and the exported
pipeline loads in a single process with the gathered weights. Models without transformer blocks
(the U-Net) get a one-line refusal.

Also the torchrun worker:
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/test_fsdp.py OUT [--kill-at STEP] [flags]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from genmod.flow.family import FlowConfig, FlowFamily
from genmod.train import ConfigError, Trainer, list_checkpoints, load_weights, parse_config, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 2 blocks of width 32 on 32x32 shapes, patch 4 (64 tokens); per process 2 samples x 2 micro-batches
FLAGS = ["--dataset", "shapes", "--dataset_size", "16", "--backbone", "dit", "--hidden_size", "32", "--depth", "2", "--num_heads", "2",
         "--patch_size", "4", "--no-conditional", "--class_dropout_prob", "0", "--grad_accum_steps", "2",
         "--lr", "1e-2", "--grad_clip", "1.0", "--ema_decay", "0.9", "--ema_warmup", "--max_steps", "4",
         "--checkpoint_every", "2", "--keep_last", "0", "--sample_every", "4", "--num_preview", "2",
         "--log_every", "0", "--no-tensorboard", "--cpu", "--seed", "5"]


class _WithFixedNoise(torch.utils.data.Dataset):
    """The dataset's items plus a noise image and a time drawn once per sample index."""

    def __init__(self, base):
        self.base = base
        g = torch.Generator().manual_seed(99)
        self.noise = torch.randn((len(base), *base[0]["image"].shape), generator=g)
        self.t = torch.rand(len(base), generator=g)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return {**self.base[i], "noise": self.noise[i], "t": self.t[i]}

    def __getattr__(self, name):  # num_classes, class_names, image_size, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class FixedNoiseFlow(FlowFamily):
    """Flow matching whose noise and time are fixed per sample, not drawn per rank: the loss of a global
    batch is then the same on 1 or 2 processes."""

    def build_dataset(self):
        if not isinstance(self._dataset, _WithFixedNoise):
            self._dataset = _WithFixedNoise(super().build_dataset())
        return self._dataset

    def loss(self, model, batch, generator):
        x0, noise, t = batch["image"], batch["noise"], batch["t"]
        x_t = self.path.sample(x0, noise, t).x_t
        out = model(x_t, 1000 * t).sample
        return {"loss": ((out - (noise - x0)) ** 2).mean()}


def _torchrun(out, *extra, wait=True):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP")}
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(out), *FLAGS, "--batch_size", "2", "--distributed", "fsdp",
           "--output_dir", str(out), *extra]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return _wait(run) if wait else run


def _wait(run):
    stdout, stderr = run.communicate(timeout=300)
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def _losses(out):
    return [m["loss"] for m in read_metrics(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 2-process FSDP run, one killed during its step-4 checkpoint and resumed."""
    root = tmp_path_factory.mktemp("fsdp")
    straight, killed = root / "straight", root / "killed"
    started = [_torchrun(straight, wait=False), _torchrun(killed, "--kill-at", "4", wait=False)]  # side by side
    done, crash = [_wait(run) for run in started]
    assert done.returncode == 0, done.stderr[-3000:]
    assert crash.returncode != 0 and "exitcode  : -9" in crash.stderr, crash.stderr[-3000:]  # rank 0's SIGKILL
    assert [step for step, _ in list_checkpoints(killed)] == [2]  # the step-4 write never became visible
    assert (killed / "checkpoints" / ".tmp-step-00000004").is_dir()
    resumed = _torchrun(killed, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return straight, killed


def test_parameters_are_sharded_half_per_rank(runs):
    straight, _ = runs
    saved = [json.loads((straight / f"shards{r}.json").read_text()) for r in range(2)]
    assert all(s["fsdp_modules"] == ["", "blocks.0", "blocks.1"] for s in saved)  # each block, then the root
    ranks = [s["params"] for s in saved]
    config = parse_config(FlowConfig, [*FLAGS, "--output_dir", str(straight)])
    plain = {name: list(p.shape) for name, p in FixedNoiseFlow(config).build_model().named_parameters()}
    assert {name: info[3] for name, info in ranks[1].items()} == plain  # every parameter, full shapes
    for name, (kind, placements, local, full) in ranks[0].items():
        assert kind == "DTensor" and placements == ["S(0)"], name
        rows = [ranks[r][name][2][0] for r in range(2)]
        assert sum(rows) == full[0] and rows[0] == -(-full[0] // 2), (name, rows, full)  # torch.chunk rows
        assert ranks[1][name][2][1:] == full[1:]
    # a block's adaLN (32 -> 6 * 32) holds 96 of its 192 rows on each rank
    assert [ranks[r]["blocks.0.adaLN_modulation.1.weight"][2] for r in range(2)] == [[96, 32], [96, 32]]


def test_two_fsdp_processes_match_one_process_at_same_global_batch(runs, tmp_path):
    straight, _ = runs
    config = parse_config(FlowConfig, [*FLAGS, "--batch_size", "4", "--output_dir", str(tmp_path / "one")])
    Trainer(config, FixedNoiseFlow(config)).train()
    assert _losses(straight) == pytest.approx(_losses(tmp_path / "one"), rel=0, abs=1e-6)
    for sub in ("model", "ema"):
        a = load_weights(str(straight / "checkpoints" / "step-00000004" / sub))
        b = load_weights(str(tmp_path / "one" / "checkpoints" / "step-00000004" / sub))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_sigkill_during_sharded_checkpoint_then_resume_is_bitwise(runs):
    straight, killed = runs
    assert len(_losses(straight)) == 4 and _losses(killed) == _losses(straight)  # bitwise
    assert [step for step, _ in list_checkpoints(killed)] == [2, 4]
    for sub in ("model", "ema"):
        a = load_weights(str(straight / "checkpoints" / "step-00000004" / sub))
        b = load_weights(str(killed / "checkpoints" / "step-00000004" / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((killed / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["distributed"] == "fsdp" and state["world_size"] == 2
    # the step-4 preview (rank 0's gathered EMA copy) has the same pixels
    assert (killed / "samples" / "step-000004.png").read_bytes() == (straight / "samples" / "step-000004.png").read_bytes()


def test_sharded_checkpoint_resumes_on_one_unsharded_process(runs, tmp_path):
    """The gathered checkpoint is the DDP format: one process continues it (model, EMA and AdamW moments)."""
    straight, _ = runs
    config = parse_config(FlowConfig, [*FLAGS, "--batch_size", "4", "--output_dir", str(tmp_path),
                                       "--resume", str(straight / "checkpoints" / "step-00000002")])
    Trainer(config, FixedNoiseFlow(config)).train()
    assert _losses(tmp_path) == pytest.approx(_losses(straight)[2:], rel=0, abs=1e-6)


def test_exported_pipeline_loads_in_one_process_with_gathered_weights(runs):
    from genmod.flow.pipeline import FlowMatchingPipeline

    straight, _ = runs
    pipe = FlowMatchingPipeline.from_pretrained(str(straight / "pipeline"))
    gathered = load_weights(str(straight / "gathered"))  # rank 0's full_tensor() of the sharded EMA
    weights = dict(pipe.transformer.named_parameters())
    assert weights.keys() == gathered.keys()
    assert all(torch.equal(weights[k], gathered[k]) for k in weights)
    assert all(not hasattr(p, "placements") for p in weights.values())  # plain tensors


def test_unet_refuses_fsdp_in_one_line(tmp_path):
    config = parse_config(FlowConfig, [*FLAGS, "--backbone", "unet", "--distributed", "fsdp",
                                       "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"^--distributed fsdp: FlowUNet has no transformer blocks to shard") as err:
        Trainer(config, FlowFamily(config)).train()
    assert "\n" not in str(err.value)


def test_accelerate_config_fsdp_selects_fsdp_and_is_hidden_from_the_plugin(monkeypatch):
    from genmod.train.sharding import accelerate_fsdp_env_off, distributed_mode

    config = parse_config(FlowConfig, ["--output_dir", "unused"])
    assert distributed_mode(config) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for distributed_type: FSDP
    assert distributed_mode(config) == "fsdp"
    with accelerate_fsdp_env_off():
        assert "ACCELERATE_USE_FSDP" not in os.environ
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"


def _write_shards(trainer, out, rank):
    """Per rank: each parameter's kind, placements, local and global shape; rank 0: the gathered EMA."""
    from safetensors.torch import save_file

    from genmod.train.sharding import full_value

    from torch.distributed.fsdp import FSDPModule

    info = {name: [type(p).__name__, [str(x) for x in getattr(p, "placements", [])],
                   list(p.to_local().shape) if hasattr(p, "to_local") else list(p.shape), list(p.shape)]
            for name, p in trainer.model.named_parameters()}
    units = [name for name, m in trainer.model.named_modules() if isinstance(m, FSDPModule)]
    with open(os.path.join(out, f"shards{rank}.json"), "w") as f:
        json.dump({"params": info, "fsdp_modules": units}, f)
    ema = {name: full_value(shadow).contiguous() for name, shadow in zip(trainer.ema.names, trainer.ema.shadow)}
    if rank == 0:
        os.makedirs(os.path.join(out, "gathered"), exist_ok=True)
        save_file(ema, os.path.join(out, "gathered", "ema.safetensors"))


def _worker(argv):
    out, argv = argv[0], argv[1:]
    kill_at = None
    if "--kill-at" in argv:
        i = argv.index("--kill-at")
        kill_at, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    config = parse_config(FlowConfig, argv)
    if kill_at is not None:
        import genmod.train.trainer as trainer_module
        from genmod.train.checkpoint import _save_model

        real_write = trainer_module.write_checkpoint

        def write_then_die(staging, step, **kwargs):
            if step == kill_at:  # rank 0 dies halfway through the write; torchrun then stops rank 1
                _save_model(kwargs["model"], os.path.join(staging, "model"))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(staging, step, **kwargs)

        trainer_module.write_checkpoint = write_then_die
    def record(trainer, step, metrics):  # before train() ends and the process group is gone
        if step == config.max_steps:
            _write_shards(trainer, out, rank)

    Trainer(config, FixedNoiseFlow(config), callbacks=[record]).train()


if __name__ == "__main__":
    _worker(sys.argv[1:])
