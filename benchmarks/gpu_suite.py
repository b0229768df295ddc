"""One-GPU benchmark suite (issue 17): one command, one JSON, a markdown table.

    python benchmarks/gpu_suite.py --out results.json            # full sizes on a GPU, < 8 minutes
    python benchmarks/gpu_suite.py --smoke --out smoke.json      # tiny sizes, 1-2 steps (default on CPU)

Cases (sizes in FULL / SMOKE below; docs/scale/gpu_suite.md gives the goals and the device command):
  matmul_ceiling            bf16 n^3 matrix product, the measured ceiling beside the datasheet peak;
  dit_b2_trainer_vs_bare    DiT-B/2-size FlowTransformer on 32x32x4 latents, bf16 (SDPA), genmod's
                            Trainer vs a bare PyTorch loop: samples/s, MFU, ratio (gpu_suite_flow.py);
  var_d16_step              VARTransformer depth 16, VAR's 256px scales, vocab 4096: tokens/s, MFU;
  latentlm_step             LatentLMTransformer of a comparable size: tokens/s, MFU;
  vq_16k, vq_100k           VectorQuantizer vs vector-quantize-pytorch, forward + backward;
  dit_b2_trainer_vs_bare_compile   the DiT case again with torch.compile on both sides (last: slowest).

Every case runs inside try/except (an error becomes a string in the JSON), within its own time budget
and the global one (a case that finds the global budget spent is recorded as skipped), with the
CUDA peak-memory counter reset before it. MFU = counted FLOPs per step (FlopCounterMode on one
forward + backward) x steps/s / the datasheet dense bf16 peak of the GPU (None when unknown).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the suite's modules beside this file, however run
from gpu_suite_common import Budget, peak_bf16_flops, peak_memory, reset_memory  # noqa: E402
from gpu_suite_flow import trainer_vs_bare  # noqa: E402
from gpu_suite_models import latentlm_step, matmul_ceiling, var_step  # noqa: E402
from gpu_suite_vq import vq_vs_peer  # noqa: E402

DIT_B2 = dict(in_channels=4, sample_size=32, patch_size=2, hidden_size=768, depth=12, num_heads=12, num_classes=1000)
DIT_TINY = dict(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
VAR_D16 = dict(vocab_size=4096, latent_channels=32, scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), depth=16)
VAR_TINY = dict(vocab_size=64, latent_channels=8, scales=(1, 2, 3), num_classes=10, depth=2)
LATENTLM_D16 = dict(latent_channels=16, latent_grid=(16, 16), num_classes=1000, hidden_size=1024, depth=16,
                    num_heads=16, head_width=1024, head_depth=3)
LATENTLM_TINY = dict(latent_channels=4, latent_grid=(4, 4), num_classes=10, hidden_size=32, depth=2, num_heads=2,
                     head_width=32, head_depth=1)


def flow_spec(model, batch, rounds, warmup, steps):
    return dict(model=model, batch=batch, rounds=rounds, warmup=warmup, steps=steps, ema_decay=0.9999,
                precision="bf16")


# name -> (function, spec, case budget in seconds, extra keyword arguments); run in this order
FULL = {
    "matmul_ceiling": (matmul_ceiling, dict(n=8192, warmup=3, steps=20), 20, {}),
    "dit_b2_trainer_vs_bare": (trainer_vs_bare, flow_spec(DIT_B2, 256, 3, 5, 20), 100, {}),
    "var_d16_step": (var_step, dict(model=VAR_D16, batch=64, warmup=3, steps=10, precision="bf16"), 45, {}),
    "latentlm_step": (latentlm_step, dict(model=LATENTLM_D16, batch=64, warmup=3, steps=10, precision="bf16",
                                          diffusion_batch_mul=4), 45, {}),
    "vq_16k": (vq_vs_peer, dict(codes=16384, dim=32, batch=64, tokens=1024, warmup=2, steps=10), 30, {}),
    "vq_100k": (vq_vs_peer, dict(codes=100000, dim=32, batch=64, tokens=1024, warmup=2, steps=10), 40, {}),
    "dit_b2_trainer_vs_bare_compile": (trainer_vs_bare, flow_spec(DIT_B2, 256, 1, 5, 20), 200,
                                       {"backend": "inductor"}),
}
SMOKE = {
    "matmul_ceiling": (matmul_ceiling, dict(n=64, warmup=1, steps=2), 10, {}),
    "dit_b2_trainer_vs_bare": (trainer_vs_bare, flow_spec(DIT_TINY, 4, 1, 1, 2), 30, {}),
    "var_d16_step": (var_step, dict(model=VAR_TINY, batch=2, warmup=1, steps=2, precision="bf16"), 10, {}),
    "latentlm_step": (latentlm_step, dict(model=LATENTLM_TINY, batch=2, warmup=1, steps=2, precision="bf16",
                                          diffusion_batch_mul=4), 10, {}),
    "vq_16k": (vq_vs_peer, dict(codes=128, dim=8, batch=2, tokens=64, warmup=1, steps=2), 10, {}),
    "vq_100k": (vq_vs_peer, dict(codes=512, dim=8, batch=2, tokens=64, warmup=1, steps=2), 10, {}),
    # dynamo tracing without inductor's code generation: the compile path, at a smoke's cost
    "dit_b2_trainer_vs_bare_compile": (trainer_vs_bare, flow_spec(DIT_TINY, 4, 1, 2, 2), 60, {"backend": "eager"}),
}


def environment(device: torch.device) -> dict:
    """GPU name, software versions and the bf16 peak the MFU numbers divide by."""
    import accelerate
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "accelerate": accelerate.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "peak_bf16_flops": peak_bf16_flops(name) if device.type == "cuda" else None,
            "sdpa_flash_enabled": torch.backends.cuda.flash_sdp_enabled()}


def run_case(name: str, entry: tuple, device: torch.device, suite_budget: Budget, peak: float | None) -> dict:
    """One case in its budget; an exception becomes ``error`` (message and the last traceback line)."""
    fn, spec, seconds, extra = entry
    if suite_budget.expired():
        return {"skipped": "global time budget spent", "error": None, "seconds": 0.0, "peak_memory_bytes": None}
    reset_memory(device)
    start, result = time.perf_counter(), {}
    try:
        result = fn(spec, device, Budget(seconds, suite_budget), peak, **extra)
        error = None
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1]
        error = f"{type(err).__name__}: {str(err)[:400]} (at {where.filename}:{where.lineno})"
    result.update(error=error, seconds=time.perf_counter() - start, budget_s=seconds,
                  peak_memory_bytes=peak_memory(device))
    print(f"[gpu_suite] {name}: {result['seconds']:.1f} s{'  ERROR ' + error if error else ''}", flush=True)
    return result


def goals(cases: dict) -> dict:
    """The issue's goals, read off the cases (None where a number is missing)."""
    def get(case, key):
        value = cases.get(case, {}).get(key)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    def at_least(value, floor):
        return None if value is None else bool(value >= floor)

    return {
        "trainer_ratio_ge_0.95": at_least(get("dit_b2_trainer_vs_bare", "ratio_trainer_over_bare"), 0.95),
        "trainer_ratio_ge_0.95_compiled": at_least(get("dit_b2_trainer_vs_bare_compile", "ratio_trainer_over_bare"), 0.95),
        "dit_b2_bf16_mfu_ge_0.40": at_least(max(filter(None, [get("dit_b2_trainer_vs_bare", "trainer_mfu"),
                                                             get("dit_b2_trainer_vs_bare_compile", "trainer_mfu")]),
                                                default=None), 0.40),
        "vq_16k_ge_peer": at_least(get("vq_16k", "ratio_genmod_over_peer"), 1.0),
        "vq_100k_ge_peer": at_least(get("vq_100k", "ratio_genmod_over_peer"), 1.0),
    }


def write_json(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)


def run_suite(smoke: bool, budget_s: float, device: torch.device, only: list[str] | None = None,
              out: str | None = None) -> dict:
    """All cases (or ``only``) in order; the report as a JSON-ready dict, rewritten to ``out`` after every
    case (a run killed from outside still leaves the cases it finished)."""
    table = SMOKE if smoke else FULL
    env = environment(device)
    suite_budget, start = Budget(budget_s), time.perf_counter()
    report = {"suite": "genmod benchmarks/gpu_suite.py", "mode": "smoke" if smoke else "full", "env": env,
              "budget_s": budget_s, "elapsed_s": 0.0, "cases": {}, "goals": {}}
    for name, entry in table.items():
        if only and name not in only:
            continue
        report["cases"][name] = run_case(name, entry, device, suite_budget, env["peak_bf16_flops"])
        report.update(elapsed_s=time.perf_counter() - start, goals=goals(report["cases"]))
        write_json(report, out)
    return report


def _fmt(value, scale=1.0, digits=3):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    return f"{value / scale:.{digits}g}"


def headline(name: str, case: dict) -> str:
    """The case's main numbers in one cell."""
    if "trainer_samples_per_s" in case:
        return (f"trainer {_fmt(case['trainer_samples_per_s'])} / bare {_fmt(case['bare_samples_per_s'])} samples/s, "
                f"ratio {_fmt(case['ratio_trainer_over_bare'])}, MFU trainer {_fmt(case['trainer_mfu'])} "
                f"bare {_fmt(case['bare_mfu'])}, {_fmt(case['flops_per_step'], 1e12)} TFLOP/step")
    if "tokens_per_step" in case:
        return (f"{_fmt(case['tokens_per_s'])} tokens/s, {_fmt(case['params'], 1e6)} M params, "
                f"MFU {_fmt(case['mfu'])}, {_fmt(case['flops_per_step'], 1e12)} TFLOP/step")
    if "codes" in case:
        peer = case["peer"]["tokens_per_s"] if case.get("peer") else None
        note = case.get("peer_skipped") or case.get("peer_error") or ""
        return (f"genmod {_fmt(case['genmod']['tokens_per_s'])} / peer {_fmt(peer)} tokens/s, "
                f"ratio {_fmt(case['ratio_genmod_over_peer'])} {note[:60]}").strip()
    if "tflops" in case:
        return f"{_fmt(case['tflops'])} TFLOP/s, {_fmt(case['fraction_of_peak'])} of peak"
    return case.get("skipped") or ""


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"gpu_suite ({report['mode']}) on {env['device_name']}, torch {env['torch']}, CUDA {env['cuda']}, "
             f"{report['elapsed_s']:.0f} s of {report['budget_s']:.0f} s", "",
             "| case | numbers | peak memory (GiB) | seconds | error |", "|---|---|---|---|---|"]
    for name, case in report["cases"].items():
        memory = _fmt(case.get("peak_memory_bytes"), 2 ** 30)
        error = (case.get("error") or "").replace("|", "/")[:120]
        lines.append(f"| {name} | {headline(name, case) if not case.get('error') else ''} | {memory} | "
                     f"{case.get('seconds', 0):.1f} | {error} |")
    lines += ["", "goals: " + ", ".join(f"{k}: {v}" for k, v in report["goals"].items())]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_suite.json", help="where the JSON report goes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1-2 steps (always on without CUDA)")
    parser.add_argument("--budget", type=float, default=480.0, help="global time budget in seconds (default 8 min)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these cases")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = run_suite(args.smoke or device.type != "cuda", args.budget, device, args.only, args.out)
    print(markdown(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
