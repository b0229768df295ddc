"""Issue 21: genmod's fused-SNR velocity weight before (factor at the equivalent time) and after (factor at t),
as ratios to the official v1.5 weight, per level and over random clips (docs/RESULTS.md, a few seconds).

    GENMOD_WT=... python benchmarks/results/diffusion_forcing_issue21/weights.py
"""

import torch

from genmod.core.loss import min_snr_weight
from genmod.core.paths import AffinePath, get_path
from genmod.diffusion_forcing.loss import fused_snr, fused_snr_weight


def before(path, t, gamma=5.0, decay=0.96):
    """The pre-session-6 formula: min-SNR velocity weight at the time whose SNR equals the fused one."""
    snr_f = gamma * fused_snr(path.snr(t), gamma, decay)
    t_equiv = path.t_from_log_snr(torch.log(snr_f.clamp(min=1e-12)))
    return min_snr_weight(path, t_equiv.clamp(1e-6, 1 - 1e-6), gamma, "velocity")


def official(path, t, gamma=5.0, decay=0.96):
    """v1.5's pred_v weight min(S_f, gamma) / (S_f + 1), carried to genmod's velocity at t."""
    f = fused_snr(path.snr(t), gamma, decay)
    a, s, da, ds = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
    return (gamma * f).clamp(max=gamma) / (gamma * f + 1) * (a**2 + s**2) / (a * ds - s * da) ** 2


def main():
    levels = [0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98]
    print("| path | " + " | ".join(f"t = {v}" for v in levels) + " | median | max |")
    for name in ["cosine", "ddpm_cosine", "ddpm_linear", "ddpm_sigmoid", "vp", "linear", "custom"]:
        path = AffinePath(alpha=lambda t: 1 - t**2, sigma=lambda t: t * (1 + t) / 2) if name == "custom" else get_path(name)
        rand = torch.rand(256, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.98 + 0.01
        for label, fn in (("before", before), ("after", lambda p, t: fused_snr_weight(p, t, 5.0, 0.96))):
            ratios = [float(fn(path, torch.tensor([[0.05, v]], dtype=torch.float64))[0, 1]
                            / official(path, torch.tensor([[0.05, v]], dtype=torch.float64))[0, 1]) for v in levels]
            rel = (fn(path, rand) / official(path, rand) - 1).abs()
            print(f"| {name}, {label} | " + " | ".join(f"{r:.4g}" for r in ratios)
                  + f" | {float(rel.median()):.2g} | {float(rel.max()):.3g} |")


if __name__ == "__main__":
    main()
