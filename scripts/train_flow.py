#!/usr/bin/env python
"""Train a flow-matching transformer with the shared trainer (same as ``genmod train flow``).

    python scripts/train_flow.py --dataset shapes --max_steps 3000 --cpu --output_dir runs/flow_shapes
    python scripts/train_flow.py --dataset fashion_mnist --depth 8 --hidden_size 256 --output_dir runs/flow_fm

Every ``FlowConfig`` field is a flag (``--help`` lists them); ``--resume latest`` continues a killed run.
The exported pipeline lands in ``OUTPUT/pipeline`` (``genmod sample OUTPUT --num 64 --out grid.png``).
Several processes: ``accelerate launch scripts/train_flow.py ...`` or, on CPU,
``ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 scripts/train_flow.py --cpu ...``.
"""

import sys

from genmod.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "flow", *sys.argv[1:]]))
