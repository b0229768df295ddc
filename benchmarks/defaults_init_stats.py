"""Issue 19: per-layer init statistics of genmod's DiT-style transformers against DiT's formula.

For the flow DiT, Diffusion Forcing's transformer and CausalFusion at their default widths: the std of the
q, k, v, out, fc1 and fc2 weights (mean over blocks) after genmod's init, next to the reference value
``sqrt(6 / (fan_in + fan_out)) / sqrt(3)`` of DiT's ``initialize_weights`` (q/k/v: the fused ``[3D, D]``
qkv Linear) and next to the previous init (q, k, v each xavier-initialised as a ``[D, D]`` Linear,
reproduced here by re-initialising them so). Also the largest |weight| of the zero-initialised
adaLN-Zero modulation and output layers. Writes JSON and a markdown table.

    python benchmarks/defaults_init_stats.py --out benchmarks/results/defaults/init_stats
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from torch import nn


def _models() -> dict:
    from genmod.causalfusion.family import CausalFusionConfig
    from genmod.causalfusion.transformer import CausalFusionTransformer
    from genmod.diffusion_forcing.family import DiffusionForcingConfig
    from genmod.diffusion_forcing.transformer import DiffusionForcingTransformer
    from genmod.flow.family import FlowConfig
    from genmod.flow.transformer import FlowTransformer

    flow, df, cf = FlowConfig(), DiffusionForcingConfig(), CausalFusionConfig()
    return {
        "flow (FlowTransformer)": FlowTransformer(in_channels=3, sample_size=32, patch_size=flow.patch_size,
                                                  hidden_size=flow.hidden_size, depth=flow.depth,
                                                  num_heads=flow.num_heads, num_classes=8),
        "diffusion-forcing": DiffusionForcingTransformer(sample_size=df.image_size, patch_size=df.patch_size,
                                                         hidden_size=df.hidden_size, depth=df.depth,
                                                         num_heads=df.num_heads),
        "causalfusion": CausalFusionTransformer(sample_size=32, patch_size=cf.patch_size, hidden_size=cf.hidden_size,
                                                depth=cf.depth, num_heads=cf.num_heads, num_classes=8),
    }


def _reference_std(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out)) / math.sqrt(3.0)


def _layer_stats(model: nn.Module) -> dict:
    """Mean std per projection kind over the blocks, and the zero-initialised layers' largest |w|."""
    width = model.config.hidden_size
    blocks = list(model.blocks)
    kinds = {"q": lambda b: b.attn.to_q, "k": lambda b: b.attn.to_k, "v": lambda b: b.attn.to_v,
             "out": lambda b: b.attn.to_out, "fc1": lambda b: b.mlp.fc1, "fc2": lambda b: b.mlp.fc2}
    reference = {"q": _reference_std(width, 3 * width), "k": _reference_std(width, 3 * width),
                 "v": _reference_std(width, 3 * width), "out": _reference_std(width, width)}
    stats = {}
    for kind, get in kinds.items():
        weights = [get(b).weight for b in blocks if hasattr(get(b), "weight")]
        fan_out, fan_in = weights[0].shape
        stats[kind] = {"std": sum(w.std().item() for w in weights) / len(weights),
                       "reference": reference.get(kind, _reference_std(fan_in, fan_out))}
    zero = [b.adaLN_modulation[1].weight for b in blocks if hasattr(b, "adaLN_modulation")]
    final = getattr(model, "final_layer", None)
    zero += [final.linear.weight, final.adaLN_modulation[1].weight] if final is not None else [model.proj_out.weight]
    stats["zero_layers_max_abs"] = max(w.abs().max().item() for w in zero)
    return stats


def _old_qkv_init_(model: nn.Module) -> None:
    """The previous init of q, k, v: one ``[D, D]`` xavier-uniform Linear each."""
    for block in model.blocks:
        for linear in (block.attn.to_q, block.attn.to_k, block.attn.to_v):
            nn.init.xavier_uniform_(linear.weight)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output stem (.json and .md are added)")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, model in _models().items():
        after = _layer_stats(model)
        _old_qkv_init_(model)
        before = _layer_stats(model)
        results[name] = {"width": model.config.hidden_size, "after": after, "before": before}
    lines = ["| model (width) | layer | reference std (DiT) | genmod before | genmod after |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for kind in ("q", "k", "v", "out", "fc1", "fc2"):
            lines.append(f"| {name} ({r['width']}) | {kind} | {r['after'][kind]['reference']:.4f} | "
                         f"{r['before'][kind]['std']:.4f} | {r['after'][kind]['std']:.4f} |")
        lines.append(f"| {name} ({r['width']}) | adaLN-Zero + output, max abs | 0 | "
                     f"{r['before']['zero_layers_max_abs']:.1g} | {r['after']['zero_layers_max_abs']:.1g} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
