#!/usr/bin/env python
"""Train LatentLM (next-token diffusion over sigma-VAE latents) with the shared trainer (same as ``genmod train latentlm``).

    # text-to-image + captioning on the built-in shapes (a sigma-VAE first: scripts/train_tokenizer.py --tokenizer sigma_vae)
    python scripts/train_latentlm.py --tokenizer runs/tokenizers/sigma_vae_shapes/final_model --dataset shapes \
        --latent_patch_size 2 --hidden_size 192 --depth 4 --lr 1e-3 --lr_schedule cosine --max_steps 4500 --cpu \
        --output_dir runs/latentlm/shapes   # the measured recipe: docs/RESULTS.md
    # class-conditional Fashion-MNIST
    python scripts/train_latentlm.py --tokenizer SIGMA_VAE_DIR --dataset fashion_mnist --condition class ...
    # text-to-speech on the spoken digits (genmod make-speech-digits --out ~/.cache/genmod/speech_digits)
    python scripts/train_latentlm.py --tokenizer AUDIO_SIGMA_VAE_DIR --dataset speech_digits --audio_duration 1.28 --caption_prob 0 ...

Every ``LatentLMConfig`` field is a flag (``--help``); ``--time_budget_minutes M`` stops cleanly (checkpoint
+ export) after M minutes. The exported pipeline lands in ``OUTPUT/pipeline``
(``genmod sample OUTPUT --prompt "a small red circle" --out grid.png``).
"""

import sys

from genmod.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "latentlm", *sys.argv[1:]]))
