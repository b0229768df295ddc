#!/usr/bin/env bash
# The reference tokenizer runs (issue 3): FSQ and VQ-4096 (EMA + dead-code restart) on shapes and
# Fashion-MNIST, a sigma-VAE on shapes, a residual-FSQ audio tokenizer on tones; all in parallel, each
# stopped after MINUTES of training, then evaluated. Results: runs/tokenizers/<name>/{final_model,eval}.
#   MINUTES=8 bash scripts/train_tokenizer_suite.sh [extra flags for every run, e.g. --cpu]
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-8}
ROOT=${ROOT:-runs/tokenizers}
common=(--time_budget_minutes "$MINUTES" --max_steps 1000000 --checkpoint_every 0 --no-tensorboard
        --num_workers 2 --eval_samples 1000 "$@")
img=(--base_channels 64 --ch_mult 1,2,2 --num_res_blocks 2 --batch_size 64 --lr 2e-4)
vq=(--quantizer vq --codebook_size 4096 --latent_channels 8 --codebook_update ema --kmeans_init
    --dead_code_threshold 0.5 --batch_size 128)
run() { local name=$1; shift; mkdir -p "$ROOT/$name"
  python scripts/train_tokenizer.py --output_dir "$ROOT/$name" "${common[@]}" "$@" > "$ROOT/$name/log.txt" 2>&1; }
run fsq_shapes "${img[@]}" --dataset shapes --quantizer fsq --fsq_levels 7,5,5,5,5 &
run vq_shapes "${img[@]}" "${vq[@]}" --dataset shapes &
run fsq_fmnist "${img[@]}" --dataset fashion_mnist --quantizer fsq --fsq_levels 7,5,5,5,5 &
run vq_fmnist "${img[@]}" "${vq[@]}" --dataset fashion_mnist &
run sigma_vae_shapes "${img[@]}" --dataset shapes --tokenizer sigma_vae --latent_channels 8 &
# audio: residual FSQ (an RVQ with loss-updated cosine codebooks collapsed to ~3% usage in 1k steps)
run rfsq_tones --dataset tones --modality audio --quantizer rfsq --num_quantizers 4 --fsq_levels 8,5,5,5 \
    --latent_channels 32 --base_channels 32 --batch_size 16 --lr 3e-4 --adam_betas 0.8,0.99 --audio_segment 8000 \
    --stft_weight 1 --gan_weight 1.0 --gan_start 2000 --eval_samples 200 &
wait
for d in "$ROOT"/*/; do echo "== $d"; cat "$d/eval/metrics.json" 2>/dev/null || tail -5 "$d/log.txt"; done
