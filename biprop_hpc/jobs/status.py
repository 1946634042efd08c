"""`biprop jobs status`: the state of every run of a job, from its archive and, when it can be asked, the
scheduler (squeue, bjobs, flux jobs).

States: not submitted, queued, running (epoch x/y), checkpointed (stopped after a mid-epoch checkpoint,
waiting for or out of continuations), completed (with its test top-1), failed or interrupted (with the last
lines of its log). The archive's /restarts rows say how often a run was continued.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from biprop_hpc.archive import ArchiveError, read_archive
from biprop_hpc.jobs.job import recorded_run_dir
from biprop_hpc.jobs.schedulers import QUEUED, RUNNING, Scheduler

LOG_LINES = 8
EARLIEST = datetime.min.replace(tzinfo=timezone.utc)   # the time of a submission that has none recorded


@dataclass
class RunState:
    index: int
    run_dir: str
    job_id: str                 # the latest job that ran or runs it ("" = never submitted)
    state: str
    detail: str = ""
    restarts: int = 0           # continuations recorded in the archive
    log: list[str] = field(default_factory=list)  # last lines of its newest log, for runs that did not complete

    def to_dict(self) -> dict:
        return asdict(self)


def latest_job_ids(manifest: dict, directory: Path) -> dict[int, str]:
    """Run index -> the job id of its latest submission or (Flux) continuation, in time order: a submission
    made after a continuation (of a run whose continuations were used up, say) is the one that counts."""
    events = [(_time(submission.get("time")), {int(i): job_id for i, job_id in submission["job_ids"].items()})
              for submission in manifest["submissions"]]
    events += [(when, {index: job_id}) for index, job_id, when in continuations(directory / "continuations.txt")]
    ids: dict[int, str] = {}
    for _, job_ids in sorted(events, key=lambda event: event[0]):  # stable: same times keep their order
        ids.update(job_ids)
    return ids


def continuations(path: Path) -> list[tuple[int, str, datetime]]:
    """The lines "<index> <job id> <ISO time>" that Flux scripts append to continuations.txt. Lines written
    before the time was added have none: they get the file's modification time, the time of its last line."""
    if not path.exists():
        return []
    undated = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    found = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            when = _time(fields[2] if len(fields) > 2 else None)
            found.append((int(fields[0]), fields[1], when if when != EARLIEST else undated))
    return found


def _time(text) -> datetime:
    """An ISO time (the manifest's, `date -Is`'s); EARLIEST when there is none or it cannot be read."""
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return EARLIEST
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def run_states(manifest: dict, directory: Path, scheduler: Scheduler) -> list[RunState]:
    ids = latest_job_ids(manifest, directory)
    seen = scheduler.query(sorted(set(ids.values()))) if ids else {}
    return [_state(run, ids.get(run["index"], ""), seen, directory) for run in manifest["runs"]]


def _state(run: dict, job_id: str, seen: dict | None, directory: Path) -> RunState:
    run_dir = recorded_run_dir(run, directory)
    state = RunState(run["index"], str(run_dir), job_id, "")
    archive = run_dir / "archive.h5"
    record = None
    if archive.exists():
        try:
            record = read_archive(archive)
        except ArchiveError as error:
            state.detail = str(error)
    status = record.attrs.get("status", "") if record else ""
    done = len(record.metrics.get("epoch", [])) if record else 0
    planned = (record.attrs.get("epochs") or json.loads(record.attrs["config"])["epochs"]) if record else 0
    state.restarts = len(record.restarts) if record else 0
    scheduler_says = None if seen is None else seen.get(job_id)
    if status == "completed":
        state.state = "completed"
        state.detail = f"test top-1 {record.final.get('test_top1', float('nan')):.2f}"
        return state
    if not job_id:
        state.state = "not submitted"
    elif scheduler_says == QUEUED:
        state.state = "queued"
        state.detail = state.detail or (f"{done}/{planned} epochs done" if record else "")
    elif scheduler_says == RUNNING or (seen is None and status == "running"):
        state.state = "running"
        state.detail = state.detail or (f"epoch {min(done + 1, planned)}/{planned}" if record else "starting")
        if seen is None and record and record.attrs.get("heartbeat"):
            state.detail += f" (the scheduler cannot be asked; archive written {record.attrs['heartbeat']})"
    elif seen is None and not record:
        state.state = "queued"
        state.detail = state.detail or "no archive yet (the scheduler cannot be asked)"
    elif status == "checkpointed":
        state.state = status
        then = "a continuation resumes it, or submit again" if seen is None else "none is queued: submit again"
        state.detail = f"checkpointed in epoch {done + 1}/{planned}; {then}"
        state.log = [] if seen is None else _log_tail(directory, run["index"])
    elif status == "interrupted":
        state.state = status
        state.detail = f"interrupted in epoch {done + 1}/{planned}; submit again to continue"
        state.log = _log_tail(directory, run["index"])
    else:
        state.state = "failed"
        if not state.detail:
            state.detail = {"failed": f"failed in epoch {min(done + 1, planned)}/{planned}",
                            "running": f"ended in epoch {min(done + 1, planned)}/{planned} without a record "
                                       "(killed?); submit again to continue from the last checkpoint",
                            "": "no archive"}[status]
        state.log = _log_tail(directory, run["index"])
    return state


def _log_tail(directory: Path, index: int) -> list[str]:
    logs = sorted((directory / "logs").glob(f"run{index}_*.out"), key=lambda path: path.stat().st_mtime)
    if not logs:
        return []
    return logs[-1].read_text(errors="replace").splitlines()[-LOG_LINES:]


def format_states(manifest: dict, path: Path, states: list[RunState]) -> str:
    counts: dict[str, int] = {}
    for state in states:
        counts[state.state] = counts.get(state.state, 0) + 1
    out = Path(states[0].run_dir).parents[2] if states else Path()
    lines = [f"{manifest['name']} ({manifest['scheduler']}, {len(states)} run(s): "
             + ", ".join(f"{n} {name}" for name, n in counts.items()) + f") {path}"]
    rows = [("run", "state", "job", "restarts", "directory", "detail")]
    for state in states:
        where = Path(state.run_dir)
        rows.append((str(state.index), state.state, state.job_id or "-", str(state.restarts),
                     str(where.relative_to(out)) if where.is_relative_to(out) else str(where), state.detail))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5])
    for state in states:
        if state.log:
            lines.append(f"  run {state.index}, last lines of its log:")
            lines.extend(f"    {line}" for line in state.log)
    return "\n".join(line.rstrip() for line in lines)
