"""Stopping a run on a scheduler's signal without losing work.

Batch schedulers warn a job before its time limit (SLURM `--signal=USR1@120`, LSF `-wa USR1 -wt 2`)
and send SIGTERM at the limit or on preemption. `StopRequests` catches SIGUSR1 and SIGTERM: its handler
only records which signal arrived (doing I/O inside a handler can deadlock). A warning may never come (Flux
gives a batch job none that is safe on several nodes), so the job scripts also read the job's end from the
scheduler and export BIPROP_STOP_AT, the unix time at which the ranks stop by themselves (the end less the
warning time); once it has passed, `reason` says so as if a signal had come. The training loop looks at
`reason` at every optimizer-step boundary; the ranks agree on the step at which they stop through a tiny
allreduce started one step earlier (so nobody waits for it), rank 0 writes a mid-epoch checkpoint and every
rank exits with CHECKPOINTED_EXIT, which the job scripts read as "requeue me": `--resume auto` then
continues from that step, and the run ends with the metrics an uninterrupted run would have.

Exit codes of `biprop train`:
  0    completed (or already completed: nothing was touched)
  1    failed (an exception on some rank; the launcher ends the job)
  2    bad input (config, data, paths, a run directory that already holds a run)
  75   checkpointed after SIGUSR1/SIGTERM or at BIPROP_STOP_AT: continue it with `--resume auto`
       (EX_TEMPFAIL)
  124  hung: a rank made no progress for `hang_timeout` seconds (its watchdog, train/watchdog.py, logged where
       it waits and ended it); the last checkpoint stays: continue with `--resume auto` (as timeout(1)'s 124)
  130  interrupted by Ctrl-C (SIGINT); the last end-of-epoch checkpoint stays
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time

CHECKPOINTED_EXIT = 75
HUNG_EXIT = 124
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
DEADLINE_VAR = "BIPROP_STOP_AT"   # unix seconds; the job scripts set it (jobs/*.sh.j2)
DEADLINE_REASON = f"deadline before the time limit ({DEADLINE_VAR})"


class RunCheckpointed(Exception):
    """The run stopped on a signal after writing a checkpoint it can be continued from."""

    def __init__(self, reason: str, epoch: int, step: int):
        super().__init__(f"{reason}: checkpointed at epoch {epoch + 1}, step {step}; continue with --resume auto")
        self.reason, self.epoch, self.step = reason, epoch, step


class StopRequests:
    """The first stop request: a stop signal, or the deadline BIPROP_STOP_AT once it has passed.

    `reason` is the signal's name (e.g. "SIGUSR1"), DEADLINE_REASON, or None while the run may go on.
    """

    def __init__(self, environ=os.environ, clock=time.time):
        self.stop_at = deadline(environ)
        self._clock = clock
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        if self._reason is None and self.stop_at is not None and self._clock() >= self.stop_at:
            self._reason = DEADLINE_REASON
        return self._reason

    @reason.setter
    def reason(self, value: str | None) -> None:  # a test may ask for a stop as a signal would
        self._reason = value

    def install(self) -> "StopRequests":
        """Catch the stop signals (only possible in the main thread; elsewhere they keep their handlers)."""
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self._reason is None:
            self._reason = signal.Signals(signum).name


def deadline(environ=os.environ) -> float | None:
    """BIPROP_STOP_AT as unix seconds; None when unset or empty. ValueError names a value that is no time."""
    text = environ.get(DEADLINE_VAR, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{DEADLINE_VAR}={text!r} is not a time: give unix seconds (date +%s), or unset it")
    return value
