"""A hung rank ends the job: each rank's watchdog.

A rank that is stopped (SIGSTOP, a frozen node) or stuck (a dead file system, a deadlocked data loader) leaves
every other rank waiting in a collective for ever, and the job burns its allocation until the wall limit. Each
rank's `Watchdog` records the time of its last progress (a training batch, an optimizer step, an evaluation
batch, a checkpoint file, a collective that completed) and what the rank is doing or waiting in since. A daemon
thread looks every `poll` seconds; once no progress came for `timeout` seconds (the config's `hang_timeout`) it
logs ONE line naming this rank, its host and what it waits in, lets `last_words` record it (rank 0: the
archive), and ends the process with HUNG_EXIT, and the launcher ends the job (mpirun at once, srun after its
--wait). A rank that is stopped says nothing, of course: the ranks waiting for it do.

Why not Horovod's own stall handling alone (Horovod 0.28.1; horovod/common/controller.cc, stall_inspector.cc,
and measured here): the stall check runs on the coordinator (rank 0) between negotiation rounds, and every
round exchanges messages with every rank, so with a STOPPED rank the coordinator's background thread itself
waits in MPI, and Horovod neither warns nor shuts down, however its times are set. With a LIVE rank whose
Python is stuck, its warning (after HOROVOD_STALL_CHECK_TIME_SECONDS) lists the missing ranks, which is worth
having: dist.horovod_stall_environment sets that time to a sixth of the timeout. Its shutdown
(HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, off by default) does not end a process: the waiting ranks raise
HorovodInternalError ("Horovod has been shut down"), a generic failure; it is left off.

The watchdog thread runs while the main thread waits in a collective: Horovod's waits release the GIL.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from typing import Callable

from biprop_hpc.train.stopping import HUNG_EXIT

log = logging.getLogger("biprop_hpc")

LAST_WORDS_SECONDS = 30.0  # at most this long for the line and the archive before the process ends anyway


class Watchdog:
    """Progress of one rank, and the thread that ends the process once there is none for `timeout` s.

    `where` names the rank ("rank 1 of 4 on node7"). `last_words(message)` runs once before the end (in a
    thread of its own, given at most LAST_WORDS_SECONDS: it may block on the very thing that hangs). `end` ends
    the process (os._exit: the main thread is blocked, and interpreter shutdown could wait on it); a test gives
    its own.
    """

    def __init__(self, timeout: float, where: str, last_words: Callable[[str], None] | None = None,
                 end: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic):
        self.timeout, self.where = timeout, where
        self._last_words, self._end, self._clock = last_words, end, clock
        self._last = clock()
        self._doing, self._waiting = "starting", False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self, doing: str | None = None) -> None:
        """Progress now; `doing`: what the rank does from now on (else as before)."""
        self._last = self._clock()
        if doing is not None:
            self._doing, self._waiting = doing, False

    @contextlib.contextmanager
    def waiting(self, collective: str):
        """Around a call that waits for the other ranks; its completion is progress."""
        before = self._doing
        self._doing, self._waiting = collective, True
        try:
            yield
        finally:
            self.progress(before)

    def hung(self) -> str | None:
        """The line to log when no progress came for `timeout` seconds, else None."""
        idle = self._clock() - self._last
        if self.timeout <= 0 or idle < self.timeout:
            return None
        if self._waiting:
            what = (f"waiting in {self._doing} for another rank, which is stopped or stuck (Horovod's stall "
                    "warning above, if any, names it)")
        else:
            what = f"busy in {self._doing}, not waiting for other ranks: this rank is the stuck one"
        return (f"{self.where}: no progress for {idle:.0f} s (hang_timeout {self.timeout:g} s), {what}; "
                f"ending the job (exit {HUNG_EXIT})")

    def start(self) -> "Watchdog":
        """Watch from now on (timeout 0: never)."""
        if self.timeout > 0 and self._thread is None:
            self.progress()
            self._thread = threading.Thread(target=self._watch, name="biprop-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        poll = min(5.0, max(0.05, self.timeout / 10))  # the job ends within timeout + poll (+ last words)
        while not self._stopped.wait(poll):
            message = self.hung()
            if message and not self._stopped.is_set():
                self._fire(message)
                return

    def _fire(self, message: str) -> None:
        def say() -> None:
            log.error(message)
            if self._last_words:
                try:
                    self._last_words(message)
                except Exception:  # the end comes anyway; say why the record is missing
                    log.exception("%s: could not record the hang", self.where)

        speaker = threading.Thread(target=say, name="biprop-watchdog-last-words", daemon=True)
        speaker.start()
        speaker.join(LAST_WORDS_SECONDS)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        self._end(HUNG_EXIT)


class WatchedContext:
    """A distributed context (dist.Local / HorovodContext) whose collectives tell `watchdog` what they wait in;
    everything else is the context's own."""

    def __init__(self, ctx, watchdog: Watchdog):
        self._ctx, self._watchdog = ctx, watchdog

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def allreduce_sum(self, tensor, name=None):
        with self._watchdog.waiting(f"allreduce '{name}'"):
            return self._ctx.allreduce_sum(tensor, name)

    def any_async(self, flag: bool, name: str):
        wait = self._ctx.any_async(flag, name)

        def watched_wait():
            with self._watchdog.waiting(f"allreduce '{name}'"):
                return wait()
        return watched_wait

    def broadcast_object(self, obj, name: str):
        with self._watchdog.waiting(f"broadcast '{name}'"):
            return self._ctx.broadcast_object(obj, name)

    def gather_object(self, obj, name: str) -> list:
        with self._watchdog.waiting(f"allgather '{name}'"):
            return self._ctx.gather_object(obj, name)

    def broadcast_model(self, model) -> None:
        with self._watchdog.waiting("broadcast 'model'"):
            self._ctx.broadcast_model(model)

    def broadcast_optimizer(self, optimizer) -> None:
        with self._watchdog.waiting("broadcast 'optimizer_state'"):
            self._ctx.broadcast_optimizer(optimizer)

    def average_batchnorm(self, model) -> None:
        with self._watchdog.waiting("allreduce 'batchnorm_statistics'"):
            self._ctx.average_batchnorm(model)


def rank_on_host(rank: int, size: int) -> str:
    """How a watchdog line names its process: "rank 1 of 4 on node7"."""
    host = socket.gethostname()
    return f"rank {rank} of {size} on {host}" if size > 1 else f"the process on {host}"
