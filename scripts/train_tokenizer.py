#!/usr/bin/env python
"""Train a tokenizer with the shared trainer, then evaluate it (same as ``genmod train tokenizer``).

    python scripts/train_tokenizer.py --quantizer fsq --dataset shapes --max_steps 2000 --cpu \
        --output_dir runs/tokenizers/fsq_shapes
    # a PatchGAN from optimizer step 1000 (its state is checkpointed: --resume latest keeps the delay)
    python scripts/train_tokenizer.py --quantizer fsq --gan_weight 0.1 --gan_start 1000 --perceptual_weight 1 ...

Every ``TokenizerConfig`` field is a flag (``--help`` lists them); ``--time_budget_minutes M`` stops
cleanly after M minutes. At the end the final model is evaluated on ``--eval_split`` with
``--eval_samples`` items (``genmod.tokenizer.evaluate_tokenizer``; 0 = off): ``OUTPUT/eval/metrics.json``
plus a side-by-side PNG (WAVs for audio); the model is in ``OUTPUT/final_model``
(``genmod.tokenizers_vq.models.load_tokenizer``; ``genmod eval-tokenizer OUTPUT`` scores it again).
"""

import sys

from genmod.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "tokenizer", *sys.argv[1:]]))
