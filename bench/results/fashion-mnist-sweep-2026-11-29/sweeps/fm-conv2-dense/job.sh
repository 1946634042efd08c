#!/bin/bash
# BIPROP ticket search for SLURM, rendered by `biprop jobs` from jobs/slurm.sh.j2 on 2026-11-29T18:42:21+00:00.
# 2 run(s), one per array index; manifest: /tmp/fm-sweep/sweeps/fm-conv2-dense/manifest.json
# It may be edited and submitted by hand: sbatch /tmp/fm-sweep/sweeps/fm-conv2-dense/job.sh
#SBATCH --job-name=fm-conv2-dense
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=0-02:00:00
# USR1 to every training task 300 s before the time limit (no "B:": slurmstepd signals the tasks).
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --array=1-2
#SBATCH --output=/tmp/fm-sweep/sweeps/fm-conv2-dense/logs/run%a_job%A.out

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
    # /tmp/fm-sweep/conv2_dense/keep=0.5/seed0
    1) RUN=(--config /work/main/configs/fashion-mnist/conv2_dense.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --seed 0) ;;
    # /tmp/fm-sweep/conv2_dense/keep=0.5/seed1
    2) RUN=(--config /work/main/configs/fashion-mnist/conv2_dense.yaml --out /tmp/fm-sweep --device cpu --threads 1 --train-subset 20000 --width-mult 0.5 --epochs 3 --seed 1) ;;
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
