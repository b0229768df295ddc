"""Quantizer speed, peak memory and quality: genmod's tokenizers_vq vs vector-quantize-pytorch.

Speed/memory: forward+backward of 4096 tokens x 32 dims for VQ and FSQ at ~1k, ~16k and ~100k codes,
each configuration in a fresh subprocess (so one run's allocations cannot hide another's) with
torch.set_num_threads(--threads); time = min over repeats after one warm-up call. Peak memory = ru_maxrss of that subprocess (getrusage, KiB on
Linux) minus its resident set size just before the first forward, i.e. the extra resident memory the
quantizer step needed. Ratios are theirs / ours measured in the same run.

Quality: both VQs (EMA 0.99, k-means init, dead-code restart; and plain EMA 0.99) and both FSQs
(with 32 -> len(levels) -> 32 projections trained by Adam) fitted encoder-free to the same fixed
Gaussian-mixture cloud for the same steps; reconstruction MSE and codebook usage on 65536 held-out
points (4 per code at 16k codes, so a uniform code distribution would leave only e^-4 ~ 2% unhit; with
16384 points usage could never exceed 1 - e^-1 ~ 63% at 16k codes).

Needs the bench extra: pip install -e ".[bench]".  Run: python benchmarks/quantizers_vs_vqtorch.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

TOKENS, DIM = 4096, 32
HELD_OUT = 65536
FSQ_LEVELS = {1024: [8, 5, 5, 5], 16384: [8, 8, 8, 6, 5], 102400: [8, 8, 8, 8, 5, 5]}


def current_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def build(impl: str, kind: str, size: int):
    if impl == "ours":
        from genmod.tokenizers_vq.quantizers import FSQ, VectorQuantizer

        if kind == "fsq":
            return FSQ(FSQ_LEVELS[size], dim=DIM)
        gradient = "rotation" if kind == "vq-rotation" else "ste"
        return VectorQuantizer(DIM, size, codebook_update="ema", ema_decay=0.99, gradient=gradient)
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as err:
        raise SystemExit("benchmark needs vector-quantize-pytorch: pip install -e '.[bench]'") from err
    if kind == "fsq":
        return vqp.FSQ(FSQ_LEVELS[size], dim=DIM)
    return vqp.VectorQuantize(dim=DIM, codebook_size=size, decay=0.99, rotation_trick=(kind == "vq-rotation"))


def step(impl: str, kind: str, module, x: torch.Tensor) -> torch.Tensor:
    """One forward+backward; returns the quantized output."""
    out = module(x)
    if impl == "ours":
        z_q, loss = out.z_q, out.loss
    elif kind == "fsq":
        z_q, loss = out[0], torch.zeros(())
    else:
        z_q, loss = out[0], out[2].sum()
    (z_q.square().mean() + loss).backward()
    return z_q


def worker(impl: str, kind: str, size: int, repeats: int, threads: int, device: str) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    module = build(impl, kind, size).train().to(device)
    x = torch.randn(1, TOKENS, DIM, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    rss_before = current_rss_kib()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    times = []
    for i in range(repeats + 1):  # first call is warm-up (allocator, lazy init)
        x.grad = None
        start = time.perf_counter()
        step(impl, kind, module, x)
        if cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
    if cuda:  # CUDA caching-allocator peak above what was allocated before the first step
        extra = (torch.cuda.max_memory_allocated() - allocated_before) / 2 ** 20
    else:
        extra = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before, 0) / 1024
    # min over repeats: on a shared machine the minimum is the least disturbed estimate
    print(json.dumps({"seconds": min(times), "median_seconds": statistics.median(times), "peak_extra_mib": extra}))


def run_speed(sizes, threads: int, kinds, device: str) -> list[dict]:
    rows = []
    for kind in kinds:
        for size in sizes:
            result = {}
            for impl in ("ours", "theirs"):
                slow = impl == "theirs" and kind != "fsq" and size > 20000
                repeats = 2 if slow and device == "cpu" else 5
                cmd = [sys.executable, __file__, "--worker", impl, kind, str(size), str(repeats),
                       "--threads", str(threads), "--device", device]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"worker {impl} {kind} {size} failed:\n{proc.stderr[-2000:]}")
                result[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"kind": kind, "size": size, **result})
            ours, theirs = result["ours"], result["theirs"]
            print(f"{kind:12s} {size:>7d} | ours {ours['seconds']*1e3:9.1f} ms {ours['peak_extra_mib']:8.1f} MiB | "
                  f"theirs {theirs['seconds']*1e3:9.1f} ms {theirs['peak_extra_mib']:8.1f} MiB | "
                  f"speed-up x{theirs['seconds']/ours['seconds']:6.1f}  memory ratio x{theirs['peak_extra_mib']/max(ours['peak_extra_mib'], 0.1):6.1f}",
                  flush=True)
    return rows


# ----------------------------------------------------------------------------------------- quality
def mixture_cloud(n: int, seed: int, centres: int = 4096) -> torch.Tensor:
    """Fixed 32-d Gaussian mixture: centre set from seed 0, points from ``seed``."""
    g0 = torch.Generator().manual_seed(0)
    means = torch.randn(centres, DIM, generator=g0)
    scales = 0.05 + 0.25 * torch.rand(centres, 1, generator=g0)
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, centres, (n,), generator=g)
    return means[which] + scales[which] * torch.randn(n, DIM, generator=g)


def train_quality(impl: str, kind: str, size: int, steps: int, tricks: bool) -> dict:
    torch.manual_seed(0)
    train, held_out = mixture_cloud(65536, 1), mixture_cloud(HELD_OUT, 2)
    # dead below 1/16 of the uniform share of hits (tokens per step / codebook size)
    threshold = TOKENS / size / 16 if tricks else 0.0
    if kind == "vq":
        if impl == "ours":
            from genmod.tokenizers_vq.quantizers import VectorQuantizer

            module = VectorQuantizer(DIM, size, codebook_update="ema", ema_decay=0.99, kmeans_init=tricks,
                                     dead_code_threshold=threshold)
        else:
            import vector_quantize_pytorch as vqp

            module = vqp.VectorQuantize(dim=DIM, codebook_size=size, decay=0.99, rotation_trick=False,
                                        kmeans_init=tricks, threshold_ema_dead_code=threshold)
    else:
        module = build(impl, "fsq", size)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3) if params else None
    g = torch.Generator().manual_seed(3)
    module.train()
    start = time.perf_counter()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (TOKENS,), generator=g)].unsqueeze(0)
        out = module(batch)
        z_q = out.z_q if impl == "ours" else out[0]
        if opt is not None:
            opt.zero_grad()
            ((z_q - batch).square().mean()).backward()
            opt.step()
    elapsed = time.perf_counter() - start
    module.eval()
    z_q, indices = [], []
    with torch.no_grad():  # chunked: a 65536 x 16384 distance matrix would need 4 GiB
        for chunk in held_out.split(TOKENS):
            out = module(chunk.unsqueeze(0))
            z_q.append(out.z_q if impl == "ours" else out[0])
            indices.append(out.indices if impl == "ours" else out[1])
    z_q, indices = torch.cat(z_q, dim=1), torch.cat(indices, dim=1)
    counts = torch.bincount(indices.reshape(-1).long(), minlength=size if kind == "vq" else 1).float()
    probs = counts / counts.sum()
    return {
        "mse": float((z_q - held_out.unsqueeze(0)).square().mean()),
        "usage": float((counts > 0).sum()) / (size if kind == "vq" else module_codebook_size(module, size)),
        "perplexity": float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum())),
        "train_seconds": elapsed,
    }


def module_codebook_size(module, size: int) -> int:
    levels = FSQ_LEVELS[size]
    out = 1
    for v in levels:
        out *= v
    return out


def quality_configs(sizes) -> list[tuple[str, int, bool]]:
    """VQ with k-means init + dead-code restart at every size; plain EMA VQ at the smallest; FSQ where
    FSQ_LEVELS has a level set for the size."""
    configs = [("vq", size, True) for size in sizes]
    configs.append(("vq", min(sizes), False))
    configs += [("fsq", size, False) for size in sizes if size in FSQ_LEVELS]
    return configs


def markdown_table(rows: list[dict]) -> str:
    lines = ["| config | ours MSE | theirs MSE | ours usage | theirs usage | ours ppl | theirs ppl |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        o, t = row["ours"], row["theirs"]
        lines.append(f"| {row['config']} | {o['mse']:.4f} | {t['mse']:.4f} | {o['usage']*100:.1f}% | "
                     f"{t['usage']*100:.1f}% | {o['perplexity']:.0f} | {t['perplexity']:.0f} |")
    return "\n".join(lines)


def run_quality(steps: int, threads: int, sizes=(1024, 4096, 16384)) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for kind, size, tricks in quality_configs(sizes):
        label = f"{kind} {size}" + (" kmeans+restart" if tricks else (" plain EMA" if kind == "vq" else ""))
        result = {impl: train_quality(impl, kind, size, steps, tricks) for impl in ("ours", "theirs")}
        rows.append({"config": label, **result})
        o, t = result["ours"], result["theirs"]
        print(f"{label:28s} | ours mse {o['mse']:.4f} usage {o['usage']*100:5.1f}% ppl {o['perplexity']:8.1f} "
              f"({o['train_seconds']:.1f}s) | theirs mse {t['mse']:.4f} usage {t['usage']*100:5.1f}% "
              f"ppl {t['perplexity']:8.1f} ({t['train_seconds']:.1f}s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "KIND", "SIZE", "REPEATS"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (peak = getrusage ru_maxrss) or cuda (peak = max_memory_allocated)")
    parser.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="codebook sizes (default: 1024 16384 102400 for speed, 1024 4096 16384 for quality)")
    parser.add_argument("--kinds", nargs="+", default=["vq", "vq-rotation", "fsq"])
    parser.add_argument("--steps", type=int, default=200, help="training steps of the quality comparison")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.worker:
        impl, kind, size, repeats = args.worker
        worker(impl, kind, int(size), int(repeats), args.threads, args.device)
        return
    results = {}
    if args.part in ("speed", "all"):
        print(f"forward+backward on {args.device}, {TOKENS} tokens x {DIM} dims, {args.threads} threads "
              f"(min over repeats; fresh process per row; theirs/ours ratios)")
        results["speed"] = run_speed(args.sizes or [1024, 16384, 102400], args.threads, args.kinds, args.device)
    if args.part in ("quality", "all"):
        print(f"\nquality: encoder-free fit of a fixed 32-d Gaussian mixture, {args.steps} steps of {TOKENS} points, "
              f"{HELD_OUT} held-out points")
        results["quality"] = run_quality(args.steps, args.threads, args.sizes or [1024, 4096, 16384])
        results["quality_settings"] = {"steps": args.steps, "tokens_per_step": TOKENS, "held_out": HELD_OUT,
                                       "threads": args.threads, "dead_code_threshold": "tokens / size / 16"}
        print("\n" + markdown_table(results["quality"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
