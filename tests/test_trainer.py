"""The one trainer: EMA, schedules, data order, exact SIGKILL resume, atomic checkpoints, NaN guard,
gradient accumulation, previews.

Also runnable as a script (the subprocess worker of the resume test):
    python tests/test_trainer.py [--kill-during-checkpoint STEP] --output_dir OUT [--field value ...]
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from genmod.train import (EMA, CheckpointError, EpochBatchSampler, Family, TrainConfig, Trainer,
                          TrainingDivergedError, find_checkpoint, list_checkpoints, load_weights, parse_config,
                          read_metrics)
from genmod.train.checkpoint import load_training_state
from genmod.train.trainer import LRSchedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# A tiny family: 2-D points, an MLP velocity field, the linear flow-matching loss


class TinyVelocityMLP(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 16, dropout: float = 0.0):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(hidden, dim))

    def forward(self, x, timestep):
        return self.net(torch.cat([x, timestep[:, None] / 1000.0], dim=1))


class Points(torch.utils.data.Dataset):
    """A fixed two-blob point cloud with labels."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(123)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.points = torch.randn(n, 2, generator=g) * 0.3 + (self.labels[:, None] * 2.0 - 1.0)

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        return {"point": self.points[i], "label": self.labels[i]}


@dataclass
class ToyConfig(TrainConfig):
    hidden: int = 16
    dropout: float = 0.0
    deterministic_loss: bool = False  # regression to a fixed map: no generator draws at all
    nan_after_micro_steps: int = -1  # test hook: loss becomes NaN from this micro-step on


class ToyFamily(Family):
    name = "toy"
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def build_model(self):
        return TinyVelocityMLP(hidden=self.config.hidden, dropout=self.config.dropout)

    def loss(self, model, batch, generator):
        x0 = batch["point"]
        self.calls += 1
        if self.config.deterministic_loss:
            target = torch.stack([x0[:, 1], -x0[:, 0]], dim=1)
            loss = ((model(x0, torch.zeros(len(x0))) - target) ** 2).mean()
            return {"loss": loss}
        t = torch.rand(len(x0), generator=generator, device=generator.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise  # t=0 data, t=1 noise
        loss = ((model(x_t, 1000 * t) - (noise - x0)) ** 2).mean()
        if 0 <= self.config.nan_after_micro_steps < self.calls:
            loss = loss * float("nan")
        return {"loss": loss, "t_mean": t.mean()}

    @torch.no_grad()
    def sample(self, model, num, generator):
        x = torch.randn(num, 2, generator=generator, device=generator.device)
        grid = torch.linspace(1, 0, 5)
        for t0, t1 in zip(grid[:-1], grid[1:]):  # Euler from noise to data
            x = x + (t1 - t0) * model(x, torch.full((num,), 1000 * float(t0)))
        return x.view(num, 1, 1, 2).clamp(-1, 1)  # a 1x2 "image" per sample


def toy_config(tmp_path, **overrides) -> ToyConfig:
    base = dict(output_dir=str(tmp_path), cpu=True, tensorboard=False, max_steps=6, batch_size=4, lr=1e-2,
                ema_decay=0.9, checkpoint_every=0, sample_every=0, log_every=0, keep_last=0, seed=7)
    base.update(overrides)
    return ToyConfig(**base)


def run_toy(config, dataset=None, callbacks=None):
    family = ToyFamily(config)
    summary = Trainer(config, family, dataset if dataset is not None else Points(), callbacks=callbacks).train()
    return summary


def losses(output_dir):
    return [m["loss"] for m in read_metrics(output_dir)]


# ---------------------------------------------------------------------------------------------
# Pieces with known answers


def test_ema_update_equals_formula():
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=0.9, bias_correction=False)  # the constant-decay formula (tests/test_ema.py: corrected)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for shadow, p0 in zip(ema.shadow, start):  # 0.9 * p0 + 0.1 * (p0 + 1)
        torch.testing.assert_close(shadow, p0 + 0.1, rtol=0, atol=1e-6)

    warm = EMA(model, decay=0.999, warmup=True, inv_gamma=1.0, power=0.75)
    decays = []
    for _ in range(4):
        decays.append(warm.current_decay())
        warm.update(model)
    expected = [min(0.999, 1 - (1 + t) ** -0.75) for t in range(4)]
    assert decays == pytest.approx(expected, abs=1e-12)
    assert decays[0] == 0.0  # the first update copies the weights
    copy = torch.nn.Linear(3, 2)
    ema.copy_to(copy)
    for p, shadow in zip(copy.parameters(), ema.shadow):
        assert torch.equal(p, shadow)
    state = ema.state_dict()
    assert state["num_updates"] == 1 and set(state["shadow"]) == {"weight", "bias"}


def test_lr_schedule_warmup_cosine_linear():
    cos = LRSchedule("cosine", warmup_steps=4, total_steps=14)
    assert [cos(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cos(4) == pytest.approx(1.0) and cos(9) == pytest.approx(0.5) and cos(14) == pytest.approx(0.0)
    lin = LRSchedule("linear", warmup_steps=0, total_steps=10)
    assert lin(5) == pytest.approx(0.5) and lin(20) == 0.0
    assert LRSchedule("constant", 2, 10)(7) == 1.0


def test_epoch_sampler_splits_global_batches_across_ranks():
    single = EpochBatchSampler(22, batch_size=4, num_processes=1, seed=3)
    ranks = [EpochBatchSampler(22, batch_size=2, num_processes=2, rank=r, seed=3) for r in range(2)]
    one = list(single)
    two = [list(s) for s in ranks]
    assert len(one) == 5 and all(len(b) == 2 for b in two[0])  # 22 // 4 global batches, last dropped
    for i, batch in enumerate(one):
        assert batch == two[0][i] + two[1][i]
    flat = sum(one, [])
    assert len(set(flat)) == 20 and set(flat) <= set(range(22))
    single.set_epoch(1)
    assert list(single) != one  # a new permutation per epoch
    single.set_epoch(0, start_batch=3)
    assert list(single) == one[3:]  # resume skips consumed batches


# ---------------------------------------------------------------------------------------------
# Exact resume after SIGKILL (during a checkpoint write, after an earlier checkpoint)


def _run_worker(out, *extra, kill_step=None, ema=("--ema_warmup",)):
    cmd = [sys.executable, os.path.abspath(__file__)]
    if kill_step is not None:
        cmd += ["--kill-during-checkpoint", str(kill_step)]
    cmd += ["--output_dir", str(out), "--cpu", "--no-tensorboard", "--max_steps", "6", "--batch_size", "4",
            "--grad_accum_steps", "2", "--lr", "1e-2", "--ema_decay", "0.9", *ema, "--checkpoint_every",
            "2", "--keep_last", "2", "--sample_every", "3", "--num_preview", "4", "--log_every", "0", "--seed", "5",
            "--dropout", "0.1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.parametrize("ema", [("--ema_warmup",), ("--no-ema_warmup",)], ids=["warmup+bias_correction", "bias_correction"])
def test_sigkill_and_resume_reproduce_uninterrupted_run(tmp_path, ema):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _run_worker(straight, ema=ema)
    assert done.returncode == 0, done.stderr[-2000:]

    crash = _run_worker(killed, kill_step=4, ema=ema)
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-2000:]
    # the kill hit the step-4 write: it stays invisible, latest still names the complete step 2
    assert [step for step, _ in list_checkpoints(killed)] == [2]
    assert os.path.isdir(killed / "checkpoints" / ".tmp-step-00000004")
    assert find_checkpoint(killed, "latest").endswith("step-00000002")
    assert max(m["step"] for m in read_metrics(killed)) == 4  # the killed run got further than its checkpoint

    resumed = _run_worker(killed, "--resume", "latest", ema=ema)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = losses(straight), losses(killed)
    assert len(expected) == 6 and got == expected  # bitwise: noise, dropout and data order all restored
    for sub in ("model", "ema"):
        a = load_weights(str(straight / "checkpoints" / "step-00000006" / sub))
        b = load_weights(str(killed / "checkpoints" / "step-00000006" / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_last=2 pruned step 2 once step 6 was written; the stale staging folder was replaced
    assert [step for step, _ in list_checkpoints(killed)] == [4, 6]
    assert not os.path.exists(killed / "checkpoints" / ".tmp-step-00000004")
    # previews at step 3 and 6, the same pixels in both runs
    assert sorted(os.listdir(killed / "samples")) == ["step-000003.png", "step-000006.png"]
    assert (straight / "samples" / "step-000006.png").read_bytes() == (killed / "samples" / "step-000006.png").read_bytes()
    state = load_training_state(str(killed / "checkpoints" / "step-00000006"))  # weights_only loads
    assert set(state) == {"optimizer", "lr_scheduler", "grad_scaler", "rng", "family"}
    trainer_state = json.loads((killed / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert trainer_state["step"] == 6 and trainer_state["samples_seen"] == 6 * 2 * 4
    assert (trainer_state["epoch"], trainer_state["batch_in_epoch"]) == divmod(12, 64 // 4)


# ---------------------------------------------------------------------------------------------
# Checkpoint files, pruning, corrupt checkpoints, NaN guard


def test_checkpoints_prune_and_corrupt_latest_is_a_clear_error(tmp_path):
    run_toy(toy_config(tmp_path, max_steps=5, checkpoint_every=2, keep_last=2))
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]  # every 2 + the final step
    latest = find_checkpoint(tmp_path, "latest")
    assert latest.endswith("step-00000005")
    names = set(os.listdir(latest))
    assert {"model", "ema", "training_state.pt", "trainer_state.json", "train_config.json"} <= names
    assert os.path.isfile(os.path.join(latest, "model", "diffusion_pytorch_model.safetensors"))
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]

    os.remove(os.path.join(latest, "training_state.pt"))
    with pytest.raises(CheckpointError, match=r"step-00000005 is incomplete or corrupt \(missing training_state.pt\)"):
        find_checkpoint(tmp_path, "latest")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099\n")
    with pytest.raises(CheckpointError, match="step-00000099, which does not exist"):
        find_checkpoint(tmp_path, "latest")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        find_checkpoint(tmp_path, str(tmp_path / "nowhere"))


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    """A finished cosine run resumed with a larger --max_steps (and another lr / weight decay) trains on
    with the new schedule: lr = lr' * 0.5 (1 + cos(pi p)) at the new progress, not the old one's 0."""
    run_toy(toy_config(tmp_path, max_steps=4, checkpoint_every=4, lr_schedule="cosine", lr=1e-2))
    assert read_metrics(tmp_path)[-1]["step"] == 4
    config = toy_config(tmp_path, max_steps=8, log_every=1, lr_schedule="cosine", lr=2e-2, weight_decay=0.1,
                        resume="latest")
    family = ToyFamily(config)
    trainer = Trainer(config, family, Points())
    trainer.train()
    group = trainer.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and group["initial_lr"] == 2e-2
    logged = {m["step"]: m["lr"] for m in read_metrics(tmp_path)}
    # the lr logged at step s is the one step s used: factor of (s - 1) / 8 of the new cosine
    for step in (5, 6, 7, 8):
        assert logged[step] == pytest.approx(2e-2 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 8)), rel=1e-6)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = toy_config(tmp_path, max_steps=8, checkpoint_every=2, nan_after_micro_steps=4)
    with pytest.raises(TrainingDivergedError) as info:
        run_toy(config)
    message = str(info.value)
    assert "\n" not in message and "step 5: the loss is nan" in message and "step-00000004" in message
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]
    weights = load_weights(str(tmp_path / "checkpoints" / "step-00000004" / "model"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Gradient accumulation, mixed precision, previews, reloading


def test_grad_accumulation_2x2_equals_batch_4(tmp_path):
    common = dict(max_steps=3, deterministic_loss=True, ema_decay=0.0, grad_clip=0.0)
    run_toy(toy_config(tmp_path / "a", batch_size=2, grad_accum_steps=2, **common))
    run_toy(toy_config(tmp_path / "b", batch_size=4, grad_accum_steps=1, **common))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-6)
    gn_a = [m["grad_norm"] for m in read_metrics(tmp_path / "a")]
    gn_b = [m["grad_norm"] for m in read_metrics(tmp_path / "b")]
    assert gn_a == pytest.approx(gn_b, abs=1e-6)
    a = load_weights(str(tmp_path / "a" / "checkpoints" / "step-00000003" / "model"))
    b = load_weights(str(tmp_path / "b" / "checkpoints" / "step-00000003" / "model"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_bf16_autocast_matches_fp32_first_loss(tmp_path):
    run_toy(toy_config(tmp_path / "fp32", max_steps=1, ema_decay=0.0))
    run_toy(toy_config(tmp_path / "bf16", max_steps=1, ema_decay=0.0, mixed_precision="bf16"))
    fp32, bf16 = losses(tmp_path / "fp32")[0], losses(tmp_path / "bf16")[0]
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=2e-2)  # same data and noise, bf16 rounding


def test_preview_grid_tensorboard_and_reload_ema(tmp_path):
    from PIL import Image

    from genmod.train import load_family_from_checkpoint

    seen = []
    config = toy_config(tmp_path, max_steps=4, sample_every=2, num_preview=4, tensorboard=True, log_every=1)
    summary = run_toy(config, callbacks=[lambda trainer, step, metrics: seen.append((step, metrics["lr"]))])
    assert seen == [(1, 1e-2), (2, 1e-2), (3, 1e-2), (4, 1e-2)]
    # 4 samples of 1x2 pixels in a 2x2 grid with torchvision's 2-pixel padding: 10 wide, 8 high
    assert Image.open(tmp_path / "samples" / "step-000004.png").size == (10, 8)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "logs"))
    assert summary.final_step == 4 and summary.last_loss == losses(tmp_path)[-1]

    family, model = load_family_from_checkpoint(str(tmp_path))
    ema = load_weights(str(tmp_path / "checkpoints" / "step-00000004" / "ema"))
    final = load_weights(summary.final_model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]) and torch.equal(value, final[name])
    assert isinstance(family, ToyFamily) and family.config.max_steps == 4


def test_world_size_guard(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but Accelerate sees 1 process"):
        Trainer(toy_config(tmp_path, cpu=False), ToyFamily(toy_config(tmp_path)), Points())._make_accelerator()
    AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------------------------------------
# Subprocess worker


def _worker(argv):
    kill_step = None
    if argv[:1] == ["--kill-during-checkpoint"]:
        kill_step, argv = int(argv[1]), argv[2:]
    config = parse_config(ToyConfig, argv)
    if kill_step is not None:
        import genmod.train.trainer as trainer_module
        from genmod.train.checkpoint import _save_model

        real_write = trainer_module.write_checkpoint

        def write_then_die(staging, step, **kwargs):
            if step == kill_step:  # die halfway: the model is written, the rest is not
                _save_model(kwargs["model"], os.path.join(staging, "model"))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(staging, step, **kwargs)

        trainer_module.write_checkpoint = write_then_die
    torch.set_num_threads(1)
    Trainer(config, ToyFamily(config), Points()).train()


if __name__ == "__main__":
    _worker(sys.argv[1:])
