"""The README's sweep, end to end: ticket accuracy against the keep ratio on Fashion-MNIST.

Starts a real one-node Slurm cluster in a temporary directory (tests/slurm_cluster.py: munged, slurmctld and
slurmd declared with 2 CPUs, so jobs run one after the other), submits through `biprop jobs`:
  - one job array: half-width Conv2 MPT-1/32 (configs/fashion-mnist/conv2_mpt1-32.yaml) and MPT-1/1
    (conv2_mpt1-1.yaml) x keep ratio 0.1 0.2 0.4 0.5 0.6 0.8 x seeds;
  - the dense baseline (conv2_dense.yaml) per seed;
each run on 2 Horovod ranks (srun --mpi=pmix), --epochs epochs on the first --train-subset training images
(10% of them held out for validation) and the whole test set; waits for every run, then aggregates with
`biprop results OUT --group-by auto --csv --out --plot`.

  python bench/fashion_mnist_sweep.py --out bench/results/fashion-mnist-sweep     # ~35 min on 2 cores
  python bench/fashion_mnist_sweep.py --out /tmp/sweep --epochs 1 --train-subset 2000 --seeds 0  # smoke test
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm_cluster import slurm_cluster  # noqa: E402
from _sweeps import biprop, wait_for_runs  # noqa: E402

KEEP_RATIOS = "0.1,0.2,0.4,0.5,0.6,0.8"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where the runs, job files and results go")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--width-mult", default="0.5")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--out", str(out), "--width-mult", args.width_mult, "--epochs", str(args.epochs),
              "--train-subset", str(args.train_subset), "--device", "cpu", "--threads", "1",
              "--scheduler", "slurm", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
              "--time", "2h", "--sweep", f"seed={args.seeds}"]
    sweeps = [
        ["--job-name", "fm-conv2-tickets", "--sweep", "config=configs/fashion-mnist/conv2_mpt1-*.yaml",
         "--sweep", f"keep_ratio={KEEP_RATIOS}"],
        ["--job-name", "fm-conv2-dense", "--config", "configs/fashion-mnist/conv2_dense.yaml"],
    ]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="biprop-slurm-") as cluster_dir, \
            slurm_cluster(cluster_dir, cpus=2) as cluster:
        env = {**cluster.env, "OMP_NUM_THREADS": "1"}
        for sweep in sweeps:
            print(biprop("jobs", "submit", *sweep, *common, env=env), flush=True)
        manifests = [str(out / "sweeps" / sweep[1]) for sweep in sweeps]
        wait_for_runs(manifests, env, start)
        print(biprop("jobs", "status", *manifests, env=env))
    print(biprop("results", str(out), "--group-by", "auto", "--sort", "keep_ratio", "--csv",
                 str(out / "table.csv"), "--out", str(out / "summary.h5"), "--plot", str(out / "plots")))
    print(f"whole sweep: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
