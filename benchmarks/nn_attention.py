"""Shared network parts on a device: backend agreement, FlowTransformer vs diffusers' DiT, KV-cache speed-up.

    python benchmarks/nn_attention.py                 # CPU, small sizes
    python benchmarks/nn_attention.py --device cuda   # GPU, DiT-S/2-sized

Prints three tables: (1) max |sdpa - math| per mask and dtype; (2) training-step throughput of
``FlowTransformer`` against ``diffusers.DiTTransformer2DModel`` of the same size, same batch, same run
(ratio > 1 = ours faster); (3) token-by-token generation with a stack of ``CausalBlock`` with and
without ``KVCache`` (ratio = speed-up of the cache), checking both give the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from genmod.flow.transformer import FlowTransformer
from genmod.nn import CausalBlock, attention, block_ids_from_sizes, block_mask, make_kv_caches, rope_frequencies


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def backend_agreement(device):
    print("\n(1) max |sdpa - math|  [B=2, H=8, L=680 VAR tokens, D=64]")
    print(f"{'mask':<14}{'float32':>12}{'bfloat16':>12}")
    sizes = [p * p for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    ids = block_ids_from_sizes(sizes, device=device)
    for name in ("full", "causal", "block_causal"):
        row = []
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(2, 8, len(ids), 64, generator=gen, device=device).to(dtype) for _ in range(3))
            mask = block_mask(torch.arange(len(ids), device=device) if name == "causal" else ids, rule=name)
            diff = (attention(q, k, v, mask, backend="sdpa").float() - attention(q, k, v, mask, backend="math").float()).abs().max()
            row.append(diff.item())
        print(f"{name:<14}{row[0]:>12.2e}{row[1]:>12.2e}")


def _time_steps(model, call, steps, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            _sync(device)
            start = time.perf_counter()
        loss = call().float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - start


def transformer_throughput(device, args):
    hidden, depth, heads = args.hidden, args.depth, args.heads
    print(f"\n(2) training throughput, {args.channels}x{args.size}x{args.size} input, patch 2, width {hidden}, depth {depth}, "
          f"batch {args.batch}, autocast {'bf16' if device.type == 'cuda' else 'off'}")
    ours = FlowTransformer(in_channels=args.channels, sample_size=args.size, patch_size=2, hidden_size=hidden, depth=depth,
                           num_heads=heads, num_classes=10, class_dropout_prob=0.0).to(device)
    from diffusers import DiTTransformer2DModel

    peer = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=args.channels,
                                 out_channels=args.channels, num_layers=depth, sample_size=args.size, patch_size=2,
                                 num_embeds_ada_norm=10).to(device)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    t = torch.rand(args.batch, device=device) * 1000
    y = torch.randint(0, 10, (args.batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    for name, model, call in (
        ("genmod FlowTransformer", ours, lambda: ours(x, t, y).sample),
        ("diffusers DiT", peer, lambda: peer(x, t, y).sample),
    ):
        with autocast:
            seconds = _time_steps(model, call, args.steps, device)
        rows.append((name, sum(p.numel() for p in model.parameters()), args.steps * args.batch / seconds))
    print(f"{'model':<26}{'params':>12}{'samples/s':>12}")
    for name, params, rate in rows:
        print(f"{name:<26}{params:>12,}{rate:>12.1f}")
    print(f"ratio ours / diffusers: {rows[0][2] / rows[1][2]:.3f}")


@torch.no_grad()
def kv_cache_speedup(device, args):
    dim, heads, depth, length = args.hidden, args.heads, args.depth, args.tokens
    print(f"\n(3) generating {length} tokens one by one, {depth} CausalBlocks of width {dim}, batch {args.batch}")
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(CausalBlock(dim, heads) for _ in range(depth)).to(device).eval()
    readout = torch.nn.Linear(dim, dim).to(device)
    cos, sin = rope_frequencies(torch.arange(length, device=device), dim // heads)
    start_token = torch.randn(args.batch, 1, dim, device=device)

    def generate(use_cache: bool):
        tokens, caches = start_token, make_kv_caches(depth)
        for step in tqdm(range(length - 1), desc="cache" if use_cache else "no cache", leave=False):
            if use_cache:
                h, rope = tokens[:, -1:], (cos[step : step + 1], sin[step : step + 1])
                for blk, cache in zip(blocks, caches):
                    h = blk(h, rope=rope, kv_cache=cache)
            else:
                h, rope = tokens, (cos[: step + 1], sin[: step + 1])
                for blk in blocks:
                    h = blk(h, rope=rope)
            tokens = torch.cat([tokens, torch.tanh(readout(h[:, -1:]))], dim=1)
        return tokens

    rows = {}
    for use_cache in (True, False):
        generate(use_cache)  # warm-up
        _sync(device)
        begin = time.perf_counter()
        out = generate(use_cache)
        _sync(device)
        rows[use_cache] = (time.perf_counter() - begin, out)
    err = (rows[True][1] - rows[False][1]).abs().max().item()
    print(f"{'mode':<12}{'tokens/s':>12}")
    for use_cache in (True, False):
        print(f"{'cache' if use_cache else 'no cache':<12}{args.batch * (length - 1) / rows[use_cache][0]:>12.1f}")
    print(f"speed-up of the cache: {rows[False][0] / rows[True][0]:.2f}x; max |cached - uncached| = {err:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda requested but torch sees no GPU")
    big = device.type == "cuda"
    args.channels, args.size = 4, 32
    args.hidden, args.depth, args.heads = (384, 12, 6) if big else (64, 2, 4)
    args.batch = 64 if big else 8
    args.steps = args.steps or (30 if big else 5)
    args.tokens = 512 if big else 64
    print(f"device: {torch.cuda.get_device_name() if big else 'cpu'}, torch {torch.__version__}")
    backend_agreement(device)
    transformer_throughput(device, args)
    kv_cache_speedup(device, args)


if __name__ == "__main__":
    main()
