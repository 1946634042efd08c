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

Naming the rank a hang waits for: a stopped rank says nothing, and Horovod cannot name it either (above). So every
rank also keeps a heartbeat (`Heartbeats`): a thread of its own touches the file `heartbeats/rank_R` in the run
directory (its content: the rank's host) every `heartbeat_interval(timeout)` s (a tenth of the timeout, at most
30 s: 1000 ranks make about 33 small metadata writes a second on the shared file system). A live rank keeps
beating while its main thread waits in a collective or is stuck elsewhere; a stopped process, or every rank of a
lost node, does not. When a waiting rank's watchdog fires, it reads the others' heartbeats and names those silent
for over SILENT_BEATS intervals, with their hosts. Each rank sets its file's modification time from its own clock
(utime with explicit times, not the file server's time), so an age is the reader's clock minus the writer's at
its last beat: only the nodes' clock offset (NTP: far under a second) enters. The thread that beats and the
reading at the end each run beside the watchdog's own thread, so a file system that hangs cannot keep the
watchdog from ending the job.

The start-up (Run.__init__ up to the first collective of fit: data, model, resume broadcasts) is watched too, but
may rightly take long (torch's first imports, an extension's first build), so there only a waiting rank that
finds a silent rank ends the job (`start(start_up=True)`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from biprop_hpc.train.stopping import HUNG_EXIT

log = logging.getLogger("biprop_hpc")

LAST_WORDS_SECONDS = 30.0  # at most this long for the line and the archive before the process ends anyway
HEARTBEAT_DIR = "heartbeats"  # in the run directory: one file per rank, rank_R (multi-rank runs only)
SILENT_BEATS = 3  # a rank whose heartbeat is older than this many intervals is silent: stopped, or its node lost
READ_HEARTBEATS_SECONDS = 10.0  # at most this long for reading the others' heartbeats when the watchdog fires
SHOWN_SILENT = 8  # the line names at most this many silent ranks (a lost node of a large job: all of its ranks)
NO_HEARTBEAT = "no heartbeat since this job started: stuck in start-up, or its node was lost"
UNNAMED = "another rank, which is stopped or stuck (Horovod's stall warning above, if any, names it)"


def heartbeat_interval(timeout: float) -> float:
    """Seconds between two heartbeats of a rank: a tenth of the timeout, at most 30 (at least 0.05)."""
    return min(30.0, max(0.05, timeout / 10))


class Heartbeats:
    """This rank's heartbeat file and the ages of the others' (see the module's docstring).

    `directory` is shared by all ranks (the run directory's HEARTBEAT_DIR); rank 0 empties it when it claims the
    run directory, before any other rank knows it, so a file there is this job's.
    """

    def __init__(self, directory: Path, rank: int, size: int, host: str, clock: Callable[[], float] = time.time):
        self.directory, self.rank, self.size, self.host = Path(directory), rank, size, host
        self._clock, self._written = clock, False

    def path(self, rank: int) -> Path:
        return self.directory / f"rank_{rank}"

    def beat(self) -> None:
        """A sign of life: the file's modification time is now (the first beat writes the host into it)."""
        if not self._written:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path(self.rank).write_text(self.host)
            self._written = True
        now = self._clock()
        os.utime(self.path(self.rank), (now, now))

    def ages(self) -> dict[int, tuple[str | None, float | None]]:
        """Every other rank: (its host, seconds since its last heartbeat); (None, None) without a heartbeat file."""
        now, seen = self._clock(), {}
        for rank in range(self.size):
            if rank != self.rank:
                try:
                    seen[rank] = (self.path(rank).read_text().strip() or None, now - self.path(rank).stat().st_mtime)
                except FileNotFoundError:
                    seen[rank] = (None, None)
        return seen


def reset_heartbeats(run_dir: Path) -> None:
    """Rank 0, claiming the run directory: an empty heartbeat directory (files of earlier jobs would be stale)."""
    directory = Path(run_dir) / HEARTBEAT_DIR
    for old in directory.glob("rank_*"):
        old.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)


def silent_ranks(ages: dict[int, tuple[str | None, float | None]], interval: float) -> list[tuple[int, str | None,
                                                                                                  float | None]]:
    """(rank, host, age) of each rank whose heartbeat is older than SILENT_BEATS intervals, or missing."""
    return [(rank, host, age) for rank, (host, age) in sorted(ages.items())
            if age is None or age > SILENT_BEATS * interval]


def name_silent(silent: list[tuple[int, str | None, float | None]], size: int) -> str:
    """What a waiting rank waits for, from silent_ranks: "rank 3 of 4 on node2, silent for 95 s (...)"."""
    if not silent:
        return ("another rank, though every rank's heartbeat is fresh: one is alive but stuck outside the "
                "collectives (its own line says so; Horovod's stall warning above, if any, names it)")
    named = []
    for rank, host, age in silent[:SHOWN_SILENT]:
        if age is None:
            named.append(f"rank {rank} of {size} ({NO_HEARTBEAT})")
        else:
            named.append(f"rank {rank} of {size} on {host or 'an unknown host'}, silent for {age:.0f} s")
    more = f" and {len(silent) - SHOWN_SILENT} more silent ranks" if len(silent) > SHOWN_SILENT else ""
    return f"{'; '.join(named)}{more} (no heartbeat: stopped, or its node is lost)"


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
        self.heartbeats: Heartbeats | None = None  # set by attach(): then the line names the silent ranks
        self.start_up = False  # see start()

    def attach(self, heartbeats: Heartbeats) -> None:
        """Keep `heartbeats` from now on (its first beat now; then its own thread, from start())."""
        heartbeats.beat()
        self.heartbeats = heartbeats
        if self._thread is not None:
            self._start_beating()

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

    def hung(self, waited_for: str | None = None) -> str | None:
        """The line to log when no progress came for `timeout` seconds, else None. `waited_for`: the rank(s) a
        waiting rank waits for (name_silent), when the heartbeats were read."""
        idle = self._clock() - self._last
        if self.timeout <= 0 or idle < self.timeout:
            return None
        if self._waiting:
            what = f"waiting in {self._doing} for {waited_for or UNNAMED}"
        else:
            what = f"busy in {self._doing}, not waiting for other ranks: this rank is the stuck one"
        return (f"{self.where}: no progress for {idle:.0f} s (hang_timeout {self.timeout:g} s), {what}; "
                f"ending the job (exit {HUNG_EXIT})")

    def start(self, start_up: bool = False) -> "Watchdog":
        """Watch from now on (timeout 0: never). `start_up`: until it is set False, the job is ended only for a
        silent rank (one whose heartbeat stopped), not for a busy or waiting one."""
        self.start_up = start_up
        self.progress()  # also at the end of the start-up: the run's own time starts now
        if self.timeout > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="biprop-watchdog", daemon=True)
            self._thread.start()
            if self.heartbeats is not None:
                self._start_beating()
        return self

    def _start_beating(self) -> None:
        threading.Thread(target=self._beat, args=(self.heartbeats,), name="biprop-heartbeat", daemon=True).start()

    def _beat(self, heartbeats: Heartbeats) -> None:
        interval, failed = heartbeat_interval(self.timeout), False
        while not self._stopped.wait(interval):
            try:
                heartbeats.beat()
            except OSError as error:  # said once; the others may then name this rank as silent
                if not failed and not self._stopped.is_set():
                    log.warning("%s: cannot write its heartbeat %s: %s", self.where, heartbeats.path(heartbeats.rank),
                                error)
                failed = True

    def waited_for(self) -> tuple[bool, str | None]:
        """(whether a rank is silent, the text naming what this waiting rank waits for: name_silent), from the
        heartbeats, read in a thread of its own for at most READ_HEARTBEATS_SECONDS; (False, None) for a rank
        not waiting or without heartbeats."""
        heartbeats = self.heartbeats
        if heartbeats is None or not self._waiting:
            return False, None
        answer: list = []

        def read() -> None:
            try:
                silent = silent_ranks(heartbeats.ages(), heartbeat_interval(self.timeout))
                answer.append((bool(silent), name_silent(silent, heartbeats.size)))
            except OSError as error:
                answer.append((False, f"{UNNAMED}; the heartbeats could not be read: {error}"))

        reader = threading.Thread(target=read, name="biprop-watchdog-heartbeats", daemon=True)
        reader.start()
        reader.join(READ_HEARTBEATS_SECONDS)
        return answer[0] if answer else (False, f"{UNNAMED}; the heartbeats in {heartbeats.directory} gave no "
                                                f"answer in {READ_HEARTBEATS_SECONDS:g} s")

    def stop(self) -> None:
        self._stopped.set()
        if self.heartbeats is not None:  # a finished rank is not a silent one
            with contextlib.suppress(OSError):
                self.heartbeats.path(self.heartbeats.rank).unlink()

    def _watch(self) -> None:
        poll = min(5.0, max(0.05, self.timeout / 10))  # the job ends within timeout + poll (+ last words)
        look_again = 0.0  # in the start-up: when to read the heartbeats again
        while not self._stopped.wait(poll):
            if self.hung() is None or self._clock() < look_again:
                continue
            silent, waited_for = self.waited_for()
            if self.start_up and not silent:
                # The start-up may rightly take long (torch's first imports take seconds, an extension's first
                # build half a minute): there only a silent rank ends the job. Looked at again after `timeout`.
                look_again = self._clock() + self.timeout
                continue
            message = self.hung(waited_for)
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
