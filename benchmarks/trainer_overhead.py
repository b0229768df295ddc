"""Training throughput of genmod's Trainer against a plain PyTorch loop on the same model and batch.

Both train the same FlowTransformer (genmod/flow/transformer.py) with the linear flow-matching loss
on the same in-memory images, with the same AdamW and gradient clipping, on the same device.
Warm-up steps are excluded; the two loops run back to back in each round (order alternating), and
the reported ratio is the median of the per-round ratios, so load from other processes on a shared
machine hits both alike.

Rows:
  * trainer (defaults)  EMA 0.9999, per-step metrics line + loss all-reduce, TensorBoard every 10 steps,
                        vs the plain loop with the same EMA update;
  * trainer (no EMA)    the bare machinery vs the plain loop without EMA.

    python benchmarks/trainer_overhead.py [--steps 30] [--warmup 5] [--rounds 3] [--batch 16] [--device cpu]

Prints a markdown table and writes benchmarks/results/trainer_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from genmod.flow.transformer import FlowTransformer
from genmod.train import EMA, Family, TrainConfig, Trainer

# On a shared CPU box, wall time mostly measures other people's jobs: there the default clock is
# this process's CPU time (all threads), which counts the work each loop does. GPUs use wall time.
CLOCK = time.perf_counter

MODEL = dict(in_channels=3, sample_size=16, patch_size=2, hidden_size=128, depth=4, num_heads=4, num_classes=10)


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n=512, size=16):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def flow_loss(model, images, labels, generator):
    """Linear path (t=0 data, t=1 noise), velocity target eps - x0."""
    t = torch.rand(images.shape[0], generator=generator, device=generator.device)
    noise = torch.randn(images.shape, generator=generator, device=generator.device)
    x_t = (1 - t.view(-1, 1, 1, 1)) * images + t.view(-1, 1, 1, 1) * noise
    pred = model(x_t, 1000 * t, labels, dropout_generator=generator).sample
    return ((pred - (noise - images)) ** 2).mean()


@dataclass
class BenchConfig(TrainConfig):
    pass


class BenchFamily(Family):
    name = "bench-flow"
    config_class = BenchConfig

    def build_model(self):
        return FlowTransformer(**MODEL)

    def loss(self, model, batch, generator):
        return {"loss": flow_loss(model, batch["image"], batch["label"], generator)}


def run_trainer(args, ema_decay: float) -> float:
    """Samples/s of the Trainer over the steps after warm-up."""
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        config = BenchConfig(output_dir=out, cpu=args.device == "cpu", max_steps=args.warmup + args.steps,
                             batch_size=args.batch, lr=1e-4, ema_decay=ema_decay, checkpoint_every=0,
                             sample_every=0, log_every=10, tensorboard=True, seed=0)
        callback = lambda trainer, step, metrics: stamps.append(CLOCK())  # noqa: E731
        Trainer(config, BenchFamily(config), RandomImages(), callbacks=[callback]).train()
    return args.steps * args.batch / (stamps[-1] - stamps[args.warmup - 1])


def run_plain(args, ema_decay: float) -> float:
    """Samples/s of a plain loop: DataLoader, forward, backward, clip, AdamW (and the same EMA)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FlowTransformer(**MODEL).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, ema_decay).to(device) if ema_decay > 0 else None
    loader = torch.utils.data.DataLoader(RandomImages(), batch_size=args.batch, shuffle=True, drop_last=True)
    stamps, step = [], 0
    while step < args.warmup + args.steps:
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            generator = torch.Generator(device=device).manual_seed(step)
            loss = flow_loss(model, images, labels, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            loss.item()  # a typical loop reads the loss every step
            step += 1
            stamps.append(CLOCK())
            if step == args.warmup + args.steps:
                break
    return args.steps * args.batch / (stamps[-1] - stamps[args.warmup - 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "trainer_overhead.json"))
    parser.add_argument("--clock", choices=["wall", "process"], default=None,
                        help="wall time, or this process's CPU time (default: process on cpu, wall on cuda)")
    args = parser.parse_args(argv)
    global CLOCK
    args.clock = args.clock or ("process" if args.device == "cpu" else "wall")
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter

    rows = []
    for label, ema_decay in (("trainer (defaults: EMA 0.9999)", 0.9999), ("trainer (no EMA)", 0.0)):
        ours, plain = [], []
        for round_index in range(args.rounds):  # alternate the order so machine load hits both alike
            if round_index % 2 == 0:
                ours.append(run_trainer(args, ema_decay))
                plain.append(run_plain(args, ema_decay))
            else:
                plain.append(run_plain(args, ema_decay))
                ours.append(run_trainer(args, ema_decay))
        ratios = [a / b for a, b in zip(ours, plain)]  # each pair ran back to back
        rows.append({"variant": label, "trainer_samples_per_s": statistics.median(ours),
                     "plain_samples_per_s": statistics.median(plain), "ratio": statistics.median(ratios),
                     "round_ratios": ratios, "trainer_rounds": ours, "plain_rounds": plain})

    params = sum(p.numel() for p in FlowTransformer(**MODEL).parameters())
    print(f"FlowTransformer {MODEL} ({params / 1e6:.2f}M params), batch {args.batch}, device {args.device}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}, clock {args.clock}\n")
    print("| variant | trainer samples/s | plain loop samples/s | ratio (median of paired rounds; goal >= 0.95) | round ratios |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['trainer_samples_per_s']:.1f} | {row['plain_samples_per_s']:.1f} | "
              f"{row['ratio']:.3f} | {', '.join(f'{r:.2f}' for r in row['round_ratios'])} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"clock": args.clock, "model": MODEL, "params": params, "batch": args.batch, "device": args.device,
                   "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
