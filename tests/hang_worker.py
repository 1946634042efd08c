"""Run by tests/test_hang.py under a real mpirun: `biprop train` (cli.main, the real path) with one fault.

usage: hang_worker.py OUT_DIR MODE [biprop train flags ...]
  stop:S:R rank R stops itself with SIGSTOP right after its S-th optimizer step, after writing OUT/stopped (its
           pid), as a frozen node or `kill -STOP` would leave it
  startup:R  rank R stops itself the same way in the start-up, as it builds the data (after the run directory
           is known, before the resume broadcasts)
  stuck:S  rank 1's Python blocks (a long sleep) right after its S-th optimizer step, outside any collective, as
           a deadlocked data loader or a dead file system would leave it; its Horovod thread lives on
  slow:T   every rank sleeps T seconds after each optimizer step and each validation batch: slow, but live
Every rank writes its pid to OUT/pid_<rank> first, so the test can end what is left if the job hangs. The rank is
Open MPI's (mpirun) or Slurm's (srun --mpi=pmix sets no OMPI_ variables).
"""
import os
import signal
import sys
import time
from pathlib import Path

import biprop_hpc.train.loop as loop
from biprop_hpc import cli
from biprop_hpc.train import Run


def main(out_dir, mode, *train_args):
    out = Path(out_dir)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID") or "0")
    (out / f"pid_{rank}").write_text(str(os.getpid()))
    kind, value, *stopping = mode.split(":")

    def stop_here():
        (out / "stopped").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)

    if kind == "startup" and rank == int(value):
        build_data = loop.build_data

        def stopping_build_data(*args):
            stop_here()
            return build_data(*args)

        loop.build_data = stopping_build_data
    step_once, steps = Run._optimizer_step, []

    def step(self):
        step_once(self)
        steps.append(1)
        if kind == "stop" and rank == int(stopping[0]) and len(steps) == int(value):
            stop_here()
        if kind == "slow":
            time.sleep(float(value))

    Run._optimizer_step = step
    heartbeat = Run._heartbeat

    def stuck_heartbeat(self):  # called after each optimizer step, outside the step's collective
        heartbeat(self)
        if kind == "stuck" and rank == 1 and len(steps) == int(value):
            time.sleep(3600)

    Run._heartbeat = stuck_heartbeat
    if kind == "slow":
        evaluate = loop.evaluate

        def slow_batches(batches):
            for batch in batches:
                yield batch
                time.sleep(float(value))

        def slow_evaluate(model, batches, *args):
            return evaluate(model, slow_batches(batches), *args)

        loop.evaluate = slow_evaluate
    return cli.main(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
