"""Tokenizer reconstruction quality and codebook usage on real images: our quantizers vs
vector-quantize-pytorch's, inside the SAME small convolutional tokenizer (issue 3).

Every run builds ``genmod.tokenizers_vq.models.VQTokenizer`` (conv encoder -> quantizer -> conv decoder,
``base_channels`` 16, ``ch_mult`` 1,2,2: Fashion-MNIST 32x32 -> 8x8 latent = 64 tokens per image)
from the same seed, so encoder and decoder start from identical weights; only the quantizer differs.
"theirs" replaces ``model.quantize_layer`` by a thin adapter around ``vector_quantize_pytorch``
(``VectorQuantize`` / ``FSQ``) that lives in this file only: their library is a peer we measure
against, never a dependency. All runs see the same batches in the same order (one permutation of
the training set from ``--seed``), the same Adam optimiser and step count, and an MSE loss plus the
quantizer's commitment term. Defaults: 600 steps of batch 32 (2048 tokens per step), Adam lr 1e-3.

Equivalent VQ options: EMA codebook with decay 0.99, k-means init (10 Lloyd iterations on the
first batch), dead-code restart below ``dead_code_threshold`` EMA hits per batch, commitment
weight 0.25, straight-through gradient (their ``rotation_trick=False``). Their restarts draw
batch vectors uniformly, ours by D^2 sampling, and a restarted code starts from the EMA count
tokens / K in ours (``restart_count``; ``--restart_count threshold`` gives their / the old reset)
instead of the threshold (genmod.tokenizers_vq.quantizers.vector_quantizer).

Held-out metrics on the whole Fashion-MNIST test split (10000 images = 640000 tokens: 156 per
code at 4096, 39 at 16384, so 100% usage is reachable): PSNR, SSIM, LPIPS-alex (genmod.evals.lpips, at
32x32, grey repeated to RGB), codebook usage (codes hit at least once over the set), perplexity
(exp entropy of the whole-set histogram), training seconds (1 thread, shared CPU: indicative).

    OMP_NUM_THREADS=1 python benchmarks/tokenizer_quality_vs_vqtorch.py run ours-vq-4096
    OMP_NUM_THREADS=1 python benchmarks/tokenizer_quality_vs_vqtorch.py report

``run`` trains and evaluates one configuration (``runs/tokenizer_quality/<name>/result.json``);
``report`` gathers them into a markdown table with theirs/ours ratios, ``metrics.json`` and a PNG
grid (originals, then one row per configuration) under ``benchmarks/results/tokenizer_quality/``.
Needs the bench extra: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from genmod.tokenizers_vq.models import VQTokenizer  # noqa: E402
from genmod.tokenizers_vq.quantizers.base import QuantizerOutput  # noqa: E402

RUN_ROOT = "runs/tokenizer_quality"
RESULT_DIR = "benchmarks/results/tokenizer_quality"
NUM_SHOW = 12
FSQ_LEVELS = {4096: (7, 5, 5, 5, 5), 16384: (8, 8, 8, 6, 5)}  # FSQ paper Table 1 (4375 and 15360 codes)

# name -> (implementation, quantizer kind, codebook size, extra VQTokenizer options)
CONFIGS = {
    "ours-vq-4096": ("ours", "vq", 4096, {}),
    "theirs-vq-4096": ("theirs", "vq", 4096, {}),
    "ours-fsq-4096": ("ours", "fsq", 4096, {}),
    "theirs-fsq-4096": ("theirs", "fsq", 4096, {}),
    "ours-vq-16384": ("ours", "vq", 16384, {}),
    "theirs-vq-16384": ("theirs", "vq", 16384, {}),
    "ours-fsq-16384": ("ours", "fsq", 16384, {}),
    "theirs-fsq-16384": ("theirs", "fsq", 16384, {}),
    # our other routes to a fully used 16k codebook (part 2 of the issue)
    "ours-simvq-16384": ("ours", "simvq", 16384, {"codebook_update": "loss", "kmeans_init": False,
                                                  "dead_code_threshold": 0.0}),
    "ours-vq-cos-16384": ("ours", "vq", 16384, {"cosine": True}),
}


# ----------------------------------------------------------------------------- their quantizers
class TheirVectorQuantize(nn.Module):
    """vector_quantize_pytorch.VectorQuantize behind our quantizer interface (channel-last tokens in,
    ``QuantizerOutput`` out)."""

    def __init__(self, dim: int, codebook_size: int, decay: float, dead_code_threshold: float, beta: float,
                 kmeans_init: bool = True, cosine: bool = False):
        super().__init__()
        import vector_quantize_pytorch as vqp

        self.codebook_size = codebook_size
        self.vq = vqp.VectorQuantize(dim=dim, codebook_size=codebook_size, decay=decay, kmeans_init=kmeans_init,
                                     kmeans_iters=10, threshold_ema_dead_code=dead_code_threshold,
                                     commitment_weight=beta, rotation_trick=False, use_cosine_sim=cosine)

    def forward(self, z: torch.Tensor, generator=None) -> QuantizerOutput:
        q, indices, loss = self.vq(z.reshape(z.shape[0], -1, z.shape[-1]))
        return QuantizerOutput(q.reshape(z.shape), indices.reshape(z.shape[:-1]).long(), loss.sum(), {})

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.vq.get_output_from_indices(indices)


class TheirFSQ(nn.Module):
    """vector_quantize_pytorch.FSQ (no projections: the encoder emits len(levels) channels)."""

    def __init__(self, levels):
        super().__init__()
        import vector_quantize_pytorch as vqp

        self.codebook_size = math.prod(levels)
        self.fsq = vqp.FSQ(list(levels))

    def forward(self, z: torch.Tensor, generator=None) -> QuantizerOutput:
        q, indices = self.fsq(z.reshape(z.shape[0], -1, z.shape[-1]))
        return QuantizerOutput(q.reshape(z.shape), indices.reshape(z.shape[:-1]).long(), q.new_zeros(()), {})

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.fsq.indices_to_codes(indices)


# ----------------------------------------------------------------------------- data
def load_images(dataset: str, split: str) -> torch.Tensor:
    """The whole split as one float tensor in [-1, 1] (cached under runs/ after the first read)."""
    path = os.path.join(RUN_ROOT, f"_{dataset}_{split}.safetensors")
    if os.path.isfile(path):
        return load_file(path)["images"]
    from genmod.data import get_dataset

    data = get_dataset(dataset, split=split)
    images = torch.stack([data[i]["image"] for i in range(len(data))]).float()
    os.makedirs(RUN_ROOT, exist_ok=True)
    save_file({"images": images.contiguous()}, path)
    return images


# ----------------------------------------------------------------------------- model
def build(impl: str, kind: str, size: int, args, extra: dict) -> VQTokenizer:
    options = dict(modality="image", in_channels=1, base_channels=args.base_channels, ch_mult=(1, 2, 2),
                   num_res_blocks=1, quantizer=kind, latent_channels=args.latent_channels, codebook_size=size,
                   fsq_levels=FSQ_LEVELS[size], codebook_dim=args.codebook_dim, codebook_update="ema",
                   ema_decay=0.99, kmeans_init=True, dead_code_threshold=args.dead_code_threshold,
                   gradient="ste", commitment_beta=0.25)
    options.update(extra)
    torch.manual_seed(args.seed)  # identical encoder / decoder weights for every configuration
    model = VQTokenizer(**options)
    if impl == "ours" and args.restart_count is not None and hasattr(model.quantize_layer, "restart_count"):
        # "threshold": the reset of EnCodec / vector-quantize-pytorch (before the grace-period fix)
        model.quantize_layer.restart_count = (options["dead_code_threshold"] if args.restart_count == "threshold"
                                              else float(args.restart_count))
    if impl == "theirs":
        if kind == "fsq":
            model.quantize_layer = TheirFSQ(FSQ_LEVELS[size])
        else:
            model.quantize_layer = TheirVectorQuantize(args.latent_channels, size, 0.99, options["dead_code_threshold"],
                                                       0.25, kmeans_init=options["kmeans_init"],
                                                       cosine=options.get("cosine", False))
    return model


@torch.no_grad()
def evaluate(model: VQTokenizer, images: torch.Tensor, codebook_size: int, batch_size: int = 250) -> dict:
    from genmod.evals.lpips import load_lpips
    from genmod.evals.recon import psnr, ssim

    model.eval()
    try:
        lpips = load_lpips("alex")
    except FileNotFoundError:
        lpips = None
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips_alex": 0.0}
    counts = torch.zeros(codebook_size, dtype=torch.float64)
    recon_show = None
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        out = model(x)
        x_hat = out.sample.clamp(-1, 1)
        sums["psnr"] += float(psnr(x, x_hat).sum())
        sums["ssim"] += float(ssim(x, x_hat).sum())
        if lpips is not None:
            sums["lpips_alex"] += float(lpips(x.repeat(1, 3, 1, 1), x_hat.repeat(1, 3, 1, 1)).sum())
        counts += torch.bincount(out.indices.reshape(-1), minlength=codebook_size).double()
        if recon_show is None:
            recon_show = x_hat[:NUM_SHOW].clone()
    metrics = {k: v / len(images) for k, v in sums.items()}
    if lpips is None:
        metrics.pop("lpips_alex")
    p = counts / counts.sum()
    metrics.update(codebook_size=codebook_size, eval_images=len(images), eval_tokens=int(counts.sum()),
                   tokens_per_code=float(counts.sum()) / codebook_size,
                   usage=float((counts > 0).double().mean()), codes_used=int((counts > 0).sum()),
                   perplexity=float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    return metrics, recon_show


def train_one(name: str, args) -> dict:
    impl, kind, size, extra = CONFIGS[name]
    extra = dict(extra)
    for key in ("cosine", "codebook_dim"):
        if getattr(args, key, None) not in (None, False):
            extra[key] = getattr(args, key)
    if args.dead_code_threshold is None:  # default: 1/8 of the uniform share of hits per batch
        args.dead_code_threshold = args.batch_size * 64 / size / 8
    train, test = load_images(args.dataset, "train"), load_images(args.dataset, "test")
    test = test[: args.eval_images]
    model = build(impl, kind, size, args, extra)
    codebook_size = model.quantize_layer.codebook_size
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    order = torch.Generator().manual_seed(args.seed)
    quant_gen = torch.Generator().manual_seed(args.seed + 1)
    perm, cursor = torch.randperm(len(train), generator=order), 0
    model.train()
    log, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(perm):
            perm, cursor = torch.randperm(len(train), generator=order), 0
        x = train[perm[cursor:cursor + args.batch_size]]
        cursor += args.batch_size
        out = model(x, generator=quant_gen)
        rec = F.mse_loss(out.sample, x)
        loss = rec + out.reg_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            used = int(torch.unique(out.indices).numel())
            entry = {"step": step, "rec_mse": float(rec.detach()), "batch_codes_used": used,
                     "restarted_codes": out.stats.get("restarted_codes"), "seconds": time.perf_counter() - start}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_seconds = time.perf_counter() - start
    metrics, recon = evaluate(model, test, codebook_size)
    result = {"name": name, "impl": impl, "quantizer": kind, "train_seconds": train_seconds, **metrics,
              "settings": {"dataset": args.dataset, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                           "seed": args.seed, "base_channels": args.base_channels,
                           "latent_channels": args.latent_channels,
                           "dead_code_threshold": None if kind == "fsq" or extra.get("simvq") else
                           extra.get("dead_code_threshold", args.dead_code_threshold),
                           "restart_count": (args.restart_count or "tokens/K") if impl == "ours" and kind == "vq"
                           else None,
                           "threads": torch.get_num_threads(), **{k: v for k, v in extra.items()}},
              "log": log}
    out_dir = os.path.join(RUN_ROOT, args.tag or name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "result.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    save_file({"recon": recon.contiguous()}, os.path.join(out_dir, "recon_show.safetensors"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))
    return result


# ----------------------------------------------------------------------------- report
PAIRS = [("vq-4096", "VQ 4096 (EMA, k-means, restart)"), ("fsq-4096", "FSQ 7,5,5,5,5 (4375)"),
         ("vq-16384", "VQ 16384 (EMA, k-means, restart)"), ("fsq-16384", "FSQ 8,8,8,6,5 (15360)")]


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def report(args) -> None:
    from genmod.data.io import save_image_grid

    results = {}
    for name in sorted(os.listdir(RUN_ROOT)):
        path = os.path.join(RUN_ROOT, name, "result.json")
        if os.path.isfile(path):
            with open(path) as fh:
                results[name] = json.load(fh)
    lines = ["| quantizer | impl | PSNR dB | SSIM | LPIPS-alex | usage | codes used | perplexity | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['impl']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {fmt(r.get('lpips_alex'), '.4f')} | "
                     f"{100 * r['usage']:.2f}% | {r['codes_used']}/{r['codebook_size']} | {r['perplexity']:.0f} | "
                     f"{r['train_seconds']:.0f} |")
    ratio_lines = ["| config | PSNR theirs - ours dB | LPIPS theirs/ours | usage theirs/ours | perplexity theirs/ours | "
                   "train s theirs/ours |", "|---|---|---|---|---|---|"]
    for key, label in PAIRS:
        ours, theirs = results.get(f"ours-{key}"), results.get(f"theirs-{key}")
        if ours is None or theirs is None:
            continue
        lp = (theirs["lpips_alex"] / ours["lpips_alex"]) if "lpips_alex" in ours else None
        ratio_lines.append(f"| {label} | {theirs['psnr'] - ours['psnr']:+.2f} | {fmt(lp, '.2f')} | "
                           f"{theirs['usage'] / ours['usage']:.3f} | {theirs['perplexity'] / ours['perplexity']:.2f} | "
                           f"{theirs['train_seconds'] / ours['train_seconds']:.2f} |")
    table = "\n".join(lines) + "\n\n" + "\n".join(ratio_lines)
    print(table)
    os.makedirs(RESULT_DIR, exist_ok=True)
    with open(os.path.join(RESULT_DIR, "metrics.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    with open(os.path.join(RESULT_DIR, "table.md"), "w") as fh:
        fh.write(table + "\n")
    # originals in the first row, then one row per configuration (alphabetical, as in the table)
    test = load_images(args.dataset, "test")[:NUM_SHOW]
    rows, names = [test], []
    for name in results:
        path = os.path.join(RUN_ROOT, name, "recon_show.safetensors")
        if os.path.isfile(path):
            rows.append(load_file(path)["recon"])
            names.append(name)
    save_image_grid(torch.cat(rows), os.path.join(RESULT_DIR, "reconstructions.png"), nrow=NUM_SHOW)
    with open(os.path.join(RESULT_DIR, "reconstructions_rows.txt"), "w") as fh:
        fh.write("\n".join(["originals"] + names) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate one configuration")
    run.add_argument("name", choices=sorted(CONFIGS))
    run.add_argument("--tag", default=None, help="output folder name under runs/tokenizer_quality (default: NAME)")
    run.add_argument("--dataset", default="fashion_mnist")
    run.add_argument("--steps", type=int, default=600)
    run.add_argument("--batch_size", type=int, default=32)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--base_channels", type=int, default=16)
    run.add_argument("--latent_channels", type=int, default=8)
    run.add_argument("--codebook_dim", type=int, default=None)
    run.add_argument("--cosine", action="store_true")
    run.add_argument("--dead_code_threshold", type=float, default=None,
                     help="EMA hits per batch below which a code restarts (default: tokens per batch / K / 8)")
    run.add_argument("--restart_count", default=None,
                     help="ours: EMA count of a restarted code; 'threshold' = the old / their reset "
                          "(default: the quantizer's, tokens per step / K)")
    run.add_argument("--eval_images", type=int, default=10000)
    run.add_argument("--log_every", type=int, default=100)
    run.add_argument("--threads", type=int, default=1)
    rep = sub.add_parser("report", help="gather runs/tokenizer_quality/*/result.json into tables and a PNG")
    rep.add_argument("--dataset", default="fashion_mnist")
    args = parser.parse_args()
    if args.command == "run":
        torch.set_num_threads(args.threads)
        train_one(args.name, args)
    else:
        report(args)


if __name__ == "__main__":
    main()
