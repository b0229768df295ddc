"""benchmarks/gpu_suite.py in smoke mode, in-process: every case present with finite numbers, the DiT FLOP
count equal to a hand computation (and to FlopCounterMode's), the JSON on disk, the markdown table."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_suite  # noqa: E402
from genmod.flow.transformer import FlowTransformer  # noqa: E402
from gpu_suite_common import mfu, peak_bf16_flops  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "smoke.json"
    torch.manual_seed(0)
    result = gpu_suite.run_suite(smoke=True, budget_s=300, device=torch.device("cpu"), out=str(out))
    return result, out


def finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_case_ran_without_error(report):
    result, _ = report
    assert list(result["cases"]) == list(gpu_suite.SMOKE)
    for name, case in result["cases"].items():
        assert case["error"] is None, (name, case["error"])
        assert "skipped" not in case, name
        assert case["peak_memory_bytes"] is None  # CPU: no CUDA counter
    assert result["mode"] == "smoke" and result["env"]["torch"] == torch.__version__
    assert set(result["goals"]) == {"trainer_ratio_ge_0.95", "trainer_ratio_ge_0.95_compiled",
                                    "dit_b2_bf16_mfu_ge_0.40", "vq_16k_ge_peer", "vq_100k_ge_peer"}


def test_dit_flops_equal_a_hand_count(report):
    # DIT_TINY, batch 4, 8x8x4 latents, patch 2: T = 16 tokens, D = 32, depth 2, MLP 128, p^2 C = 16
    B, T, D, L, M, P, F = 4, 16, 32, 2, 128, 16, 256
    per_token = 6 * B * T * (L * (4 * D * D + 2 * D * M) + D * P)  # q k v out, MLP, final linear: 3 x 2 x params
    per_sample = 6 * B * (L * 6 * D * D + 2 * D * D + D * D)  # adaLN in blocks and final layer, timestep MLP 2
    no_input_grad = 4 * B * T * P * D + 4 * B * F * D  # patch conv, timestep MLP layer 1
    attention = 12 * B * L * T * T * D
    hand = per_token + per_sample + no_input_grad + attention
    assert hand == 11_051_008
    for name in ("dit_b2_trainer_vs_bare", "dit_b2_trainer_vs_bare_compile"):
        case = report[0]["cases"][name]
        assert case["flops_per_step"] == case["flops_per_step_analytic"] == hand
        assert case["params"] == sum(p.numel() for p in FlowTransformer(**gpu_suite.DIT_TINY).parameters())


def test_trainer_and_bare_loop_numbers_are_finite(report):
    for name, compiled in (("dit_b2_trainer_vs_bare", "off"), ("dit_b2_trainer_vs_bare_compile", "eager")):
        case = report[0]["cases"][name]
        assert case["compile"] == compiled and case["rounds"] == 1 and case["ema_decay"] == 0.9999
        assert finite_positive(case["trainer_samples_per_s"]) and finite_positive(case["bare_samples_per_s"])
        assert case["ratio_trainer_over_bare"] == pytest.approx(case["trainer_samples_per_s"] / case["bare_samples_per_s"])
        assert case["trainer_mfu"] is None  # no datasheet peak for a CPU
    assert isinstance(report[0]["cases"]["dit_b2_trainer_vs_bare_compile"]["graph_breaks"], dict)


def test_var_latentlm_matmul_and_vq_numbers(report):
    cases = report[0]["cases"]
    assert cases["var_d16_step"]["tokens_per_step"] == 2 * (1 + 4 + 9)  # batch 2, scales 1, 2, 3
    assert cases["latentlm_step"]["tokens_per_step"] == 2 * (3 + 16 + 2)  # <bos> <class> <bol> 4x4 <eol> <eos>
    for name in ("var_d16_step", "latentlm_step"):
        assert finite_positive(cases[name]["tokens_per_s"]) and finite_positive(cases[name]["flops_per_step"])
        assert cases[name]["timed_steps"] == 2
    assert cases["matmul_ceiling"]["flops_per_product"] == 2 * 64 ** 3
    assert finite_positive(cases["matmul_ceiling"]["tflops"])
    for name, codes in (("vq_16k", 128), ("vq_100k", 512)):
        case = cases[name]
        assert case["codes"] == codes and finite_positive(case["genmod"]["tokens_per_s"])
        if case["peer_skipped"] is None:
            assert finite_positive(case["ratio_genmod_over_peer"]) or case["peer_error"]
        else:
            assert "vector-quantize-pytorch" in case["peer_skipped"] and case["ratio_genmod_over_peer"] is None


def test_json_on_disk_and_markdown_table(report):
    result, out = report
    on_disk = json.loads(out.read_text())
    assert on_disk["cases"].keys() == result["cases"].keys()
    assert on_disk["cases"]["var_d16_step"]["tokens_per_s"] == pytest.approx(result["cases"]["var_d16_step"]["tokens_per_s"])
    table = gpu_suite.markdown(result)
    assert all(f"| {name} |" in table for name in result["cases"])


def test_peak_table_and_mfu():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") is None
    assert mfu(989e12 * 0.5, 1.0, 989e12) == pytest.approx(0.5)  # half the peak's FLOPs in one second
    assert mfu(10, 1.0, None) is None


def test_a_spent_global_budget_skips_cases():
    spent = gpu_suite.Budget(0.0)
    case = gpu_suite.run_case("matmul_ceiling", gpu_suite.SMOKE["matmul_ceiling"], torch.device("cpu"), spent, None)
    assert case["skipped"] == "global time budget spent" and case["error"] is None


def test_an_error_is_recorded_not_raised():
    def broken(spec, device, budget, peak):
        raise RuntimeError("out of memory, say")

    case = gpu_suite.run_case("broken", (broken, {}, 5, {}), torch.device("cpu"), gpu_suite.Budget(60), None)
    assert case["error"].startswith("RuntimeError: out of memory, say")
