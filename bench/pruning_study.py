"""README's pruning study: layerwise against global pruning on Fashion-MNIST, clean and corrupted test accuracy.

Starts a real one-node Slurm cluster in a temporary directory (tests/slurm_cluster.py), submits ONE job array
through `biprop jobs`: the half-width Conv2 MPT-1/32 (configs/fashion-mnist/conv2_mpt1-32.yaml) x pruning
layerwise, global x keep ratio 0.05, 0.1, 0.2, 0.5, each run on 2 Horovod ranks (srun --mpi=pmix); waits for
every run; scores each run's best checkpoint (chosen on the validation split) on the 9 generated corruptions at 5
severities with `biprop evaluate --corruptions generate` under mpirun (2 ranks), which stores them in the run's
archive; then aggregates with `biprop results` (a markdown table, --layers for the per-layer kept fractions,
plots with kept_fraction/<run>.png for every global run).

  python bench/pruning_study.py --out bench/results/pruning-study      # ~35 min on 2 cores
  python bench/pruning_study.py --out /tmp/study --epochs 1 --train-subset 1000 --keep-ratios 0.1  # smoke test
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm_cluster import slurm_cluster  # noqa: E402
from _sweeps import biprop, wait_for_runs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where the runs, job files and results go")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--prune-rate-epoch", type=int, default=2,
                        help="global runs: epochs over which the kept fraction decays from 0.5 to the target")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--keep-ratios", default="0.05,0.1,0.2,0.5")
    parser.add_argument("--width-mult", default="0.25",
                        help="0.25: the 45 corrupted copies of the test set cost 45 test passes per run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    submit = ["jobs", "submit", "--job-name", "fm-pruning", "--config", "configs/fashion-mnist/conv2_mpt1-32.yaml",
              "--sweep", "pruning=layerwise,global", "--sweep", f"keep_ratio={args.keep_ratios}",
              "--prune-rate-epoch", str(args.prune_rate_epoch), "--out", str(out), "--width-mult", args.width_mult,
              "--epochs", str(args.epochs), "--train-subset", str(args.train_subset), "--device", "cpu",
              "--threads", "1", "--scheduler", "slurm", "--gpus-per-node", "0", "--tasks-per-node", "2",
              "--cpus-per-task", "1", "--time", "2h"]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="biprop-slurm-") as cluster_dir, \
            slurm_cluster(cluster_dir, cpus=2) as cluster:
        env = {**cluster.env, "OMP_NUM_THREADS": "1"}
        print(biprop(*submit, env=env), flush=True)
        manifest = str(out / "sweeps" / "fm-pruning")
        wait_for_runs([manifest], env, start)
        print(biprop("jobs", "status", manifest, env=env))
    mpirun = ["mpirun", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), "-np", "2"]
    for best in sorted(out.rglob("checkpoints/best.pt")):
        biprop("evaluate", "--checkpoint", str(best), "--device", "cpu", "--corruptions", "generate",
               launcher=mpirun, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"training and corruption scoring: {time.monotonic() - start:.0f} s", flush=True)
    table = biprop("results", str(out), "--group-by", "pruning,keep_ratio", "--sort", "keep_ratio",
                   "--format", "md", "--out", str(out / "summary.h5"), "--plot", str(out / "plots"))
    (out / "table.md").write_text(table)
    print(table)
    # the per-layer kept fractions of the global runs
    layers = biprop("results", str(out), "--filter", "pruning=global", "--sort", "keep_ratio", "--layers")
    (out / "layers.txt").write_text(layers)
    print(layers)


if __name__ == "__main__":
    main()
