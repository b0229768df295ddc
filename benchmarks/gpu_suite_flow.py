"""Case 1 of benchmarks/gpu_suite.py: genmod's Trainer against a bare PyTorch loop on one FlowTransformer.

Both loops train the same model (same init seed) on the same in-memory latents through a DataLoader
(CPU batches moved to the device each step), with the linear flow-matching loss, AdamW (lr 1e-4,
betas 0.9/0.999, eps 1e-8, no weight decay), grad-norm clipping at 1.0, the same EMA (the trainer's
default decay 0.9999; both loops update it every step), bf16 autocast and one host sync per step
(the trainer's metrics; ``loss.item()`` in the bare loop). The trainer runs as users run it
(metrics line every 10 steps, TensorBoard on; no checkpoints or previews inside the timed steps; the
run is stopped from a callback after the last timed step, so the final checkpoint and export are
not part of it). ``torch.compile``: the trainer through Accelerate's own switch
(``ACCELERATE_DYNAMO_BACKEND``), the bare loop by ``torch.compile(model)``, same backend.
Eager rounds alternate the order (trainer first, then bare first, ...); the ratio is the median of
the per-round ratios trainer / bare.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch._dynamo

from genmod.flow.transformer import FlowTransformer
from genmod.train import EMA, Family, TrainConfig, Trainer
from gpu_suite_common import Budget, count_flops, flow_transformer_train_flops, mfu, time_steps


class RandomLatents(torch.utils.data.Dataset):
    """``num`` fixed Gaussian latents ``[C, H, W]`` with class labels (seeded)."""

    def __init__(self, num: int, channels: int, size: int, num_classes: int):
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(num, channels, size, size, generator=g)
        self.labels = torch.randint(0, max(num_classes, 1), (num,), generator=g)

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"image": self.latents[i], "label": self.labels[i]}


def flow_loss(model, x0, labels, generator):
    """Linear path (t=0 data, t=1 noise), velocity target ``eps - x0``; the squared error in fp32."""
    t = torch.rand(x0.shape[0], generator=generator, device=generator.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    pred = model(x_t, 1000 * t, labels, dropout_generator=generator).sample
    return (pred.float() - (noise - x0)).square().mean()


@dataclass
class SuiteFlowConfig(TrainConfig):
    pass


class SuiteFlowFamily(Family):
    name = "gpu-suite-flow"
    config_class = SuiteFlowConfig

    def __init__(self, config, model_kwargs: dict):
        super().__init__(config)
        self.model_kwargs = model_kwargs

    def build_model(self):
        return FlowTransformer(**self.model_kwargs)

    def loss(self, model, batch, generator):
        return {"loss": flow_loss(model, batch["image"], batch["label"], generator)}


class _StopTraining(Exception):
    """Raised from the trainer's callback once the timed steps are done (skips the final export)."""


@contextlib.contextmanager
def dynamo_env(backend: str | None):
    """Accelerate compiles the model in ``prepare`` when ``ACCELERATE_DYNAMO_BACKEND`` names a backend."""
    old = os.environ.get("ACCELERATE_DYNAMO_BACKEND")
    os.environ["ACCELERATE_DYNAMO_BACKEND"] = backend or "no"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ACCELERATE_DYNAMO_BACKEND", None)
        else:
            os.environ["ACCELERATE_DYNAMO_BACKEND"] = old


def run_trainer(spec: dict, device: torch.device, budget: Budget, backend: str | None) -> float:
    """Samples/s of genmod's Trainer over the steps after ``spec['warmup']`` warm-up steps."""
    stamps, warmup, total = [], spec["warmup"], spec["warmup"] + spec["steps"]

    def callback(trainer, step, metrics):  # after the step's host sync: the GPU work is done
        stamps.append(time.perf_counter())
        if step >= total or (step > warmup and budget.expired()):
            raise _StopTraining

    with tempfile.TemporaryDirectory() as out, dynamo_env(backend):
        config = SuiteFlowConfig(output_dir=out, cpu=device.type == "cpu", max_steps=total + 1,
                                 batch_size=spec["batch"], lr=1e-4, grad_clip=1.0, ema_decay=spec["ema_decay"],
                                 mixed_precision=spec["precision"], checkpoint_every=0, sample_every=0, seed=0)
        try:
            Trainer(config, SuiteFlowFamily(config, spec["model"]), make_dataset(spec), callbacks=[callback]).train()
        except _StopTraining:
            pass
    return (len(stamps) - warmup) * spec["batch"] / (stamps[-1] - stamps[warmup - 1])


def make_dataset(spec: dict) -> RandomLatents:
    model = spec["model"]
    return RandomLatents(4 * spec["batch"], model["in_channels"], model["sample_size"], model["num_classes"])


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def bare_step_fn(spec: dict, device: torch.device, backend: str | None):
    """(model, one training step of the bare loop) with its own DataLoader, optimizer and EMA."""
    torch.manual_seed(0)
    model = FlowTransformer(**spec["model"]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, spec["ema_decay"]).to(device) if spec["ema_decay"] > 0 else None
    forward = torch.compile(model, backend=backend) if backend else model
    loader = torch.utils.data.DataLoader(make_dataset(spec), batch_size=spec["batch"], shuffle=True, drop_last=True)
    state = {"iter": iter(loader), "step": 0}

    def step():
        batch = next(state["iter"], None)
        if batch is None:
            state["iter"] = iter(loader)
            batch = next(state["iter"])
        x0, labels = batch["image"].to(device), batch["label"].to(device)
        generator = torch.Generator(device=device).manual_seed(state["step"])
        with _autocast(device, spec["precision"]):
            loss = flow_loss(forward, x0, labels, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        loss.item()
        state["step"] += 1

    return model, step


def run_bare(spec: dict, device: torch.device, budget: Budget, backend: str | None) -> float:
    """Samples/s of the bare PyTorch loop over the steps after warm-up."""
    _, step = bare_step_fn(spec, device, backend)
    timing = time_steps(step, device, spec["warmup"], spec["steps"], budget)
    return spec["batch"] / timing["seconds_per_step"]


def step_flops(spec: dict, device: torch.device) -> tuple[int, int, int]:
    """(FlopCounterMode count of one forward + backward, the analytic count, parameters) for the spec's batch."""
    torch.manual_seed(0)
    model = FlowTransformer(**spec["model"]).to(device).train()
    data = make_dataset(spec)
    x0 = data.latents[: spec["batch"]].to(device)
    labels = data.labels[: spec["batch"]].to(device)

    def fn():
        generator = torch.Generator(device=device).manual_seed(0)
        with _autocast(device, spec["precision"]):
            loss = flow_loss(model, x0, labels, generator)
        loss.backward()

    size = spec["model"]["sample_size"]
    analytic = flow_transformer_train_flops(model.config, spec["batch"], size, size)
    return count_flops(fn, device), analytic, sum(p.numel() for p in model.parameters())


def graph_breaks() -> dict:
    """Dynamo's graph breaks so far, by the first line of their reason."""
    found = {}
    for reason, count in torch._dynamo.utils.counters["graph_break"].items():
        key = str(reason).splitlines()[0][:120]
        found[key] = found.get(key, 0) + count
    return found


def trainer_vs_bare(spec: dict, device: torch.device, budget: Budget, peak: float | None,
                    backend: str | None = None) -> dict:
    """Samples/s, MFU and the trainer / bare ratio (median over alternating rounds that fit the budget)."""
    counted, analytic, params = step_flops(spec, device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ours, bare = [], []
    for round_index in range(spec["rounds"]):
        if round_index and budget.expired():
            break
        order = (run_trainer, run_bare) if round_index % 2 == 0 else (run_bare, run_trainer)
        for run in order:
            (ours if run is run_trainer else bare).append(run(spec, device, budget, backend))
    ratios = [a / b for a, b in zip(ours, bare)]
    trainer_sps, bare_sps = statistics.median(ours), statistics.median(bare)
    return {
        "compile": backend or "off", "batch": spec["batch"], "ema_decay": spec["ema_decay"],
        "precision": spec["precision"], "rounds": len(ratios),
        "params": params,
        "flops_per_step": counted, "flops_per_step_analytic": analytic,
        "trainer_samples_per_s": trainer_sps, "bare_samples_per_s": bare_sps,
        "ratio_trainer_over_bare": statistics.median(ratios), "round_ratios": ratios,
        "trainer_mfu": mfu(counted, spec["batch"] / trainer_sps, peak),
        "bare_mfu": mfu(counted, spec["batch"] / bare_sps, peak),
        "graph_breaks": graph_breaks() if backend else None,
    }
