"""What differs between SLURM, LSF and Flux outside the job templates: time and array syntax, the submit
command and how its output names the job, and how to ask the scheduler about a job.

A run's job id is the id the scheduler shows for it: `123_4` (SLURM array task), `77[4]` (LSF array element),
the Flux id of its `--cc` copy (F58 with an ASCII "f"), or the plain id of a one-run job.
"""
from __future__ import annotations

import contextlib
import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from biprop_hpc.config import ConfigError

QUEUED, RUNNING, ENDED = "queued", "running", "ended"
# What squeue, bjobs and flux jobs say about a job id they do not know (any more).
FORGOTTEN = re.compile(r"invalid job id|not found|unknown job", re.IGNORECASE)


def index_ranges(indices: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> "1-3,5,7-8" (the index-list syntax all three schedulers accept)."""
    spans: list[list[int]] = []
    for index in sorted(set(indices)):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in spans)


def _query(command: list[str]) -> str | None:
    """The scheduler's answer; "" for a job it has forgotten (finished long ago); None when it cannot be asked."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode == 0:
        return done.stdout
    return "" if FORGOTTEN.search(done.stderr + done.stdout) else None


class Scheduler:
    name = ""
    script_on_stdin = False       # bsub reads #BSUB directives only from a script given on standard input
    states: dict[str, str] = {}   # the scheduler's state names -> QUEUED, RUNNING (anything else: ENDED)

    def time(self, seconds: int) -> str:
        raise NotImplementedError

    def warning(self, seconds: int) -> str:
        raise NotImplementedError

    def submit_command(self, script: Path, job_name: str, indices: list[int] | None, max_running: int) -> list[str]:
        """The command that submits `script`; `indices` for an array job (None: a one-run job)."""
        raise NotImplementedError

    def job_ids(self, output: str, indices: list[int] | None) -> dict[int, str]:
        """Run index -> job id, from the submit command's standard output."""
        raise NotImplementedError

    def query(self, job_ids: list[str]) -> dict[str, str] | None:
        """Job id -> QUEUED | RUNNING | ENDED for the jobs the scheduler still knows; None if it cannot be asked."""
        raise NotImplementedError

    def category(self, state: str) -> str:
        return self.states.get(state, ENDED)

    def command_line(self, script: Path, job_name: str, indices: list[int] | None, max_running: int) -> str:
        command = shlex.join(self.submit_command(script, job_name, indices, max_running))
        return f"{command} < {shlex.quote(str(script))}" if self.script_on_stdin else command

    def submit(self, script: Path, job_name: str, indices: list[int] | None, max_running: int) -> dict[int, str]:
        command = self.submit_command(script, job_name, indices, max_running)
        if shutil.which(command[0]) is None:
            raise ConfigError(f"{command[0]} not found: is this a {self.name} login node? "
                              "(`biprop jobs render` writes the script without submitting it)")
        with open(script) if self.script_on_stdin else contextlib.nullcontext() as stdin:
            done = subprocess.run(command, stdin=stdin, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ConfigError(f"{' '.join(command)} failed (exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()}")
        return self.job_ids(done.stdout, indices)


class Slurm(Scheduler):
    name = "slurm"
    states = {state: QUEUED for state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                                          "RESV_DEL_HOLD")}
    states |= {state: RUNNING for state in ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "SUSPENDED")}

    def time(self, seconds: int) -> str:
        return f"{seconds // 86400}-{seconds % 86400 // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

    def warning(self, seconds: int) -> str:
        return str(seconds)

    def submit_command(self, script, job_name, indices, max_running):
        array = [f"--array={index_ranges(indices)}" + (f"%{max_running}" if max_running else "")] if indices else []
        return ["sbatch", "--parsable", *array, str(script)]

    def job_ids(self, output, indices):
        job = output.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        if not job.isdigit():
            raise ConfigError(f"sbatch printed no job id: {output!r}")
        return {index: f"{job}_{index}" for index in indices} if indices else {1: job}

    def query(self, job_ids):
        states: dict[str, str] = {}
        for job in sorted({job.split("_")[0] for job in job_ids}):
            # squeue forgets finished jobs after MinJobAge; those are simply absent.
            output = _query(["squeue", "-h", "--array", "-t", "all", "-j", job, "-o", "%i %T"])
            if output is None:
                return None
            for line in output.splitlines():
                job_id, _, state = line.strip().partition(" ")
                states[job_id] = self.category(state.strip())
        return states


class Lsf(Scheduler):
    name = "lsf"
    script_on_stdin = True
    states = {"PEND": QUEUED, "PSUSP": QUEUED, "WAIT": QUEUED, "RUN": RUNNING, "USUSP": RUNNING, "SSUSP": RUNNING}

    def time(self, seconds: int) -> str:
        return str(math.ceil(seconds / 60))  # -W [hours:]minutes

    def warning(self, seconds: int) -> str:
        return str(math.ceil(seconds / 60))  # -wt [hours:]minutes

    def submit_command(self, script, job_name, indices, max_running):
        if not indices:
            return ["bsub", "-J", job_name]
        return ["bsub", "-J", f"{job_name}[{index_ranges(indices)}]" + (f"%{max_running}" if max_running else "")]

    def job_ids(self, output, indices):
        found = re.search(r"Job <(\d+)>", output)
        if not found:
            raise ConfigError(f"bsub printed no job id: {output!r}")
        job = found.group(1)
        return {index: f"{job}[{index}]" for index in indices} if indices else {1: job}

    def query(self, job_ids):
        states: dict[str, str] = {}
        for job in sorted({job.split("[")[0] for job in job_ids}):
            output = _query(["bjobs", "-a", "-noheader", "-o", "jobid jobindex stat", job])
            if output is None:
                return None
            for line in output.splitlines():
                fields = line.split()
                if len(fields) == 3:
                    job_id = fields[0] if fields[1] == "0" else f"{fields[0]}[{fields[1]}]"
                    states[job_id] = self.category(fields[2])
        return states


class Flux(Scheduler):
    name = "flux"
    states = {"DEPEND": QUEUED, "PRIORITY": QUEUED, "SCHED": QUEUED, "PENDING": QUEUED,
              "RUN": RUNNING, "RUNNING": RUNNING, "CLEANUP": RUNNING}

    def time(self, seconds: int) -> str:
        return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"

    def warning(self, seconds: int) -> str:
        return f"{seconds}s"

    def submit_command(self, script, job_name, indices, max_running):
        # Flux has no array throttle; --cc submits one batch job per index (FLUX_JOB_CC in its environment).
        return ["flux", "batch", *([f"--cc={index_ranges(indices)}"] if indices else []), str(script)]

    def job_ids(self, output, indices):
        ids = [ascii_id(job_id) for job_id in output.split()]
        if len(ids) != (len(indices) if indices else 1):
            raise ConfigError(f"flux batch printed {len(ids)} job id(s) for {len(indices or [1])} run(s): {output!r}")
        return dict(zip(indices or [1], ids))

    def query(self, job_ids):
        # All of the user's jobs (-a: inactive ones too): asking for ids Flux has forgotten would fail them all.
        output = _query(["flux", "jobs", "-a", "-n", "-o", "{id.f58} {status}"])
        if output is None:
            return None
        asked = {ascii_id(job_id): job_id for job_id in job_ids}
        states: dict[str, str] = {}
        for line in output.splitlines():
            job_id, _, state = line.strip().partition(" ")
            if ascii_id(job_id) in asked:
                states[asked[ascii_id(job_id)]] = self.category(state.strip())
        return states


def ascii_id(job_id: str) -> str:
    """A Flux F58 id with the ASCII prefix: Flux writes "ƒ" or "f" depending on the locale and on
    FLUX_F58_FORCE_ASCII (flux-environment(7)); the job scripts export the latter."""
    return "f" + job_id[1:] if job_id.startswith("ƒ") else job_id


SCHEDULERS: dict[str, Scheduler] = {scheduler.name: scheduler for scheduler in (Slurm(), Lsf(), Flux())}


def scheduler_named(name: str) -> Scheduler:
    if name not in SCHEDULERS:
        raise ConfigError(f"--scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]
