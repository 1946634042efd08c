#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a GPU (about 5 minutes on one H100/H200; no DALI or Horovod
# needed): the CUDA tests (tests/test_gpu.py: exactness against the CPU reference for every mask method, no host
# sync through training steps, the graphed method's replays and recaptures, the compiled Triton kernels of the
# batched method), then the step benchmark for WideResNet-50-2 at batch 128 (the target) with the graphed and
# with the batched mask method (each row also times all three methods' masks alone).
#
#   bash bench/gpu_check.sh                   # logs in $OUT (default bench/results/gpu-check)
#   PYTHON=/opt/torch/.venv/bin/python bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU here"; print(torch.cuda.get_device_name())'
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -n 15
for method in graphed batched; do
    "$PY" bench/gpu_step.py --models wide_resnet50_2 --batches 128 --steps 5 --rounds 2 --method $method \
        2>&1 | tee "$OUT/gpu_step_$method.log"
done
