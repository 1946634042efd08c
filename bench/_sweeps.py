"""What the sweep benches (fashion_mnist_sweep.py, pruning_study.py) share: running `biprop` and waiting for a
sweep's runs on the local Slurm cluster."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def biprop(*command: str, env: dict | None = None, launcher: tuple = ()) -> str:
    """`[launcher] biprop COMMAND` from the repository root, echoed; its stdout; the bench exits on a failure."""
    print("$ " + " ".join([*launcher, "biprop", *command]), flush=True)
    done = subprocess.run([*launcher, sys.executable, "-m", "biprop_hpc", *command], cwd=REPO,
                          env=env or os.environ, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def wait_for_runs(manifests: list[str], env: dict, start: float, poll: float = 30) -> None:
    """Until every run of the sweeps' manifests has finished (completed, failed or interrupted)."""
    while True:
        states = json.loads(biprop("jobs", "status", *manifests, "--json", env=env).strip().splitlines()[-1])
        runs = [run for job in states["jobs"] for run in job["runs"]]
        finished = [run for run in runs if run["state"] in ("completed", "failed", "interrupted")]
        print(f"{time.monotonic() - start:.0f} s: {len(finished)}/{len(runs)} runs finished", flush=True)
        if len(finished) == len(runs):
            return
        time.sleep(poll)
