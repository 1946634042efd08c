"""One writer per run directory: a lock file held for the life of a run.

`<run dir>/run.lock` is created with O_CREAT | O_EXCL, which is atomic on local file systems and on Lustre,
GPFS and NFS (v3 and later) alike, where flock/fcntl locks are often missing or not shared between nodes.
It holds who has it (host, pid, the scheduler's job id, start time, a random token) as JSON; its
modification time is the holder's heartbeat, refreshed by a daemon thread every `refresh_seconds` as long
as the process lives. A second writer is refused (RunLocked, exit 2) and changes nothing. A lock whose
holder is provably gone is taken over, with a log line naming it:
  - the holder ran on this host and its pid is no longer alive, or
  - its heartbeat is older than `stale_seconds` (the holder's host died, or the process was SIGKILLed).
A lock whose heartbeat is already late (older than 3 refresh intervals), or that an earlier incarnation of
this very job holds (the same scheduler job id: a requeue after a node failure), is waited for until its
heartbeat goes stale, instead of being refused at once. The lock is also given back when the interpreter exits
normally without `release()` (atexit).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from biprop_hpc.config import ConfigError
from biprop_hpc.dist import scheduler_job_id

log = logging.getLogger("biprop_hpc")

LOCK_NAME = "run.lock"
REFRESH_SECONDS = 15.0
STALE_SECONDS = 120.0


class RunLocked(ConfigError):
    """Another live process holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    def __init__(self, directory: Path, stale_seconds: float = STALE_SECONDS,
                 refresh_seconds: float = REFRESH_SECONDS):
        self.path = Path(directory) / LOCK_NAME
        self.stale_seconds, self.refresh_seconds = stale_seconds, refresh_seconds
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": scheduler_job_id(),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "token": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._made: list[Path] = []
        self._thread: threading.Thread | None = None

    # --- taking and giving back ------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        # The directories made here are removed again at release if nothing was written into them, so a run
        # refused or failing at start leaves no trace.
        self._made = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None
        while not self._create():
            other, age = self._read()
            gone = self._gone(other, age)
            if gone:
                log.warning("%s: taking over the lock of %s (%s)", self.path.parent, _who(other), gone)
                self._remove_if(other)
                continue
            late = age > 3 * self.refresh_seconds
            if late or (other and self.holder["job_id"] and other.get("job_id") == self.holder["job_id"]):
                # Most likely dead (or an earlier incarnation of this job, which cannot still run): wait for
                # the heartbeat to go stale rather than failing a requeue or resubmission.
                deadline = deadline or time.monotonic() + self.stale_seconds + self.refresh_seconds
                if time.monotonic() < deadline:
                    time.sleep(min(self.refresh_seconds, 5.0))
                    continue
            raise RunLocked(f"{self.path.parent} is in use by {_who(other)} (lock {self.path}, heartbeat "
                            f"{age:.0f} s ago): one run directory takes one writer. Wait for that run to end, "
                            "or give this run another --name; a lock whose holder died is taken over once its "
                            f"heartbeat is {self.stale_seconds:.0f} s old")
        self._thread = threading.Thread(target=self._refresh, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return self

    def release(self) -> None:
        atexit.unregister(self.release)
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        self._remove_if(self.holder)
        for directory in self._made:  # deepest first
            try:
                directory.rmdir()
            except OSError:  # not empty (the run wrote files), or made by someone else meanwhile
                break
        self._made = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- the file ----------------------------------------------------------------------------------
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self.holder, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _read(self) -> tuple[dict | None, float]:
        """The holder's record (None if unreadable: being written, or damaged) and its heartbeat's age."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, 0.0
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        return (record if isinstance(record, dict) else None), age

    def _gone(self, other: dict | None, age: float) -> str:
        """Why the holder is provably gone, or "" if it may be alive."""
        if age > self.stale_seconds:
            return f"no heartbeat for {age:.0f} s"
        if other and other.get("host") == self.holder["host"] and isinstance(other.get("pid"), int) \
                and not _pid_alive(other["pid"]):
            return f"process {other['pid']} on this host has ended"
        return ""

    def _remove_if(self, expected: dict | None) -> None:
        """Remove the lock if it still is the one `expected` describes (not a newer holder's)."""
        current, _ = self._read()
        if current is None and expected is not None and self.path.exists():
            return
        if current is None or expected is None or current.get("token") == expected.get("token"):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            current, _ = self._read()
            if not current or current.get("token") != self.holder["token"]:
                log.error("%s: this run's lock was taken over by %s; another process now writes this run "
                          "directory", self.path.parent, _who(current))
                return
            try:
                os.utime(self.path)
            except OSError as error:
                log.warning("%s: could not refresh the lock's heartbeat (%s)", self.path, error)


def _who(record: dict | None) -> str:
    if not record:
        return "another process (its lock file is unreadable)"
    job = f", job {record['job_id']}" if record.get("job_id") else ""
    return f"pid {record.get('pid')} on {record.get('host')}{job}, since {record.get('started')}"
