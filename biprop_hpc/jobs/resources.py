"""What a job asks the scheduler for, as data: nodes, ranks, CPUs, time, queue, account, restarts."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from biprop_hpc.config import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TIME_FORMATS = "H:MM:SS, D-HH:MM:SS, or a number with a unit s/m/h/d (90m, 4h, 1.5h; a plain number is minutes)"


def parse_time(text: str, option: str = "--time") -> int:
    """A duration in seconds from `4:00:00`, `1-12:00:00`, `240m`, `4h`, `1.5h`, `2d` or `90` (minutes).

    `MM:SS` and `HH:MM` are refused: SLURM reads `4:00` as 4 minutes, LSF as 4 hours.
    """
    value = text.strip()
    clock = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)", value)
    if clock:
        days, hours, minutes, seconds = (int(part or 0) for part in clock.groups())
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    else:
        number = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", value)
        if not number:
            raise ConfigError(f"{option} {text!r} is not a time: use {TIME_FORMATS}")
        total = round(float(number.group(1)) * _UNITS[number.group(2) or "m"])
    if total < 1:
        raise ConfigError(f"{option} {text!r} must be longer than 0 seconds")
    return total


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int = 0      # CPU-only jobs (gpus_per_node 0): ranks per node; with GPUs one rank per GPU
    cpus_per_task: int = 1       # cores per rank (DALI threads, loader workers, OMP_NUM_THREADS)
    time_seconds: int = 3600     # the job's time limit
    queue: str = ""              # SLURM partition, LSF queue, Flux queue ("" = the site's default)
    account: str = ""            # SLURM account, LSF group (-G), Flux bank (-B) ("" = the user's default)
    warn_seconds: int = 300      # the warning signal (USR1) comes this long before the time limit
    max_restarts: int = 3        # continuations after a checkpointed stop (exit 75) before the job gives up
    max_running: int = 0         # array throttle: at most this many runs at once (0 = no limit)

    def __post_init__(self):
        if self.nodes < 1:
            raise ConfigError(f"--nodes {self.nodes}: a job needs at least 1 node")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node {self.gpus_per_node} must be >= 0")
        if self.gpus_per_node == 0 and self.tasks_per_node < 1:
            raise ConfigError("nodes x GPUs per node is 0, so the job has no rank: give --gpus-per-node N "
                              "(one rank per GPU), or --gpus-per-node 0 --tasks-per-node N for CPU-only ranks")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (0, self.gpus_per_node):
            raise ConfigError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                              "jobs run one rank per GPU; --tasks-per-node is for CPU-only jobs (--gpus-per-node 0)")
        for name in ("cpus_per_task", "time_seconds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_restarts", "max_running"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.warn_seconds < self.time_seconds:
            raise ConfigError(f"--signal-before ({self.warn_seconds} s) must be shorter than --time "
                              f"({self.time_seconds} s) and longer than 0")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def gpus_per_rank(self) -> int:
        return 1 if self.gpus_per_node else 0

    def to_dict(self) -> dict:
        return asdict(self)
