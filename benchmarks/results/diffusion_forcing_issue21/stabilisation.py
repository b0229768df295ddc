"""Issue 21: what a Diffusion Forcing model sees for stabilised frames under each stabilisation mode
(docs/RESULTS.md, a few seconds): a ground-truth context frame of value 0.8 and a generated frame x,
2000 clips of a random sequence model, cosine path.

    GENMOD_WT=... python benchmarks/results/diffusion_forcing_issue21/stabilisation.py
"""

import math

import torch

from genmod.diffusion_forcing import DiffusionForcingTransformer, rollout


def main():
    print("| t_c | mode | GT seen: mean | GT seen: std | GT level fed | GT same each step | generated: std of (seen - alpha x) | generated same each step |")
    for tc in (0.02, 0.5):
        alpha = math.cos(math.pi * tc / 2)
        for mode in ("fixed_noise", "v1.5", "v1.5_ddpm", "dfot"):
            torch.manual_seed(0)
            model = DiffusionForcingTransformer(modality="sequence", in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                                max_frames=6).eval()
            calls = []
            model.register_forward_pre_hook(lambda m, a, k: calls.append((a[0].clone(), a[1].clone())), with_kwargs=True)
            context = torch.full((2000, 2, 4), 0.8)
            out = rollout(model, context, 2, schedule="autoregressive", num_inference_steps=2, chunk_size=1, kv_cache=None,
                          context_noise=tc, stabilization=mode, generator=torch.Generator().manual_seed(0))
            gt = [x[:, :2] for x, _ in calls]
            gen = [x[:, 2] for x, _ in calls if x.shape[1] == 4]
            print(f"| {tc} | {mode} | {float(gt[0].mean()):.4f} | {float(gt[0].std()):.4f} | {float(calls[0][1][0, 0]):g} | "
                  f"{torch.equal(gt[0], gt[1])} | {float((gen[0] - alpha * out[:, 2]).std()):.4f} | {torch.equal(gen[0], gen[1])} |")


if __name__ == "__main__":
    main()
