"""`biprop results`: many run archives -> one table, grouped statistics, a summary archive and plots.

  biprop results PATH... [--filter KEY=VALUE[,VALUE]]... [--group-by KEY[,KEY]... | --group-by auto]... [--best]
                 [--sort KEY] [--format table|csv|json|md] [--csv FILE] [--out SUMMARY.h5] [--plot DIR]
                 [--stale-after SECONDS]

--filter and --group-by take one value each (repeat them, or list group keys with commas), so a path after
them is a path, never one more key. stdout holds the requested format only (`--format`); with csv, json and md
the notes (grouping, runs left out, files passed over) go to stderr. No run archive under the paths at all is an
error (exit 2), not an empty table.

The work goes one way, one step per section below: find the archives under the paths and read each
(discovery and reading) -> one row per run (rows) -> filters, groups, statistics, best runs (grouping) ->
terminal table, CSV, summary archive (outputs). Plots are in `biprop_hpc.archive.plots`, imported only for
--plot so that the table path stays quick (this module imports neither torch nor matplotlib).

Finding runs. Every `*.h5` file under the paths is a candidate (hidden files and directories such as a file
system's `.snapshot` are skipped, and so is the --out file); a file reached twice (overlapping paths, links)
counts once. A run directory `<out>/<config_name>/keep=<k>/<name>/` holds one `archive.h5`, also when the run
was requeued and resumed: its continuations are rows of the archive's /restarts table, so a resumed run is one
row with its restart count, never two. A run's id is its directory's last three parts,
`<config_name>/keep=<k>/<name>` (for a file not named archive.h5: the file's path without `.h5`). Other HDF5
files kept beside runs are passed over and counted in one line: tickets (attribute format="biprop-ticket") and
files without the archive's schema_version attribute (a summary written by --out, anything foreign).

Reading never disturbs a writer and never stops at one bad file. Archives are opened read-only with HDF5 file
locking off (`read_archive`), so a reader takes no lock that could block or fail a running job's rewrite, and
file systems without flock (many Lustre, GPFS and NFS mounts) work. Writers replace the whole file by a rename,
so a reader sees the old or the new archive, never half of one. A file that may be a damaged archive (empty,
truncated, not HDF5, named archive.h5, of a newer schema, missing groups) becomes a row with status
`unreadable` and the reason in its note.

States. `completed` runs make the statistics; every other run is listed with its state and left out: `running`,
`checkpointed` (stopped with a checkpoint, waiting for its continuation: the note says for how long since its
last sign of life; never stale, as a continuation may wait in the queue for days and only the scheduler knows
whether it still does: `biprop jobs status` asks it), `interrupted`, `failed`, `unreadable`, and `stale`: a run
whose archive says running but whose last sign of life is older than max(3 x its median epoch time,
10 minutes) (`--stale-after SECONDS` replaces that limit). The last sign of life is the archive's `heartbeat`
(refreshed at every write and, within an epoch, every few minutes), or the file's modification time for
version-1 archives, which have none. A stale run's job has most likely died without a word (killed, node
failure, out of time before it could write its status).

Statistics are over completed runs: mean and sample standard deviation (n - 1; "-" for a single run).
`--group-by auto` groups by every config key whose value differs between the runs, except the seed and the keys
that say where and how a run was executed rather than what was run (`ignored_by_auto`: config.EXECUTION_KEYS).
The best run of a group is the one with the highest validation top-1; the test set never chooses anything.
`paper_top1` from a run's config (the paper's reported test top-1 for that experiment) is shown beside ours
with the difference.

Summary archive (--out FILE, HDF5, rewritten whole from the runs found now, atomically):
  /          attributes: kind ("biprop-hpc results summary"), summary_version (1), created (ISO 8601 UTC),
             biprop_hpc_version, sources, filters, group_by (JSON lists), stale_rule (text)
  /table     compound dataset, one row per run (the CSV's columns, `TABLE_COLUMNS`); missing numbers are NaN
             (floats) or -1 (counts)
  /groups    compound dataset, one row per group (with --group-by or --best): the group keys, runs, left_out,
             mean and std of best_val_top1, test_top1, test_top5, corruption_top1; paper_top1, paper_diff,
             best_run_id
  /runs/<run id>/   one group per readable run (nested as the run layout): the archive's root attributes
             plus source_path; metrics/ (datasets, epoch their dimension scale), final (attributes), layers,
             restarts and ranks (tables), robustness (a group as in the archive, when the run has one)
The runs are COPIED, not linked (HDF5 external links): a summary must outlive its runs, which get moved,
renamed or purged from scratch file systems, and an external link would dangle then; a link also resolves
relative to where the summary is read, and reading through links would open (and depend on) every run
archive again. The copies are small (metrics per epoch, a few attributes; never checkpoints).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

import biprop_hpc
from biprop_hpc.archive.run_archive import (LAYER_DTYPE, RANK_DTYPE, RESTART_DTYPE, ArchiveError, RunRecord,
                                            attribute_value, corruption_means, plain_value, read_archive,
                                            write_metrics, write_robustness)
from biprop_hpc.files import replace_atomically

ARCHIVE_NAME = "archive.h5"
FORMATS = ("table", "csv", "json", "md")   # what `biprop results --format` prints on stdout
SUMMARY_KIND = "biprop-hpc results summary"
SUMMARY_VERSION = 1
STALE_MIN_SECONDS = 600.0        # a running run silent for longer than this...
STALE_EPOCHS = 3                 # ...and longer than this many (median) epochs is stale
STALE_RULE = (f"status is running and its last heartbeat (the file time without one) is older "
              f"than max({STALE_EPOCHS} x its median epoch_seconds, {STALE_MIN_SECONDS:.0f} s)")
TICKET_FORMAT = "biprop-ticket"  # biprop_hpc.ticket.file.FORMAT (not imported from there: that module imports torch)

# The run table's columns (CSV, the summary's /table), in order, with their types.
TABLE_COLUMNS = {
    "run_id": str, "path": str, "run": str, "config": str, "model": str, "type": str, "init": str,
    "batchnorm": str, "keep_ratio": float, "seed": int, "world_size": int, "epochs_done": int,
    "epochs_total": int, "restarts": int, "best_val_top1": float, "best_epoch": int, "test_top1": float,
    "test_top5": float, "corruption_top1": float, "paper_top1": float, "paper_diff": float, "wall_seconds": float,
    "status": str,
    "note": str,
}
STAT_COLUMNS = ("best_val_top1", "test_top1", "test_top5", "corruption_top1")
# The group table's columns after the group keys (CSV, the summary's /groups), with their types.
GROUP_COLUMNS = {"runs": int, "left_out": int,
                 **{name: float for column in STAT_COLUMNS for name in (column, f"{column}_std")},
                 "paper_top1": float, "paper_diff": float, "best_run_id": str}


# --- discovery and reading --------------------------------------------------------------------------------

def find_archives(paths: list[str], exclude: str | None = None) -> list[Path]:
    """Every `*.h5` file under `paths` (files given directly included), each file once, in a stable order."""
    found: dict[str, Path] = {}
    excluded = os.path.realpath(exclude) if exclude else None
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise ValueError(f"{given}: no such file or directory")
        candidates = [root] if root.is_file() else _h5_files_under(root)
        for path in candidates:
            real = os.path.realpath(path)
            if real != excluded:
                found.setdefault(real, path)
    return list(found.values())


def _h5_files_under(root: Path) -> list[Path]:
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        files += [Path(directory, name) for name in sorted(names)
                  if name.endswith(".h5") and not name.startswith(".")]
    return files


def run_id_of(path: Path) -> str:
    """`<config_name>/keep=<k>/<name>`: the last three parts of the run directory (see the module docstring)."""
    run_dir = path.parent if path.name == ARCHIVE_NAME else path.with_suffix("")
    return "/".join(Path(os.path.realpath(run_dir)).parts[1:][-3:])


def load_record(path: Path) -> RunRecord:
    """The archive at `path`, with a parsed config; ArchiveError for anything that is not a usable archive."""
    record = read_archive(path)
    try:
        config = record.config
    except (KeyError, ValueError, TypeError) as error:
        raise ArchiveError(f"{path}: no readable config attribute ({error!r})") from None
    if not isinstance(config, dict):
        raise ArchiveError(f"{path}: the config attribute is not a JSON object")
    return record


# --- rows -------------------------------------------------------------------------------------------------

@dataclass
class RunRow:
    """One run: the table's columns (`TABLE_COLUMNS`) plus its settings and archive for grouping and plots."""
    run_id: str
    path: str
    status: str
    note: str = ""
    run: str = ""
    config: str = ""
    model: str = ""
    type: str = ""            # MPT-1/32, MPT-1/1 or dense
    init: str = ""
    batchnorm: str = ""       # learned (the paper's "+BN") or non-affine
    keep_ratio: float | None = None
    seed: int | None = None
    world_size: int | None = None
    epochs_done: int | None = None
    epochs_total: int | None = None
    restarts: int | None = None
    best_val_top1: float | None = None
    best_epoch: int | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    corruption_top1: float | None = None   # mean top-1 over the corrupted test sets (biprop evaluate --corruptions)
    paper_top1: float | None = None
    paper_diff: float | None = None
    wall_seconds: float | None = None
    settings: dict = field(default_factory=dict, repr=False)   # the run's config; {} when unreadable
    record: RunRecord | None = field(default=None, repr=False)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def value(self, key: str):
        """A table column, else a config key (None when the run has no such value)."""
        return getattr(self, key) if key in TABLE_COLUMNS else self.settings.get(key)


def network_type(layer_type: str, model: str) -> str:
    """dense, or the paper's MPT-1/1 (a model name with a `bin` part: binary activations) or MPT-1/32."""
    if layer_type == "dense":
        return "dense"
    return "MPT-1/1" if "bin" in model.split("_") else "MPT-1/32"


def stale_limit(epoch_seconds: list[float], stale_after: float | None) -> float:
    """Seconds of silence after which a running run is stale (see STALE_RULE)."""
    if stale_after is not None:
        return stale_after
    finite = [s for s in epoch_seconds if math.isfinite(s)]
    median = statistics.median(finite) if finite else 0.0
    return max(STALE_EPOCHS * median, STALE_MIN_SECONDS)


def last_sign_of_life(path: Path, attrs: dict) -> tuple[datetime, str]:
    """The archive's heartbeat, else (version-1 archives) the file's modification time; both UTC."""
    heartbeat = attrs.get("heartbeat", "")
    if heartbeat:
        try:
            moment = datetime.fromisoformat(heartbeat)
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)), "heartbeat"
        except ValueError:
            pass
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc), "file time"


def not_a_run_archive(path: Path) -> str | None:
    """What a file that did not read as a run archive is, if it is plainly no run: "ticket" (a ticket file kept
    beside its run) or "other" (an HDF5 file without the archive's schema_version attribute: a summary written
    by --out, anything foreign). None when it may be a damaged archive: not HDF5 or truncated, named
    archive.h5, or with a schema_version (a newer schema, missing groups): that is an `unreadable` row."""
    if path.name == ARCHIVE_NAME:
        return None
    try:
        with h5py.File(path, "r", locking=False) as h5:
            if plain_value(h5.attrs.get("format", "")) == TICKET_FORMAT:
                return "ticket"
            return None if "schema_version" in h5.attrs else "other"
    except (OSError, KeyError, ValueError, TypeError):
        return None


def unreadable_row(path: Path, run_id: str, error: ArchiveError) -> RunRow:
    reason = str(error).removeprefix(f"{path}: ")
    return RunRow(run_id=run_id, path=str(path), status="unreadable", note=reason, run=Path(run_id).name)


def row_of(path: Path, run_id: str, record: RunRecord, now: datetime, stale_after: float | None) -> RunRow:
    """The row of one archive, read as `record`."""
    attrs, config, final, metrics = record.attrs, record.config, record.final, record.metrics
    epoch_seconds = [float(s) for s in metrics.get("epoch_seconds", [])]
    row = RunRow(
        run_id=run_id, path=str(path), status=str(attrs.get("status", "unknown")),
        run=str(config.get("name") or Path(run_id).name), config=str(config.get("config_name", "")),
        model=str(attrs.get("model", config.get("model", ""))),
        type=network_type(config.get("layer_type", "biprop"), str(config.get("model", ""))),
        init=str(config.get("weight_init", "")),
        batchnorm="learned" if config.get("learn_batchnorm") else "non-affine",
        keep_ratio=attrs.get("keep_ratio", config.get("keep_ratio")), seed=attrs.get("seed", config.get("seed")),
        world_size=attrs.get("world_size"), epochs_done=len(metrics.get("epoch", [])),
        epochs_total=attrs.get("epochs", config.get("epochs")), restarts=len(record.restarts),
        best_val_top1=final.get("best_val_top1"), best_epoch=final.get("best_epoch"),
        test_top1=final.get("test_top1"), test_top5=final.get("test_top5"),
        corruption_top1=record.robustness.get("mean_top1"),
        paper_top1=config.get("paper_top1") or None,
        wall_seconds=sum(epoch_seconds) if epoch_seconds else None,
        settings=config, record=record)
    if row.test_top1 is not None and row.paper_top1 is not None:
        row.paper_diff = row.test_top1 - row.paper_top1
    if row.completed and row.best_val_top1 is None:
        row.note = "no validation split: no best val top-1"
    if row.status == "running":
        seen, source = last_sign_of_life(path, attrs)
        silent = (now - seen).total_seconds()
        limit = stale_limit(epoch_seconds, stale_after)
        if silent > limit:
            row.note = f"running, but no sign of life for {duration(silent)} ({source}; stale after {duration(limit)})"
            row.status = "stale"
        else:
            row.note = f"last {source} {duration(max(silent, 0))} ago"
    elif row.status == "checkpointed":
        # Never stale: its continuation may wait in the queue for days. Whether the scheduler still holds it,
        # only the scheduler knows (`biprop jobs status` asks it; this command reads files only).
        seen, source = last_sign_of_life(path, attrs)
        row.note = f"waiting {duration(max((now - seen).total_seconds(), 0))} for its continuation ({source})"
    elif not row.completed:
        row.note = row.note or f"ended {row.status}"
    return row


def find_runs(paths: list[str], *, stale_after: float | None = None, now: datetime | None = None,
              exclude: str | None = None) -> tuple[list[RunRow], list[tuple[Path, str]]]:
    """One row per run archive found under `paths` (see find_archives), run ids made unique with `~2`, `~3`...;
    a file that cannot be read gives an `unreadable` row, never an exception. Also the files passed over as
    plainly no runs (see not_a_run_archive), each with what it is."""
    now = now or datetime.now(timezone.utc)
    rows, passed_over, seen_ids = [], [], {}
    for path in find_archives(paths, exclude):
        try:
            record, error = load_record(path), None
        except ArchiveError as failure:
            record, error = None, failure
            kind = not_a_run_archive(path)
            if kind is not None:
                passed_over.append((path, kind))
                continue
        run_id = run_id_of(path)
        seen_ids[run_id] = seen_ids.get(run_id, 0) + 1
        if seen_ids[run_id] > 1:
            run_id = f"{run_id}~{seen_ids[run_id]}"
        rows.append(unreadable_row(path, run_id, error) if record is None else
                    row_of(path, run_id, record, now, stale_after))
    return rows, passed_over


def collect_runs(paths: list[str], *, stale_after: float | None = None, now: datetime | None = None,
                 exclude: str | None = None) -> list[RunRow]:
    """The rows of find_runs, for callers that do not report the files passed over."""
    return find_runs(paths, stale_after=stale_after, now=now, exclude=exclude)[0]


def duration(seconds: float) -> str:
    """45s, 12m30s, 3h05m, 2d04h."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


# --- filters, groups, statistics, best runs -----------------------------------------------------------------

def config_key_types() -> dict:
    """Config key -> its type (bool, int, float, str or a list type), from the Config dataclass.

    Imported here, not at the top: biprop_hpc.config pulls in torch (seconds), which the table path and the
    library use of this module do not need; the command line has imported it already.
    """
    import typing

    from biprop_hpc.config import Config
    return typing.get_type_hints(Config)


def parse_filters(filters: list[str], key_types: dict) -> dict:
    """`key=value[,value...]` -> {key: [values]}, each value typed as the config key; errors name the problem."""
    parsed = {}
    for text in filters:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key or not values:
            raise ValueError(f"--filter {text!r}: expected KEY=VALUE (e.g. keep_ratio=0.5; "
                             "alternatives separated by commas: model=conv2,conv4)")
        if key not in key_types:
            raise ValueError(f"--filter {text!r}: {key!r} is not a config key")
        parsed.setdefault(key, []).extend(_typed(key, key_types[key], value.strip()) for value in values.split(","))
    return parsed


def _typed(key: str, kind, text: str):
    if kind is bool:
        if text.lower() in ("true", "yes", "1", "on"):
            return True
        if text.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"--filter {key}={text}: {key} is true or false")
    if kind not in (int, float, str):
        raise ValueError(f"--filter {key}: {key} is a list; filters compare single values")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--filter {key}={text}: {key} is a number ({kind.__name__})") from None


def apply_filters(rows: list[RunRow], filters: dict) -> list[RunRow]:
    """The runs whose config matches every filter (any of its values). Unreadable files are always kept:
    their settings are unknown, and a broken file must not vanish from the report."""
    return [row for row in rows
            if not row.settings or all(row.settings.get(key) in values for key, values in filters.items())]


def ignored_by_auto() -> tuple[str, ...]:
    """The config keys --group-by auto never groups by: the seed (what a group averages over) and the keys that
    only say how a run executes (config.EXECUTION_KEYS, the one list of them). Imported here, not at the top:
    biprop_hpc.config pulls in torch (see config_key_types)."""
    from biprop_hpc.config import EXECUTION_KEYS
    return ("seed", *EXECUTION_KEYS)


def varying_keys(rows: list[RunRow], ignore: tuple | None = None) -> list[str]:
    """Config keys whose value differs between the readable runs that have the key, in the config's order;
    never a key of `ignore` (default: ignored_by_auto()).

    A key missing from some runs' configs (archives written before the key existed) does not vary by that
    alone: those runs are taken to have the value all the others share."""
    ignore = ignored_by_auto() if ignore is None else ignore
    configs = [row.settings for row in rows if row.settings]
    keys = list(dict.fromkeys(key for config in configs for key in config))
    return [key for key in keys if key not in ignore
            and len({_hashable(config[key]) for config in configs if key in config}) > 1]


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


@dataclass
class Group:
    values: dict              # group key -> the value its runs share
    runs: list[RunRow]        # every run of the group, completed or not

    @property
    def completed(self) -> list[RunRow]:
        return [run for run in self.runs if run.completed]

    def describe(self) -> str:
        return " ".join(f"{key}={_text(value)}" for key, value in self.values.items()) or "all runs"


def group_runs(rows: list[RunRow], keys: list[str]) -> list[Group]:
    """Readable runs grouped by the values of `keys`, groups in order of those values."""
    groups: dict[tuple, Group] = {}
    for row in rows:
        if row.settings:
            values = {key: row.settings.get(key) for key in keys}
            groups.setdefault(tuple(_hashable(v) for v in values.values()), Group(values, [])).runs.append(row)
    return [groups[key] for key in sorted(groups, key=lambda values: tuple(map(_order, values)))]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the std of one value is None (shown "-")."""
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def best_run(group: Group) -> RunRow | None:
    """The completed run with the highest validation top-1 (ties: the first run id); never chosen by test."""
    candidates = [run for run in group.completed if run.best_val_top1 is not None]
    return min(candidates, key=lambda run: (-run.best_val_top1, run.run_id), default=None)


def group_summary(group: Group) -> dict:
    """One row of the group table: keys, counts, mean and std per statistic, paper reference, best run."""
    done = group.completed
    summary = dict(group.values)
    summary.update(runs=len(done), left_out=len(group.runs) - len(done))
    for column in STAT_COLUMNS:
        mean, std = mean_std([run.value(column) for run in done if run.value(column) is not None])
        summary[column], summary[f"{column}_std"] = mean, std
    papers = {run.paper_top1 for run in group.runs}
    summary["paper_top1"] = papers.pop() if len(papers) == 1 else None   # none, or differing inside the group
    summary["paper_diff"] = (summary["test_top1"] - summary["paper_top1"]
                             if summary["test_top1"] is not None and summary["paper_top1"] is not None else None)
    best = best_run(group)
    summary["best_run_id"] = best.run_id if best else ""
    return summary


def sort_rows(rows: list, key: str | None, value_of) -> list:
    """Ascending by `key` (so the largest values end next to the prompt); missing values first."""
    if key is None:
        return rows
    return sorted(rows, key=lambda row: _order(value_of(row, key)))


def _order(value):
    """A sort key that puts None first and compares numbers numerically."""
    return (value is not None, _hashable(value) if value is not None else 0)


def default_run_order(rows: list[RunRow]) -> list[RunRow]:
    return sorted(rows, key=lambda row: (row.config, _order(row.keep_ratio), row.type, _order(row.seed), row.run_id))


# --- outputs: terminal table, CSV, summary archive ----------------------------------------------------------

def _epochs(row: RunRow) -> str | None:
    if row.epochs_done is None:
        return None
    return f"{row.epochs_done}/{row.epochs_total if row.epochs_total is not None else '?'}"


def _wall(row: RunRow) -> str | None:
    return duration(row.wall_seconds) if row.wall_seconds is not None else None


RUN_VIEW = (  # terminal header, column (or a function of the row), format
    ("run", "run", "s"), ("config", "config", "s"), ("model", "model", "s"), ("type", "type", "s"),
    ("init", "init", "s"), ("BN", "batchnorm", "s"), ("keep", "keep_ratio", "g"), ("seed", "seed", "d"),
    ("ranks", "world_size", "d"), ("epochs", _epochs, "s"), ("restarts", "restarts", "d"),
    ("best val", "best_val_top1", ".2f"), ("test top-1", "test_top1", ".2f"), ("top-5", "test_top5", ".2f"),
    ("corrupt top-1", "corruption_top1", ".2f"), ("paper", "paper_top1", ".2f"), ("diff", "paper_diff", "+.2f"), ("wall", _wall, "s"), ("status", "status", "s"),
)


def _text(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec in ("", "g"):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return format(value, spec) if spec and spec != "s" else str(value)


def aligned(header: list[str], cells: list[list[str]], right: list[bool]) -> str:
    """A plain text table: columns separated by two spaces, numbers right-aligned."""
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]

    def line(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in cells])


def markdown(header: list[str], cells: list[list[str]], right: list[bool]) -> str:
    """A Markdown (GitHub) table of the same cells: numbers right-aligned, `|` in a cell escaped."""
    def line(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"
    return "\n".join([line(header), "|" + "|".join("---:" if r else "---" for r in right) + "|"]
                     + [line(row) for row in cells])


def run_view(rows: list[RunRow]) -> tuple[list[str], list[list[str]], list[bool]]:
    """The run table as shown (terminal, Markdown): header, formatted cells, which columns are right-aligned."""
    header = [view[0] for view in RUN_VIEW]
    right = [spec != "s" for _, _, spec in RUN_VIEW]
    cells = [[_text(column(row) if callable(column) else getattr(row, column), spec)
              for _, column, spec in RUN_VIEW] for row in rows]
    return header, cells, right


def group_view(summaries: list[dict], keys: list[str]) -> tuple[list[str], list[list[str]], list[bool]]:
    """The group table as shown: header, formatted cells, right-aligned columns."""
    header = keys + ["runs", "left out", "best val", "test top-1", "top-5", "corrupt top-1", "paper", "diff",
                     "best run (val)"]
    numeric_keys = [group_columns(summaries, keys)[key] is float for key in keys]
    right = numeric_keys + [True] * 8 + [False]
    cells = []
    for s in summaries:
        stats = [f"{_text(s[c], '.2f')} +- {_text(s[c + '_std'], '.2f')}" if s[c] is not None else "-"
                 for c in STAT_COLUMNS]
        cells.append([_text(s[k]) for k in keys] + [str(s["runs"]), str(s["left_out"])] + stats
                     + [_text(s["paper_top1"], ".2f"), _text(s["paper_diff"], "+.2f"), s["best_run_id"] or "-"])
    return header, cells, right


def format_runs(rows: list[RunRow]) -> str:
    return aligned(*run_view(rows))


def format_groups(summaries: list[dict], keys: list[str]) -> str:
    return aligned(*group_view(summaries, keys))


def format_left_out(rows: list[RunRow]) -> str:
    """The count per state, and every run left out of the statistics with its state and reason."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    lines = [f"{len(rows)} run{'' if len(rows) == 1 else 's'}" + (": " if rows else "")
             + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))]
    left_out = [row for row in rows if not row.completed]
    if left_out:
        lines.append("left out of the statistics:")
        width = max(len(row.run_id) for row in left_out)
        lines += [f"  {row.run_id.ljust(width)}  {row.status:<12}  {row.note}  ({row.path})" for row in left_out]
    return "\n".join(lines)


def format_passed_over(passed_over: list[tuple[Path, str]]) -> str:
    """One line counting the HDF5 files passed over as no run archives, by kind."""
    tickets = sum(kind == "ticket" for _, kind in passed_over)
    kinds = [f"{tickets} ticket{'s' if tickets != 1 else ''}"] if tickets else []
    kinds += [f"{len(passed_over) - tickets} other"] if len(passed_over) > tickets else []
    files = "1 HDF5 file that is not a run archive" if len(passed_over) == 1 else \
        f"{len(passed_over)} HDF5 files that are not run archives"
    return f"passed over {files} ({', '.join(kinds)})"


def csv_text(columns: list[str], records: list[dict]) -> str:
    """Plain values (full precision; empty for missing), one header line; the csv module's CRLF line ends."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for record in records:
        writer.writerow(["" if record[c] is None else _csv_value(record[c]) for c in columns])
    return buffer.getvalue()


def write_csv(path: str, columns: list[str], records: list[dict]) -> None:
    """csv_text into `path`, replaced atomically (the same bytes as `--format csv` on stdout)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            handle.write(csv_text(columns, records))

    replace_atomically(path, write)


def _csv_value(value):
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def json_text(records: list[dict]) -> str:
    """The records as one JSON list of objects; missing and non-finite numbers are null (valid JSON)."""
    def plain(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return list(value) if isinstance(value, tuple) else value
    return json.dumps([{key: plain(value) for key, value in record.items()} for record in records],
                      indent=2, allow_nan=False)


def with_robustness(records: list[dict], rows: list[RunRow]) -> list[dict]:
    """Run records (not group records) with their corruption results in detail under "robustness": clean_top1,
    mean_top1, source, seed, evaluated, time, corruptions ({name: mean top-1 over the severities}) and rows (one
    per corruption and severity); null for a run without them."""
    details = {row.run_id: row.record.robustness for row in rows if row.record is not None}
    out = []
    for record in records:
        if "run_id" in record:
            found = details.get(record["run_id"])
            record = {**record, "robustness": {**found, "corruptions": corruption_means(found["rows"])}
                      if found else None}
        out.append(record)
    return out


def run_record(row: RunRow) -> dict:
    return {column: getattr(row, column) for column in TABLE_COLUMNS}


def _compound(columns: dict, records: list[dict]) -> np.ndarray:
    """Records -> a numpy structured array: strings, int64 (missing -1), float64 (missing NaN)."""
    kinds = {str: h5py.string_dtype(), int: np.int64, float: np.float64}
    dtype = np.dtype([(name, kinds[kind]) for name, kind in columns.items()])
    missing = {str: "", int: -1, float: np.nan}
    rows = [tuple(missing[kind] if r[name] is None else (kind(r[name]) if kind is not str else _text(r[name]))
                  for name, kind in columns.items()) for r in records]
    return np.array(rows, dtype=dtype)


def group_columns(summaries: list[dict], keys: list[str]) -> dict:
    """The /groups columns: numeric group keys as floats, others as text, then the statistics."""
    columns = {}
    for key in keys:
        values = [s[key] for s in summaries if s[key] is not None]
        numeric = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        columns[key] = float if numeric else str
    return {**columns, **GROUP_COLUMNS}


def write_summary(path: str, rows: list[RunRow], groups: tuple[list[str], list[dict]] | None,
                  meta: dict) -> None:
    """The summary archive (schema in the module docstring), replaced atomically."""
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", locking=False) as h5:
            h5.attrs.update(kind=SUMMARY_KIND, summary_version=SUMMARY_VERSION,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            biprop_hpc_version=biprop_hpc.__version__, stale_rule=STALE_RULE,
                            **{key: json.dumps(value) for key, value in meta.items()})
            h5.create_dataset("table", data=_compound(TABLE_COLUMNS, [run_record(row) for row in rows]))
            if groups is not None:
                keys, summaries = groups
                h5.create_dataset("groups", data=_compound(group_columns(summaries, keys), summaries))
            runs = h5.create_group("runs")
            for row in rows:
                if row.record is not None:
                    _copy_run(runs.create_group(row.run_id), row)

    replace_atomically(path, write)


def _copy_run(group: h5py.Group, row: RunRow) -> None:
    record = row.record
    group.attrs.update({key: attribute_value(value) for key, value in record.attrs.items()})
    group.attrs["source_path"] = os.path.realpath(row.path)
    write_metrics(group.create_group("metrics"), record.metrics)   # epoch as the dimension scale, as in archives
    group.create_group("final").attrs.update(record.final)
    layers = [(layer["name"], layer["weights"], layer["kept"], layer["alpha"]) for layer in record.layers]
    group.create_dataset("layers", data=np.array(layers, dtype=LAYER_DTYPE))
    restarts = [(r["time"], r["epoch"], r["step"], r["reason"]) for r in record.restarts]
    group.create_dataset("restarts", data=np.array(restarts, dtype=RESTART_DTYPE))
    ranks = [(r["rank"], r["host"], r["local_rank"], r["local_size"], r["device"]) for r in record.ranks]
    group.create_dataset("ranks", data=np.array(ranks, dtype=RANK_DTYPE))  # where each rank ran (several nodes)
    if record.robustness:  # biprop evaluate --corruptions: the archive's /robustness, copied the same
        write_robustness(group, record.robustness)


# --- the command ------------------------------------------------------------------------------------------

def add_results_commands(subparsers) -> None:
    """Register `biprop results PATH...`."""
    parser = subparsers.add_parser(
        "results", allow_abbrev=False, help="table, statistics, summary archive and plots of many runs",
        description="Read every run archive under the paths (read-only, without locks: safe beside running "
                    "jobs) and print one row per run; unreadable, unfinished and stale runs are listed and "
                    "left out of the statistics. A run is stale when its " + STALE_RULE + ". --filter and "
                    "--group-by take one value each: repeat them. No run archive under the paths is an error "
                    "(exit 2).")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="run directories, sweep directories or archives (give them together)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                        help="keep runs whose config matches (any of the comma-separated values); repeat for "
                             "more keys, e.g. --filter keep_ratio=0.5 --filter model=conv2,conv4")
    parser.add_argument("--group-by", action="append", default=[], metavar="KEY[,KEY]",
                        help="config keys to group by (mean +- std over the other runs, e.g. seeds), "
                             "comma-separated or repeated, or 'auto': every key that varies, except the seed, "
                             "name and execution keys")
    parser.add_argument("--best", action="store_true",
                        help="show the best run per group by validation top-1 (groups: --group-by, else auto)")
    parser.add_argument("--sort", metavar="KEY", help="sort ascending by a column or config key, e.g. test_top1")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="what stdout holds: table (aligned text with notes; the default), csv, json (a list "
                             "of row or group objects) or md (a Markdown table); with csv, json and md the "
                             "notes go to stderr")
    parser.add_argument("--layers", action="store_true",
                        help="also each run's BIPROP layers: weights, kept, and kept fraction per epoch (global "
                             "pruning shares the weights out unevenly); table: a block per run after the table; "
                             "json: a `layers` list in every run object")
    parser.add_argument("--csv", metavar="FILE", help="also write the table as CSV (full precision)")
    parser.add_argument("--out", metavar="FILE", help="write (or update) the summary archive, e.g. summary.h5")
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots (top-1 against keep ratio, learning curves)")
    parser.add_argument("--stale-after", type=float, metavar="SECONDS",
                        help="a running run silent for longer than this is stale (default: max(3 epochs, 10 min))")
    parser.set_defaults(handler=run_results_command)


def run_results_command(args) -> None:
    """Run `biprop results`: print the table in the chosen format (and only it) on stdout; notes, in formats
    other than table, on stderr. Returns None, so the command line prints no result line after it."""
    key_types = config_key_types()
    filters = parse_filters(args.filter, key_types)
    group_by = _checked_group_keys(split_keys(args.group_by), key_types)
    if args.sort and not (args.sort in TABLE_COLUMNS or args.sort in GROUP_COLUMNS or args.sort in key_types):
        raise ValueError(f"--sort {args.sort}: not a column ({', '.join(TABLE_COLUMNS)}; with --group-by: "
                         f"{', '.join(GROUP_COLUMNS)}) nor a config key")
    if args.stale_after is not None and args.stale_after <= 0:
        raise ValueError(f"--stale-after {args.stale_after}: give a number of seconds > 0")
    _check_paths(args.paths, key_types)
    rows, passed_over = find_runs(args.paths, stale_after=args.stale_after, exclude=args.out)
    if not rows:
        raise ValueError(no_runs_message(args.paths, passed_over, args.out))
    rows = default_run_order(apply_filters(rows, filters))
    if args.best and not group_by:
        group_by = ["auto"]
    keys = varying_keys(rows) if group_by == ["auto"] else group_by
    groups = group_runs(rows, keys) if group_by else []
    summaries = [group_summary(group) for group in groups]

    shown, columns, records = _shown_table(args, rows, groups, summaries, keys)
    notes = format_left_out(rows) + ("\n" + format_passed_over(passed_over) if passed_over else "")
    if group_by:
        notes = f"grouped by: {', '.join(keys) or '(nothing varies: one group)'}\n\n{notes}"
    layer_rows = [row for row in rows if row.record is not None] if getattr(args, "layers", False) else []
    if layer_rows and (group_by or args.format not in ("table", "json")):
        raise ValueError("--layers lists every run's layers: use it without --group-by/--best, with --format "
                         "table or json")
    if layer_rows and args.format == "json":
        by_id = {row.run_id: layer_records(row) for row in layer_rows}
        records = [{**record, "layers": by_id.get(record["run_id"], [])} for record in records]
    if args.format == "table":
        print(f"{aligned(*shown)}\n\n{notes}", flush=True)
        for row in layer_rows:
            print(f"\n{format_layers(row)}", flush=True)
    else:  # stdout holds the table alone, for a pipe or a file
        if args.format == "csv":
            sys.stdout.write(csv_text(columns, records))
        elif args.format == "json":
            sys.stdout.write(json_text(with_robustness(records, rows)) + "\n")
        else:
            sys.stdout.write(markdown(*shown) + "\n")
        sys.stdout.flush()
        print(notes, file=sys.stderr, flush=True)

    if args.csv:
        write_csv(args.csv, columns, records)
    if args.out:
        write_summary(args.out, rows, (keys, summaries) if group_by else None,
                      {"sources": [str(p) for p in args.paths], "filters": args.filter, "group_by": keys})
    if args.plot:
        from biprop_hpc.archive.plots import write_plots  # matplotlib only when plots are asked for
        write_plots(rows, args.plot)
    return None


def layer_records(row: RunRow) -> list[dict]:
    """A run's BIPROP layers (/layers) with their kept fraction at every recorded epoch (/kept_fraction)."""
    kept = row.record.kept_fraction
    columns = {name: [epoch_row[i] for epoch_row in kept["fractions"]] for i, name in enumerate(kept["layers"])}
    return [{"name": layer["name"], "weights": layer["weights"], "kept": layer["kept"],
             "kept_fraction": layer["kept"] / layer["weights"], "epochs": kept["epochs"],
             "kept_fraction_per_epoch": columns.get(layer["name"], [])} for layer in row.record.layers]


def format_layers(row: RunRow) -> str:
    """A run's layers as text: name, weights, kept, kept % now and at the first and last recorded epoch."""
    pruning = row.settings.get("pruning", "layerwise")
    layers = layer_records(row)
    epochs = layers[0]["epochs"] if layers else []
    ends = sorted({epochs[0], epochs[-1]}) if epochs else []      # archives before /kept_fraction: none
    header = ["layer", "weights", "kept", "kept %"] + [f"epoch {e} %" for e in ends]
    cells = []
    for layer in layers:
        per_epoch = layer["kept_fraction_per_epoch"]
        ends = [per_epoch[0], per_epoch[-1]][:len(header) - 4] if per_epoch else []
        cells.append([layer["name"], str(layer["weights"]), str(layer["kept"]),
                      f"{100 * layer['kept_fraction']:.2f}"] + [f"{100 * f:.2f}" for f in ends])
    return f"{row.run_id} ({pruning} pruning)\n" + aligned(header, cells, [False] + [True] * (len(header) - 1))


def no_runs_message(paths: list[str], passed_over: list[tuple[Path, str]], out: str | None) -> str:
    """Why there is nothing to report: where was looked, for what, and what was found instead."""
    found = (f"; found only {format_passed_over(passed_over).removeprefix('passed over ')}" if passed_over
             else "; found no *.h5 file at all")
    skipped = f", the --out file {out} skipped" if out else ""
    return (f"no run archive under {', '.join(map(str, paths))} (looked for *.h5 run archives: "
            f"<out>/<config_name>/keep=<k>/<name>/archive.h5, hidden directories skipped{skipped}){found}. "
            "Give a sweep's or run's output directory (the config's `out`), or an archive.h5")


def _check_paths(paths: list[str], key_types: dict) -> None:
    """A missing path that is a config key (or KEY=VALUE) was most likely meant as a second value of --group-by
    or --filter, which take one value each: say so."""
    for given in paths:
        if not Path(given).exists():
            hint = ""
            if given.partition("=")[0] in key_types or given == "auto":
                hint = (" (--group-by and --filter take one value each: repeat the option, e.g. --filter a=1 "
                        "--filter b=2, or join group keys with commas: --group-by a,b)")
            raise ValueError(f"{given}: no such file or directory{hint}")


def split_keys(values: list[str]) -> list[str]:
    """--group-by values (repeated and/or comma-separated) -> the keys, in order, each once."""
    return list(dict.fromkeys(key.strip() for value in values for key in value.split(",") if key.strip()))


def _shown_table(args, rows: list[RunRow], groups: list[Group], summaries: list[dict],
                 keys: list[str]) -> tuple[tuple, list[str], list[dict]]:
    """The table to show: the best runs, the groups, or every run, as its view (header, cells, right-aligned
    columns; run_view, group_view), and as its columns and records (CSV, JSON)."""
    if args.best:
        best = {id(run) for run in map(best_run, groups) if run is not None}
        shown = sort_rows([row for row in rows if id(row) in best], args.sort, RunRow.value)
    elif groups:
        summaries = sort_rows(summaries, args.sort, _summary_value)
        return group_view(summaries, keys), list(group_columns(summaries, keys)), summaries
    else:
        shown = sort_rows(rows, args.sort, RunRow.value)
    return run_view(shown), list(TABLE_COLUMNS), [run_record(row) for row in shown]


def _checked_group_keys(keys: list[str], key_types: dict) -> list[str]:
    if "auto" in keys and len(keys) > 1:
        raise ValueError("--group-by auto groups by every varying key; give it alone or list keys instead")
    unknown = [key for key in keys if key != "auto" and key not in key_types]
    if unknown:
        raise ValueError(f"--group-by {unknown[0]}: not a config key")
    return keys


def _summary_value(summary: dict, key: str):
    if key not in summary:
        raise ValueError(f"--sort {key}: the group table has no column {key!r} (columns: {', '.join(summary)})")
    return summary[key]
