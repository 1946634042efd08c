#!/bin/bash
# BIPROP ticket search for SLURM, rendered by `biprop jobs` from jobs/slurm.sh.j2 on 2026-12-06T19:35:20+00:00.
# 8 run(s), one per array index; manifest: /tmp/study/out/sweeps/fm-pruning/manifest.json
# It may be edited and submitted by hand: sbatch /tmp/study/out/sweeps/fm-pruning/job.sh
#SBATCH --job-name=fm-pruning
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=0-02:00:00
# USR1 to every training task 300 s before the time limit (no "B:": slurmstepd signals the tasks).
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --array=1-8
#SBATCH --output=/tmp/study/out/sweeps/fm-pruning/logs/run%a_job%A.out

source /work/main/biprop_hpc/jobs/site.sh  # modules, paths and file-system settings of this machine
set -uo pipefail  # no -e: the exit code of the training step decides what happens next
cd /work/main
export OMP_NUM_THREADS=1
BIPROP=(/work/main/.venv/bin/python -m biprop_hpc)
MAX_RESTARTS=3
RESTARTS=${SLURM_RESTART_COUNT:-0}
INDEX=$SLURM_ARRAY_TASK_ID
JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
export BIPROP_JOB_ID=$JOB  # the ranks record it in their archive
# The ranks also stop by themselves 300 s before the job's end, should the warning not reach them:
# SLURM_JOB_END_TIME (Slurm 23.02 and later), else squeue's end time (%e), in unix seconds.
unset BIPROP_STOP_AT
END=${SLURM_JOB_END_TIME:-}
if [[ -z $END ]]; then
    WHEN=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)
    [[ $WHEN =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T ]] && END=$(date -d "$WHEN" +%s 2>/dev/null)
fi
[[ $END =~ ^[0-9]+$ ]] && export BIPROP_STOP_AT=$((END - 300))

# `biprop train` arguments of each run (its run directory in the comment above it).
case $INDEX in
    # /tmp/study/out/conv2_mpt1-32/keep=0.05/seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=layerwise
    1) RUN=(--config /work/main/biprop_hpc/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/study/out --device cpu --threads 1 --train-subset 10000 --width-mult 0.25 --prune-rate-epoch 2 --epochs 4 --pruning layerwise --keep-ratio 0.05 --name seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=layerwise) ;;
    # /tmp/study/out/conv2_mpt1-32/keep=0.1/seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=layerwise
    2) RUN=(--config /work/main/biprop_hpc/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/study/out --device cpu --threads 1 --train-subset 10000 --width-mult 0.25 --prune-rate-epoch 2 --epochs 4 --pruning layerwise --keep-ratio 0.1 --name seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=layerwise) ;;
    # /tmp/study/out/conv2_mpt1-32/keep=0.2/seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=layerwise
    3) RUN=(--config /work/main/biprop_hpc/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/study/out --device cpu --threads 1 --train-subset 10000 --width-mult 0.25 --prune-rate-epoch 2 --epochs 4 --pruning layerwise --keep-ratio 0.2 --name seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=layerwise) ;;
    # /tmp/study/out/conv2_mpt1-32/keep=0.5/seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=layerwise
    4) RUN=(--config /work/main/biprop_hpc/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/study/out --device cpu --threads 1 --train-subset 10000 --width-mult 0.25 --prune-rate-epoch 2 --epochs 4 --pruning layerwise --keep-ratio 0.5 --name seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=layerwise) ;;
    # /tmp/study/out/conv2_mpt1-32/keep=0.05/seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=global
    5) RUN=(--config /work/main/biprop_hpc/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/study/out --device cpu --threads 1 --train-subset 10000 --width-mult 0.25 --prune-rate-epoch 2 --epochs 4 --pruning global --keep-ratio 0.05 --name seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=global) ;;
    # /tmp/study/out/conv2_mpt1-32/keep=0.1/seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=global
    6) RUN=(--config /work/main/biprop_hpc/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/study/out --device cpu --threads 1 --train-subset 10000 --width-mult 0.25 --prune-rate-epoch 2 --epochs 4 --pruning global --keep-ratio 0.1 --name seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=global) ;;
    # /tmp/study/out/conv2_mpt1-32/keep=0.2/seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=global
    7) RUN=(--config /work/main/biprop_hpc/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/study/out --device cpu --threads 1 --train-subset 10000 --width-mult 0.25 --prune-rate-epoch 2 --epochs 4 --pruning global --keep-ratio 0.2 --name seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=global) ;;
    # /tmp/study/out/conv2_mpt1-32/keep=0.5/seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=global
    8) RUN=(--config /work/main/biprop_hpc/configs/fashion-mnist/conv2_mpt1-32.yaml --out /tmp/study/out --device cpu --threads 1 --train-subset 10000 --width-mult 0.25 --prune-rate-epoch 2 --epochs 4 --pruning global --keep-ratio 0.5 --name seed0_train_subset=10000_width_mult=0.25_prune_rate_epoch=2_epochs=4_pruning=global) ;;
    *) echo "no run for index $INDEX" >&2; exit 2 ;;
esac

echo "$(date -Is) job $JOB on $(hostname): run $INDEX, restart $RESTARTS (at most $MAX_RESTARTS)"
if [[ -n ${BIPROP_STOP_AT:-} ]]; then
    echo "$(date -Is) the ranks stop by themselves at $(date -d "@$BIPROP_STOP_AT" -Is) if no warning came before"
else
    echo "$(date -Is) the job's end is unknown: only the warning signal stops the ranks before it"
fi
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
