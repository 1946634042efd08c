"""What a run tells its log: progress lines where no terminal shows tqdm's bar, and rank 0's log kept in the run.

A batch job's stderr is a file, and tqdm draws its bar only on a terminal, so there rank 0 writes one progress
line every `log_interval` steps or `log_seconds` seconds, whichever comes first (EpochProgress). The loss in it
is read from the device only on those steps. `RunLog` copies rank 0's log records into <run dir>/run.log.
"""
from __future__ import annotations

import logging
import math
import time
from itertools import accumulate
from pathlib import Path

RUN_LOG = "run.log"


def duration(seconds: float) -> str:
    """`H:MM:SS` (`?` when not known yet)."""
    if not math.isfinite(seconds):  # no rate measured yet
        return "?"
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class EpochProgress:
    """Rank 0's progress lines through one epoch of training.

    `sizes` are the global batch sizes of the epoch's steps, so the image rate is that of all ranks without a
    collective. Times are this process's wall clock: `run_started` is when it began the run (a continuation
    counts from its own start), `epoch_seconds` the wall time of a whole epoch (training, validation and
    checkpoint) measured in this process, or None before its first one ends (then the training time of a whole
    epoch at the current rate is used, without validation), and `done_seconds` the training time the epoch had
    before this process (a mid-epoch continuation).
    """

    def __init__(self, epoch: int, epochs: int, sizes: list[int], first: int, every_steps: int,
                 every_seconds: float, run_started: float, epoch_seconds: float | None = None,
                 done_seconds: float = 0.0, clock=time.monotonic):
        self.epoch, self.epochs = epoch, epochs
        self.images = list(accumulate(sizes, initial=0))  # images[s]: global images in the epoch's first s steps
        self.first = first
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.run_started, self.epoch_seconds, self.done_seconds = run_started, epoch_seconds, done_seconds
        self.clock = clock
        self.start = clock()
        self.last_step, self.last_time = first, self.start

    def due(self, done: int) -> bool:
        """Is a line due after `done` steps of the epoch? (log_seconds 0: only every log_interval steps)"""
        return (done - self.last_step >= self.every_steps
                or 0 < self.every_seconds <= self.clock() - self.last_time)

    def line(self, done: int, loss: float, lr: float) -> str:
        """The line after `done` steps; `loss` is rank 0's mean training loss over the epoch so far."""
        now = self.clock()
        self.last_step, self.last_time = done, now
        seconds = now - self.start
        images = self.images[done] - self.images[self.first]
        rate = images / seconds if seconds > 0 else 0.0
        epoch_left = (self.images[-1] - self.images[done]) / rate if rate else float("nan")
        whole_epoch = self.epoch_seconds or (self.images[-1] / rate if rate else float("nan"))
        run_left = epoch_left + (self.epochs - self.epoch - 1) * whole_epoch
        return (f"epoch {self.epoch + 1}/{self.epochs}  step {done}/{len(self.images) - 1}  train loss {loss:.4f}  "
                f"{rate:.0f} img/s  lr {lr:.4g}  epoch {duration(self.done_seconds + seconds)} elapsed, "
                f"{duration(epoch_left)} left  run {duration(now - self.run_started)} elapsed, "
                f"{duration(run_left)} left")


def start_line(run_dir: Path, places: list[tuple[str, str]], loader: str, steps: int, global_batch: int,
               epochs: int, epoch: int, step: int, config_name: str) -> str:
    """The run's first line: where it is, on which ranks, hosts and devices (`places`: (host, device) per rank,
    in rank order), how its data is read and where it starts."""
    hosts: dict[str, list[str]] = {}
    for host, device in places:
        hosts.setdefault(host, []).append(device)
    where = ", ".join(f"{host} [{' '.join(devices)}]" for host, devices in hosts.items())
    start = "from the start" if (epoch, step) == (0, 0) else f"continuing at epoch {epoch + 1}, step {step}"
    return (f"run {run_dir}: {len(places)} rank(s) on {where}; loader {loader}; {steps} steps per epoch of "
            f"{global_batch} images; {epochs} epochs, {start}; config {config_name} (the config file's name)")


class _Held(logging.Handler):
    """Keeps records in memory until the run log is opened."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunLog:
    """Rank 0's copy of `logger`'s records in <directory>/run.log, appended across continuations.

    Attached when the run directory is claimed; until `open()` (when the run starts writing its directory) the
    records are held in memory, so a start that is refused or finds the run completed leaves the directory as it
    was. The handler only adds a file: records still reach stderr once, through the root logger.
    """

    def __init__(self, logger: logging.Logger, directory: Path):
        self.logger, self.path = logger, directory / RUN_LOG
        # With no handler configured (the package used as a library), warnings reach stderr through logging's
        # last resort, which a handler of ours would silence: it is kept beside ours then.
        self.fallback = None if logger.hasHandlers() else logging.lastResort
        if self.fallback:
            logger.addHandler(self.fallback)
        self.handler: logging.Handler = _Held()
        logger.addHandler(self.handler)

    def open(self) -> None:
        held = self.handler
        file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        for record in held.records:
            file.handle(record)
        self.logger.removeHandler(held)
        self.logger.addHandler(file)
        self.handler = file

    def write_only(self, level: int, message: str, exc_info=None) -> None:
        """A record for run.log alone (what the caller leaves to others to print on stderr, e.g. a traceback)."""
        self.handler.handle(self.logger.makeRecord(self.logger.name, level, __file__, 0, message, (), exc_info))

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
        if self.fallback:
            self.logger.removeHandler(self.fallback)
