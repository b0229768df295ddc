#!/usr/bin/env python
"""Train a CausalFusion transformer with the shared trainer (same as ``genmod train causalfusion``).

    python scripts/train_causalfusion.py --dataset shapes --max_steps 3000 --cpu --output_dir runs/causalfusion/shapes
    python scripts/train_causalfusion.py --dataset fashion_mnist --depth 8 --hidden_size 256 --output_dir runs/causalfusion/fm
    # the paper's diffusion setting (DDPM linear betas, epsilon prediction, integer steps):
    python scripts/train_causalfusion.py --path ddpm_linear --prediction epsilon --time_sampling discrete ...
    # latent space: --tokenizer runs/tokenizer/pipeline_or_model_dir

Every ``CausalFusionConfig`` field is a flag (``--help`` lists them); ``--resume latest`` continues a
killed run. The exported pipeline lands in ``OUTPUT/pipeline``
(``genmod sample OUTPUT --num 64 --ar-steps 4 --out grid.png``).
"""

import sys

from genmod.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "causalfusion", *sys.argv[1:]]))
