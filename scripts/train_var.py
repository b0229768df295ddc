#!/usr/bin/env python
"""Train VAR on a trained multi-scale tokenizer, then score it (same as ``genmod train var``).

    python scripts/train_tokenizer.py --quantizer msvq --scales 1,2,3,4,6,8 --codebook_size 1024 \
        --latent_channels 16 --ch_mult 1,2,2 --dataset shapes --cpu --output_dir runs/var/tokenizer
    python scripts/train_var.py --tokenizer runs/var/tokenizer/final_model --dataset shapes --depth 6 \
        --cpu --time_budget_minutes 12 --max_steps 3000 --eval_samples 500 --output_dir runs/var/shapes

Every ``VARConfig`` field is a flag (``genmod train var --help``). ``--time_budget_minutes`` stops the
run cleanly (checkpoint + pipeline export) once that much wall-clock time is spent; the wall and
process CPU minutes of training are reported. With ``--eval_samples N`` the exported pipeline draws
N class-cycled samples (per-sample seeds) and ``OUTPUT/eval/metrics.json`` gets the domain classifier
accuracy, domain FID/KID against held-out data and the real-vs-real floor at the same N;
``OUTPUT/eval/grid.png`` shows 8 samples per class (one class per row). An exported pipeline alone:
``genmod eval PIPELINE_DIR --held-out --num-samples N --out OUT_DIR``.
"""

import sys

from genmod.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "var", *sys.argv[1:]]))
