#!/usr/bin/env bash
# The main job on the embedded default data: prepare the Fashion-MNIST JPEG tree once, then search a
# ticket with 2 Horovod ranks under mpirun (DALI CPU pipelines without a GPU).
#   bash jobs/run-default.sh [extra biprop train flags, e.g. --epochs 2]
# Run again, it continues the run if it was interrupted, or prints the finished run's result and exits 0
# (--resume auto); with --new-name it starts another run in the next free runs/default/keep=0.5/seed0_N.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BIPROP_VENV:-.venv}"
RANKS="${RANKS:-2}"
TREE=data/fashion-mnist-jpeg
if [[ ! -f $TREE/filelist/test.txt ]]; then
    "$VENV/bin/biprop" data prepare fashion-mnist --out "$TREE" --force
fi
# Open MPI refuses to run as root unless told that it is meant.
[[ $(id -u) -eq 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
RESUME=(--resume auto)
for arg in "$@"; do
    if [[ $arg == --new-name ]]; then RESUME=(); fi  # --resume auto would continue (or report) seed0 instead
done
exec mpirun -np "$RANKS" --bind-to none "$VENV/bin/biprop" train --config configs/fashion-mnist/default.yaml \
    "${RESUME[@]}" "$@"
