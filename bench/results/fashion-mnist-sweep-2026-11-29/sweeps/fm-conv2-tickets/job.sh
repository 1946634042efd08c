#!/bin/bash
# BIPROP ticket search for SLURM, rendered by `biprop jobs` from jobs/slurm.sh.j2 on 2026-11-29T18:42:19+00:00.
# 24 run(s), one per array index; manifest: /tmp/fm-sweep/sweeps/fm-conv2-tickets/manifest.json
# It may be edited and submitted by hand: sbatch /tmp/fm-sweep/sweeps/fm-conv2-tickets/job.sh
#SBATCH --job-name=fm-conv2-tickets
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=0-02:00:00
# USR1 to every training task 300 s before the time limit (no "B:": slurmstepd signals the tasks).
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --array=1-24
#SBATCH --output=/tmp/fm-sweep/sweeps/fm-conv2-tickets/logs/run%a_job%A.out

source /work/main/env/site.sh  # modules, paths and file-system settings of this machine
set -uo pipefail  # no -e: the exit code of the training step decides what happens next
cd /work/main
export OMP_NUM_THREADS=1
BIPROP=(/work/main/.venv/bin/python -m biprop_hpc)
MAX_RESTARTS=3
RESTARTS=${SLURM_RESTART_COUNT:-0}
INDEX=$SLURM_ARRAY_TASK_ID
JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}

# `biprop train` arguments of each run (its run directory in the comment above it).
case $INDEX in
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.1/seed0
    1) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.1 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.1/seed1
    2) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.1 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.2/seed0
    3) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.2 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.2/seed1
    4) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.2 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.4/seed0
    5) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.4 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.4/seed1
    6) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.4 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.5/seed0
    7) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.5 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.5/seed1
    8) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.5 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.6/seed0
    9) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.6 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.6/seed1
    10) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.6 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.8/seed0
    11) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.8 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-1/keep=0.8/seed1
    12) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-1.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.8 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.1/seed0
    13) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.1 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.1/seed1
    14) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.1 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.2/seed0
    15) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.2 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.2/seed1
    16) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.2 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.4/seed0
    17) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.4 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.4/seed1
    18) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.4 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.5/seed0
    19) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.5 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.5/seed1
    20) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.5 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.6/seed0
    21) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.6 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.6/seed1
    22) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.6 --seed 1) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.8/seed0
    23) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.8 --seed 0) ;;
    # /tmp/fm-sweep/conv2_mpt1-32/keep=0.8/seed1
    24) RUN=(--config /work/main/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --keep-ratio 0.8 --seed 1) ;;
    *) echo "no run for index $INDEX" >&2; exit 2 ;;
esac

echo "$(date -Is) job $JOB on $(hostname): run $INDEX, restart $RESTARTS (at most $MAX_RESTARTS)"
# The tasks get the warning and SIGTERM themselves; this shell must only survive them (USR1 would kill it).
trap 'echo "$(date -Is) SIGUSR1: the ranks write a checkpoint and exit 75"' USR1
trap 'echo "$(date -Is) SIGTERM (time limit, preemption or scancel): the ranks checkpoint and exit 75"' TERM
# One rank per GPU. --wait: 60 s after the first rank ends the others are killed, so a dead rank cannot
# leave the job hanging in an allreduce (rank 0 may still be writing files when the others are done).
srun --mpi=pmix --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --wait=60 \
    "${BIPROP[@]}" train "${RUN[@]}" --resume auto &
STEP=$!
wait $STEP; RC=$?
while kill -0 $STEP 2>/dev/null; do wait $STEP; RC=$?; done  # a trapped signal ends `wait` early

case $RC in
    0)   echo "$(date -Is) completed" ;;
    75)  if (( RESTARTS < MAX_RESTARTS )); then
             echo "$(date -Is) checkpointed; requeue $((RESTARTS + 1)) of $MAX_RESTARTS"
             scontrol requeue "$JOB" && exit 0
             echo "$(date -Is) requeue refused (cancelled, or past the time limit)"
         else
             echo "$(date -Is) checkpointed, and all $MAX_RESTARTS restarts are used"
         fi
         echo "to continue, submit again: the run resumes from its checkpoint" ;;
    130) echo "$(date -Is) stopped by SIGINT; submit again to continue" ;;
    2)   echo "$(date -Is) bad input (see the error above)" ;;
    *)   echo "$(date -Is) failed with exit code $RC; submit again to continue from the last checkpoint" ;;
esac
exit $RC
