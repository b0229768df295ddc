"""SiT at a released size: official network (random, perturbed weights) vs ``genmod import sit``, and the import time.

    python benchmarks/sit_full_size_parity.py --official /tmp/sit_official --model SiT-B/2

``--official`` holds the official ``models.py`` of willisma/SiT (947f95b; needs timm). Prints the max abs
difference of the velocity (genmod = -SiT at t = 1 - t_SiT) and of the 3-channel CFG output, and the
import's wall time. Memory: about 4x the model's fp32 size (XL/2: ~11 GB).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", required=True)
    parser.add_argument("--model", default="SiT-B/2", choices=["SiT-S/2", "SiT-B/2", "SiT-L/2", "SiT-XL/2"])
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.official))
    from diffusers import AutoencoderKL
    from models import SiT_models

    from genmod.cli import main as genmod_main
    from genmod.flow.pipeline import FlowMatchingPipeline

    torch.manual_seed(0)
    ref = SiT_models[args.model](input_size=32, num_classes=1000, learn_sigma=True).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    folder = tempfile.mkdtemp()
    try:
        torch.save(ref.state_dict(), f"{folder}/sit.pt")
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                      norm_num_groups=4).save_pretrained(f"{folder}/vae")
        start = time.perf_counter()
        genmod_main(["import", "sit", f"{folder}/sit.pt", "--vae", f"{folder}/vae", "--out", f"{folder}/pipe"])
        seconds = time.perf_counter() - start
        pipe = FlowMatchingPipeline.from_pretrained(f"{folder}/pipe")
        x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([0.3, 0.8]), torch.tensor([207, 1000])
        with torch.no_grad():
            velocity = (ref(x, t, y) + pipe.transformer(x, 1000 * (1 - t), y).sample[:, :4]).abs().max().item()
            official_cfg = ref.forward_with_cfg(torch.cat([x[:1]] * 2), torch.cat([t[:1]] * 2), torch.tensor([207, 1000]), 1.5)[:1]
            genmod_cfg = pipe.guided_output(x[:1], 1000 * (1 - t[0]), torch.tensor([207]), (1.5, None))
        print(f"{args.model}: import {seconds:.1f} s, velocity max abs diff {velocity:.2e}, "
              f"CFG max abs diff {(official_cfg + genmod_cfg).abs().max().item():.2e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
