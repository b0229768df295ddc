#!/usr/bin/env python
"""Train a Diffusion Forcing transformer with the shared trainer (same as ``genmod train diffusion-forcing``).

    python scripts/train_diffusion_forcing.py --dataset moving_shapes --num_frames 8 --image_size 16 --cpu \
        --max_steps 3000 --output_dir runs/diffusion_forcing/shapes
    python scripts/train_diffusion_forcing.py --dataset oscillators --num_frames 8 --frame_stack 8 \
        --hidden_size 64 --depth 2 --output_dir runs/diffusion_forcing/osc

Every ``DiffusionForcingConfig`` field is a flag (``--help`` lists them); ``--resume latest`` continues
a killed run. The exported pipeline lands in ``OUTPUT/pipeline``:
``genmod sample OUTPUT --num 4 --frames 64 --context 4 --schedule pyramid --out clip.gif``.
"""

import sys

from genmod.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "diffusion-forcing", *sys.argv[1:]]))
