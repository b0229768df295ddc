"""Teacher-forced one-step check: does the model know the next frame when its history is real?

For validation ``moving_shapes`` clips, frames ``0..k-1`` are shown clean (at the stabilisation level
``t_c``) and frame ``k`` as pure noise (``t = 1``); the network's single x0 prediction of frame ``k``
(``k = 2..7``) is scored by MSE against the truth (next to copying frame ``k - 1``) and by the frame
classifier of ``benchmarks/diffusion_forcing_rollout.py`` (shape class of the clip). No sampling
loop, so this separates "the network has learned appearance / motion" from "sampling compounds".

    python benchmarks/results/diffusion_forcing_unet/teacher_forced.py runs/df_unet runs/df_video
"""

from __future__ import annotations

import json
import sys

import torch

sys.path.insert(0, "benchmarks")
from diffusion_forcing_rollout import _frame_net, load  # noqa: E402

from genmod.diffusion_forcing.sampling import present_clean  # noqa: E402


@torch.no_grad()
def check(model_dir: str, num_clips: int = 64, context_noise: float = 0.02, seed: int = 0) -> dict:
    family, model = load(model_dir, torch.device("cpu"))
    dataset = family.build_dataset("val")
    clips = torch.stack([dataset[i]["video"] for i in range(num_clips)])
    labels = torch.tensor([int(dataset[i]["label"]) for i in range(num_clips)])
    net = _frame_net(dataset.image_size)
    gen = torch.Generator().manual_seed(seed)
    rows = {"model_mse": [], "copy_last_mse": [], "model_acc": [], "truth_acc": []}
    for k in range(2, clips.shape[1]):
        shown = present_clean(family.path, clips[:, :k], context_noise, gen)
        noise = torch.randn(clips[:, k:k + 1].shape, generator=gen)
        levels = torch.cat([torch.full((num_clips, k), 1000.0 * context_noise), torch.full((num_clips, 1), 1000.0)], 1)
        pred = model(torch.cat([shown, noise], 1), levels).sample[:, -1:]
        t = torch.tensor([[context_noise] * k + [1.0]]).expand(num_clips, -1)
        x0 = family.path.convert(pred, torch.cat([shown, noise], 1)[:, -1:], t[:, -1:], src=family.config.prediction,
                                 dst="x0")[:, 0].clamp(-1, 1)
        rows["model_mse"].append(((x0 - clips[:, k]) ** 2).mean().item())
        rows["copy_last_mse"].append(((clips[:, k - 1] - clips[:, k]) ** 2).mean().item())
        rows["model_acc"].append((net.model(x0)[1].argmax(1) == labels).float().mean().item())
        rows["truth_acc"].append((net.model(clips[:, k])[1].argmax(1) == labels).float().mean().item())
    return {key: sum(v) / len(v) for key, v in rows.items()} | {"per_k": rows}


if __name__ == "__main__":
    report = {path: check(path) for path in sys.argv[1:]}
    for path, r in report.items():
        print(f"{path}: next-frame x0 from noise MSE {r['model_mse']:.4f} (copy-last {r['copy_last_mse']:.4f}), "
              f"classifier accuracy {r['model_acc']:.2f} (truth {r['truth_acc']:.2f})")
    print(json.dumps(report))
