#!/usr/bin/env bash
# The job that made the numbers of docs/RESULTS.md "Issue 18": run as `flock /tmp/heavy3.lock bash benchmarks/flow_core_final_job.sh`
# after benchmarks/flow_reflow.sh has trained the students (its steps 1-2).
# one job under the lock: the shapes evals (teacher Euler 1,2,4,8,50; reflow and student Euler 1,2,4,8) then the 2-D benchmark
cd /work/wt-flow18b
export GENMOD_WT=/work/wt-flow18b OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=/work/runs/flow18b
T="/usr/bin/time -f %e_wall_s_%U_user_s_%S_sys_s"
EVAL="--metrics fid,kid --features domain --num-samples 300 --dataset shapes --seed 0"
$T genmod eval $OUT/teacher_euler $EVAL --steps 1,2,4,8,50 --guidance 2 --out $OUT/eval_teacher_euler
$T genmod eval $OUT/reflow_shapes/pipeline $EVAL --steps 1,2,4,8 --guidance 1 --out $OUT/eval_reflow
$T genmod eval $OUT/distill2_shapes/pipeline $EVAL --steps 1,2,4,8 --guidance 1 --out $OUT/eval_distill2
echo "shapes evals done $(date)"
/usr/bin/time -v python benchmarks/flow_couplings_2d.py --steps 1000 --out $OUT/couplings_2d > $OUT/couplings_2d.log 2>&1
echo "2d done $(date)"
