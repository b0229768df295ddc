#!/usr/bin/env bash
# Reflow (Liu et al. 2022, Sec. 2.2) and a 2-step distilled student (Sec. 2.3) of a flow U-Net teacher (32,64,64:
# `--preset demo-unet` on shapes, `--preset fashion-mnist-unet`), then domain-FID at 1, 2, 4, 8 Euler steps against
# the teacher at 50 Euler steps (CFG 2).
#
#   TEACHER=runs/flow_shapes/pipeline OUT=runs/flow18b LOCK=/tmp/heavy3.lock bash benchmarks/flow_reflow.sh
#   TEACHER=runs/flow_fmnist/pipeline DATASET=fashion_mnist OUT=runs/flow18b bash benchmarks/flow_reflow.sh
#   python benchmarks/flow_reflow_collect.py --runs runs/flow18b --dataset fashion_mnist   # the table
#
# Every heavy step is its own `flock $LOCK` job sized to < 15 CPU-minutes on the 2-core machine:
#   1. pairs + reflow: 384 (noise, sample) pairs of the teacher (its Heun, 16 steps as saved in its preset,
#      CFG 2; resumable shards), then 400 steps (batch 32, lr 2e-4, uniform t) from the teacher's weights;
#   2. distill: 200 steps at the 2 Euler times {1, 1/2} on the same pairs, starting from the reflow student;
#   3. eval (one job): genmod eval (domain FID / KID, 300 samples) of the teacher (Euler 1, 2, 4, 8, 50; CFG 2)
#      and of both students (Euler 1, 2, 4, 8; no CFG: the pairs were made with CFG 2).
set -euo pipefail
TEACHER=${TEACHER:-runs/flow_shapes/pipeline}
DATASET=${DATASET:-shapes}
OUT=${OUT:-runs/flow18b}
LOCK=${LOCK:-/tmp/heavy3.lock}
PAIRS=${PAIRS:-384}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TIME="/usr/bin/time -f %e_wall_s_%U_user_s_%S_sys_s"
mkdir -p "$OUT"
COMMON=(--backbone unet --unet_channels 32,64,64 --batch_size 32 --warmup_steps 20 --ema_decay 0.99
        --time_sampling uniform --solver euler --guidance_scale 1 --sample_every 100000 --report_to none --cpu
        --dataset "$DATASET" --reflow_from "$TEACHER" --reflow_pairs "$PAIRS" --reflow_pairs_dir "$OUT/pairs_$DATASET"
        --reflow_num_inference_steps 16 --reflow_guidance_scale 2)

if [ ! -f "$OUT/reflow_$DATASET/pipeline/model_index.json" ]; then
  flock "$LOCK" $TIME genmod train flow --output_dir "$OUT/reflow_$DATASET" "${COMMON[@]}" \
      --init_weights "$TEACHER" --max_steps 400 --lr 2e-4 --num_inference_steps 4 --checkpoint_every 200
fi
if [ ! -f "$OUT/distill2_$DATASET/pipeline/model_index.json" ]; then
  flock "$LOCK" $TIME genmod train flow --output_dir "$OUT/distill2_$DATASET" "${COMMON[@]}" \
      --init_weights "$OUT/reflow_$DATASET/pipeline" --distill_steps 2 --max_steps 200 --lr 2e-4 \
      --num_inference_steps 2 --checkpoint_every 100
fi
# the teacher with an Euler scheduler (same weights): its few-step baseline
if [ ! -d "$OUT/teacher_euler_$DATASET" ]; then
  cp -r "$TEACHER" "$OUT/teacher_euler_$DATASET"
  python - "$OUT/teacher_euler_$DATASET/scheduler/scheduler_config.json" <<'PY'
import json, os, sys
from genmod.core.files import write_manifest
path = sys.argv[1]; cfg = json.load(open(path)); cfg["solver"] = "euler"; json.dump(cfg, open(path, "w"), indent=2)
write_manifest(os.path.dirname(os.path.dirname(path)))  # the copy's files changed: a new manifest for `genmod verify`
PY
  cp "$(dirname "$TEACHER")/train_config.json" "$OUT/teacher_train_config_$DATASET.json" 2>/dev/null || true
fi
EVAL=(--metrics fid,kid --features domain --num-samples 300 --dataset $DATASET --seed 0)
flock "$LOCK" sh -c "$TIME genmod eval $OUT/teacher_euler_$DATASET ${EVAL[*]} --steps 1,2,4,8,50 --guidance 2 --out $OUT/eval_teacher_euler_$DATASET && \
  $TIME genmod eval $OUT/reflow_$DATASET/pipeline ${EVAL[*]} --steps 1,2,4,8 --guidance 1 --out $OUT/eval_reflow_$DATASET && \
  $TIME genmod eval $OUT/distill2_$DATASET/pipeline ${EVAL[*]} --steps 1,2,4,8 --guidance 1 --out $OUT/eval_distill2_$DATASET"
echo done
