"""Stopping a run on a scheduler's signal without losing work.

Batch schedulers warn a job before its time limit (SLURM `--signal=USR1@120`, LSF `-wa USR1 -wt 2`, Flux)
and send SIGTERM at the limit or on preemption. `StopRequests` catches SIGUSR1 and SIGTERM: its handler
only records which signal arrived (doing I/O inside a handler can deadlock). The training loop looks at the
record at every optimizer-step boundary; the ranks agree on the step at which they stop through a tiny
allreduce started one step earlier (so nobody waits for it), rank 0 writes a mid-epoch checkpoint and every
rank exits with CHECKPOINTED_EXIT, which the job scripts read as "requeue me": `--resume auto` then
continues from that step, and the run ends with the metrics an uninterrupted run would have.

Exit codes of `biprop train`:
  0    completed (or already completed: nothing was touched)
  1    failed (an exception on some rank; the launcher ends the job)
  2    bad input (config, data, paths, a run directory that already holds a run)
  75   checkpointed after SIGUSR1/SIGTERM: continue it with `--resume auto` (EX_TEMPFAIL)
  130  interrupted by Ctrl-C (SIGINT); the last end-of-epoch checkpoint stays
"""
from __future__ import annotations

import signal
import threading

CHECKPOINTED_EXIT = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class RunCheckpointed(Exception):
    """The run stopped on a signal after writing a checkpoint it can be continued from."""

    def __init__(self, reason: str, epoch: int, step: int):
        super().__init__(f"{reason}: checkpointed at epoch {epoch + 1}, step {step}; continue with --resume auto")
        self.reason, self.epoch, self.step = reason, epoch, step


class StopRequests:
    """Records the first stop signal received; `reason` is its name (e.g. "SIGUSR1") or None."""

    def __init__(self):
        self.reason: str | None = None

    def install(self) -> "StopRequests":
        """Catch the stop signals (only possible in the main thread; elsewhere they keep their handlers)."""
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
