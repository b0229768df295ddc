"""DiT's exact initialisation (issue 19) in every transformer that follows it: flow's FlowTransformer,
Diffusion Forcing's transformer, CausalFusion. Per-layer statistics against the formulas of the reference
``initialize_weights`` (facebookresearch/DiT models.py; timm's fused ``qkv = Linear(D, 3D)``):

* q, k, v: xavier-uniform of the fused ``[3D, D]`` matrix: U(-a, a), a = sqrt(6 / (D + 3D)), std a / sqrt(3);
* every other linear ``[out, in]``: a = sqrt(6 / (in + out)); biases zero;
* adaLN-Zero modulation and the output layer: zero (so each block starts as the identity).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genmod.causalfusion.transformer import CausalFusionTransformer
from genmod.diffusion_forcing.transformer import DiffusionForcingTransformer
from genmod.flow.transformer import FlowTransformer
from genmod.nn.attention import Attention
from genmod.nn.layers import fused_xavier_

WIDTH = 128


def _models():
    return {
        "flow": FlowTransformer(in_channels=3, sample_size=16, patch_size=2, hidden_size=WIDTH, depth=2, num_heads=4,
                                num_classes=8),
        "diffusion_forcing": DiffusionForcingTransformer(sample_size=16, patch_size=4, hidden_size=WIDTH, depth=2,
                                                         num_heads=4),
        "causalfusion": CausalFusionTransformer(sample_size=16, patch_size=4, hidden_size=WIDTH, depth=2, num_heads=4,
                                                num_classes=8),
    }


def _uniform_std(fan_in: int, fan_out: int) -> tuple[float, float]:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return bound, bound / math.sqrt(3.0)


def _check_uniform(weight: torch.Tensor, bound: float, std: float, where: str) -> None:
    assert weight.abs().max().item() <= bound + 1e-7, where
    assert weight.std().item() == pytest.approx(std, rel=0.03), where  # 3%: > 8 standard errors at 16k entries
    assert abs(weight.mean().item()) < 4 * std / math.sqrt(weight.numel()), where


@pytest.mark.parametrize("name", ["flow", "diffusion_forcing", "causalfusion"])
def test_qkv_follow_the_fused_xavier_bound(name):
    torch.manual_seed(0)
    model = _models()[name]
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attentions) == 2
    bound, std = _uniform_std(WIDTH, 3 * WIDTH)  # 0.1083, 0.0625 at width 128 (three linears: 0.0884)
    for i, attention in enumerate(attentions):
        for part in ("to_q", "to_k", "to_v"):
            _check_uniform(getattr(attention, part).weight, bound, std, f"{name} block {i} {part}")
        qkv = torch.cat([attention.to_q.weight, attention.to_k.weight, attention.to_v.weight])
        _check_uniform(qkv, bound, std, f"{name} block {i} fused qkv")
        out_bound, out_std = _uniform_std(WIDTH, WIDTH)
        _check_uniform(attention.to_out.weight, out_bound, out_std, f"{name} block {i} to_out")


@pytest.mark.parametrize("name", ["flow", "diffusion_forcing"])
def test_adaln_zero_and_final_layer_are_zero_and_mlp_is_xavier(name):
    torch.manual_seed(1)
    model = _models()[name]
    for i, block in enumerate(model.blocks):
        modulation = block.adaLN_modulation[1]
        assert not modulation.weight.any() and not modulation.bias.any(), f"{name} block {i} adaLN"
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        _check_uniform(fc1.weight, *_uniform_std(WIDTH, 4 * WIDTH), f"{name} block {i} fc1")
        _check_uniform(fc2.weight, *_uniform_std(4 * WIDTH, WIDTH), f"{name} block {i} fc2")
        assert not fc1.bias.any() and not fc2.bias.any()
    final = model.final_layer
    for layer in (final.adaLN_modulation[1], final.linear):
        assert not layer.weight.any() and not layer.bias.any(), f"{name} final layer"


def test_causalfusion_output_projection_is_zero():
    torch.manual_seed(2)
    model = _models()["causalfusion"]
    assert not model.proj_out.weight.any() and not model.proj_out.bias.any()


def test_fused_xavier_is_one_draw_of_the_stacked_matrix():
    """The split weights are exactly ``nn.init.xavier_uniform_`` of a ``[3D, D]`` tensor from the same RNG
    state (the reference's fused Linear), cut into three row blocks."""
    linears = [nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)]
    torch.manual_seed(5)
    fused_xavier_(linears)
    torch.manual_seed(5)
    reference = nn.init.xavier_uniform_(torch.empty(32, 16))
    assert torch.equal(torch.cat([linear.weight for linear in linears]), reference)
