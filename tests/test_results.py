"""`biprop results` on archives of short real runs, plus the odd files a sweep on a shared file system leaves."""
import csv
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import write_tiny_dataset
from biprop_hpc.archive import SCHEMA_VERSION, RunRecord, read_archive, write_archive
from biprop_hpc.archive.results import (TABLE_COLUMNS, TICKET_FORMAT, RunRow, apply_filters, collect_runs,
                                        config_key_types, find_runs, parse_filters, varying_keys)
from biprop_hpc.cli import main
from biprop_hpc.config import EXECUTION_KEYS, build_config
from biprop_hpc.ticket.export import export_ticket
from biprop_hpc.ticket.file import FORMAT
from biprop_hpc.dist import Local
from biprop_hpc.train import train

REPO = Path(__file__).resolve().parents[1]
PAPER = 60.0                   # a reference accuracy given to the searched runs' config
REAL_COMPLETED = ["tiny/keep=0.5/seed0", "tiny/keep=0.5/seed1", "tiny/keep=0.25/seed0", "tiny/keep=0.25/seed1",
                  "tiny/keep=0.25/seed2", "tiny_dense/keep=0.5/seed0"]
REQUEUED = "tiny/keep=0.25/seed2"
BROKEN = {"broken/keep=0.5/truncated": "truncated", "broken/keep=0.5/empty": "empty",
          "broken/keep=0.5/text": "not HDF5", "broken/keep=0.5/newer": "newer schema"}


def real_run(out: Path, data: Path, **overrides) -> Path:
    values = {"dataset": "mnist", "data": str(data), "model": "conv2", "width_mult": 0.25, "epochs": 2,
              "batch_size": 32, "eval_batch_size": 64, "val_fraction": 0.2, "out": str(out), "lr": 0.05,
              "threads": 1, "config_name": "tiny", "paper_top1": PAPER, **overrides}
    cfg = build_config(None, values)
    train(cfg, Local())
    return cfg.run_dir() / "archive.h5"


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """runs/: six completed real runs (two keep ratios, three seeds at 0.25, a dense one), one of them requeued
    twice; a run still running and one marked running whose heartbeat is two hours old; four broken files."""
    data = write_tiny_dataset(tmp_path_factory.mktemp("data"))
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    for keep, seeds in ((0.5, (0, 1, 3, 4)), (0.25, (0, 1, 2))):
        for seed in seeds:
            real_run(runs, data, keep_ratio=keep, seed=seed)
    real_run(runs, data, config_name="tiny_dense", layer_type="dense", paper_top1=0.0)

    now = datetime.now(timezone.utc)
    requeued = runs / REQUEUED / "archive.h5"
    record = read_archive(requeued)
    record.restarts = [{"time": iso(now - timedelta(minutes=30)), "epoch": 1, "step": 3, "reason": "SIGUSR1"},
                       {"time": iso(now - timedelta(minutes=10)), "epoch": 1, "step": 9,
                        "reason": "unknown (no stop recorded)"}]
    write_archive(requeued, record)
    for name, heartbeat in (("seed3", now - timedelta(hours=2)), ("seed4", now)):
        path = runs / "tiny/keep=0.5" / name / "archive.h5"
        record = read_archive(path)
        record.attrs.update(status="running", heartbeat=iso(heartbeat), end_time="")
        record.metrics = {key: values[:1] for key, values in record.metrics.items()}
        record.final = {}
        write_archive(path, record)

    good = (runs / "tiny/keep=0.5/seed0/archive.h5").read_bytes()
    broken = {name: runs / name / "archive.h5" for name in BROKEN}
    for path in broken.values():
        path.parent.mkdir(parents=True)
    broken["broken/keep=0.5/truncated"].write_bytes(good[: len(good) // 2])
    broken["broken/keep=0.5/empty"].write_bytes(b"")
    broken["broken/keep=0.5/text"].write_text("status: completed\n")
    write_archive(broken["broken/keep=0.5/newer"], read_archive(runs / "tiny/keep=0.5/seed0/archive.h5"))
    with h5py.File(broken["broken/keep=0.5/newer"], "a") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION + 1
    return runs


def archive_values(path: Path) -> dict:
    """What a row should say, read with h5py directly (not through the code under test)."""
    with h5py.File(path, "r", locking=False) as h5:
        config = json.loads(h5.attrs["config"])
        return {"final": dict(h5["final"].attrs), "status": h5.attrs["status"], "config": config,
                "epochs": len(h5["metrics/epoch"]), "wall": float(np.sum(h5["metrics/epoch_seconds"][()])),
                "val_top1": h5["metrics/val_top1"][()], "restarts": len(h5["restarts"]) if "restarts" in h5 else 0,
                "world_size": int(h5.attrs["world_size"])}


def run_cli(*args) -> int:
    return main(["results", *map(str, args)])


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_table_rows_match_the_archives(sweep):
    rows = {row.run_id: row for row in collect_runs([sweep])}
    assert len(rows) == len(list(sweep.rglob("*.h5"))) == 12
    for run_id in REAL_COMPLETED:
        row, expected = rows[run_id], archive_values(sweep / run_id / "archive.h5")
        final, config = expected["final"], expected["config"]
        assert row.status == "completed"
        assert (row.run, row.config, row.model) == (run_id.split("/")[-1], run_id.split("/")[0], "conv2")
        assert row.type == ("dense" if config["layer_type"] == "dense" else "MPT-1/32")
        assert (row.init, row.batchnorm) == ("kn", "non-affine")
        assert (row.keep_ratio, row.seed, row.world_size) == (config["keep_ratio"], config["seed"], 1)
        assert (row.epochs_done, row.epochs_total) == (expected["epochs"], 2)
        assert row.restarts == (2 if run_id == REQUEUED else 0)
        assert row.best_val_top1 == final["best_val_top1"] == pytest.approx(np.max(expected["val_top1"]))
        assert (row.test_top1, row.test_top5) == (final["test_top1"], final["test_top5"])
        if config["layer_type"] == "dense":
            assert row.paper_top1 is None and row.paper_diff is None
        else:
            assert row.paper_diff == pytest.approx(final["test_top1"] - PAPER)
        assert row.wall_seconds == pytest.approx(expected["wall"])


def test_bad_and_unfinished_runs_are_listed_with_their_state(sweep):
    rows = {row.run_id: row for row in collect_runs([sweep])}
    assert rows["tiny/keep=0.5/seed3"].status == "stale"           # running, heartbeat 2 h old
    assert "2h00m" in rows["tiny/keep=0.5/seed3"].note and "heartbeat" in rows["tiny/keep=0.5/seed3"].note
    assert rows["tiny/keep=0.5/seed4"].status == "running"         # running, heartbeat now
    assert rows["tiny/keep=0.5/seed4"].epochs_done == 1
    for run_id in BROKEN:
        assert rows[run_id].status == "unreadable", run_id
    assert "newer" in rows["broken/keep=0.5/newer"].note
    by_stale_after = {row.run_id: row.status for row in collect_runs([sweep], stale_after=3 * 3600)}
    assert by_stale_after["tiny/keep=0.5/seed3"] == "running"


def test_each_run_counts_once_with_overlapping_paths_and_filters(sweep):
    rows = collect_runs([sweep, sweep / "tiny", sweep / REQUEUED / "archive.h5"])
    assert len(rows) == 12
    assert [row.restarts for row in rows if row.run_id.endswith(REQUEUED)] == [2]
    kept = apply_filters(rows, parse_filters(["keep_ratio=0.25", "layer_type=biprop,dense"], config_key_types()))
    assert sorted(row.run_id for row in kept if row.settings) == [
        "tiny/keep=0.25/seed0", "tiny/keep=0.25/seed1", "tiny/keep=0.25/seed2"]
    assert sum(not row.settings for row in kept) == len(BROKEN)   # unreadable files are always listed


def expected_groups(runs: Path) -> dict:
    """(config_name, layer_type, keep_ratio) -> the completed runs' values, read with h5py."""
    groups = {}
    for run_id in REAL_COMPLETED:
        values = archive_values(runs / run_id / "archive.h5")
        config = values["config"]
        groups.setdefault((config["config_name"], config["layer_type"], config["keep_ratio"]), []).append(values)
    return groups


def test_grouped_means_and_stds_match_a_computation_here(sweep, tmp_path, capsys):
    assert run_cli(sweep, "--group-by", "auto", "--csv", tmp_path / "groups.csv") == 0
    out = capsys.readouterr().out
    assert "grouped by: config_name, keep_ratio, layer_type" in out
    table = {(r["config_name"], r["layer_type"], float(r["keep_ratio"])): r for r in csv_rows(tmp_path / "groups.csv")}
    expected = expected_groups(sweep)
    assert set(table) == set(expected)
    left_out = {("tiny", "biprop", 0.5): 2}        # the stale and the running run
    for key, runs in expected.items():
        row = table[key]
        assert int(row["runs"]) == len(runs) and int(row["left_out"]) == left_out.get(key, 0)
        for column in ("best_val_top1", "test_top1", "test_top5"):
            values = [run["final"][column] for run in runs]
            assert float(row[column]) == pytest.approx(sum(values) / len(values))
            if len(values) > 1:
                mean = sum(values) / len(values)
                std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
                assert float(row[f"{column}_std"]) == pytest.approx(std)
            else:
                assert row[f"{column}_std"] == ""
    assert len(expected[("tiny", "biprop", 0.25)]) == 3          # the requeued run counted once


def test_best_run_per_group_is_chosen_by_validation_never_by_test(sweep, tmp_path):
    assert run_cli(sweep, "--best", "--csv", tmp_path / "best.csv") == 0
    best = {(r["config"], r["type"], float(r["keep_ratio"])): r["run_id"] for r in csv_rows(tmp_path / "best.csv")}
    for (config_name, layer_type, keep), runs in expected_groups(sweep).items():
        top = max(runs, key=lambda run: (run["final"]["best_val_top1"], -run["config"]["seed"]))
        kind = "dense" if layer_type == "dense" else "MPT-1/32"
        assert best[(config_name, kind, keep)].endswith(f"keep={keep:g}/{top['config']['name']}")

    # Two copies whose validation and test disagree: the one better on validation is the best.
    odd = tmp_path / "odd"
    for name, val, test in (("seed0", 90.0, 50.0), ("seed1", 80.0, 99.0)):
        record = read_archive(sweep / "tiny/keep=0.5" / name / "archive.h5")
        record.final.update(best_val_top1=val, test_top1=test)
        write_archive(odd / "tiny/keep=0.5" / name / "archive.h5", record)
    assert run_cli(odd, "--best", "--group-by", "keep_ratio", "--csv", tmp_path / "odd.csv") == 0
    assert [r["run_id"] for r in csv_rows(tmp_path / "odd.csv")] == ["tiny/keep=0.5/seed0"]


def test_csv_and_terminal_table_hold_every_run(sweep, tmp_path, capsys):
    assert run_cli(sweep, "--csv", tmp_path / "runs.csv", "--sort", "test_top1") == 0
    out = capsys.readouterr().out
    rows = csv_rows(tmp_path / "runs.csv")
    assert list(rows[0]) == list(TABLE_COLUMNS) and len(rows) == 12
    by_id = {r["run_id"]: r for r in rows}
    for run_id in REAL_COMPLETED:
        expected = archive_values(sweep / run_id / "archive.h5")
        assert float(by_id[run_id]["test_top1"]) == expected["final"]["test_top1"]
        assert float(by_id[run_id]["best_val_top1"]) == expected["final"]["best_val_top1"]
        assert by_id[run_id]["status"] == "completed"
    tests = [float(r["test_top1"]) for r in rows if r["test_top1"]]
    assert tests == sorted(tests) and not any(rows[i]["test_top1"] for i in range(12 - len(tests)))

    lines = out.splitlines()
    header, rule = lines[0], lines[1]
    assert set(rule.replace(" ", "")) == {"-"}
    end = header.index("test top-1") + len("test top-1")            # right-aligned under its header
    completed = [line for line in lines[2:14] if line.endswith("completed")]
    assert len(completed) == len(REAL_COMPLETED)
    assert all(line[end - 1].isdigit() and line[end] == " " for line in completed)
    assert "left out of the statistics:" in out and out.count("unreadable") >= len(BROKEN)


def test_summary_archive_holds_copies_and_is_rewritten(sweep, tmp_path):
    runs = shutil.copytree(sweep, tmp_path / "runs")
    summary = tmp_path / "summary.h5"
    assert run_cli(runs, "--out", summary, "--group-by", "auto") == 0
    shutil.rmtree(runs)                                        # the summary outlives the runs
    with h5py.File(summary, "r") as h5:
        assert h5.attrs["kind"] == "biprop-hpc results summary"
        table = h5["table"][()]
        assert table.dtype.names == tuple(TABLE_COLUMNS) and len(table) == 12
        ids = [name.decode() for name in table["run_id"]]
        assert len(h5["groups"]) == 3
        for run_id in REAL_COMPLETED + ["tiny/keep=0.5/seed3", "tiny/keep=0.5/seed4"]:
            expected = archive_values(sweep / run_id / "archive.h5")
            assert run_id in ids
            group = h5["runs/" + run_id]
            assert json.loads(group.attrs["config"]) == expected["config"]
            assert np.array_equal(group["metrics/val_top1"][()], expected["val_top1"])
            assert dict(group["final"].attrs) == expected["final"]
            assert len(group["restarts"]) == expected["restarts"]
        links = []
        h5.visit(lambda name: links.append(type(h5.get(name, getlink=True))))
        assert set(links) == {h5py.HardLink}                   # copies, no external links

    assert run_cli(sweep, "--out", summary, "--filter", "keep_ratio=0.25") == 0
    with h5py.File(summary, "r") as h5:
        assert len(h5["table"]) == 3 + len(BROKEN) and "groups" not in h5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.h5"]   # no temporary file left


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_pngs_of_the_expected_size(sweep, tmp_path):
    assert run_cli(sweep, "--plot", tmp_path / "plots") == 0
    for name in ("top1_vs_keep_ratio.png", "val_top1_curves.png"):
        path = tmp_path / "plots" / name
        width, height = png_size(path)     # 10 x 6 inches at 100 dpi, cropped to what is drawn (bbox "tight")
        assert 700 <= width <= 1000 and 450 <= height <= 600, (width, height)
        assert path.stat().st_size > 20_000, "a plot with lines, not an empty frame"


def test_table_path_imports_neither_torch_nor_matplotlib():
    code = ("import sys; import biprop_hpc.archive.results; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_reading_never_modifies_an_archive(sweep, tmp_path):
    def state():
        return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(sweep.rglob("*")) if p.is_file()}
    before = state()
    assert run_cli(sweep, "--group-by", "auto", "--csv", tmp_path / "t.csv", "--out", tmp_path / "s.h5",
                   "--plot", tmp_path / "plots") == 0
    assert run_cli(sweep, "--best") == 0
    assert state() == before


def test_version_1_archive_and_stale_rule(tmp_path, sweep):
    legacy = REPO / "bench/results/h100-2026-11-26/conv2_mpt1-32.h5"
    shutil.copy(legacy, tmp_path / "legacy.h5")
    [row] = collect_runs([tmp_path / "legacy.h5"])
    expected = archive_values(legacy)
    assert (row.status, row.restarts, row.epochs_done, row.epochs_total) == ("completed", 0, 10, 10)
    assert row.test_top1 == expected["final"]["test_top1"] and row.type == "MPT-1/32"

    # Median epoch 500 s -> a running run is stale after 1500 s; without a heartbeat the file time counts.
    now = datetime.now(timezone.utc)
    record = read_archive(sweep / "tiny/keep=0.5/seed0/archive.h5")
    record.metrics["epoch_seconds"] = [400.0, 600.0]
    cases = {"quiet20m": ("running", now - timedelta(minutes=20)), "quiet30m": ("running", now - timedelta(minutes=30)),
             "no_heartbeat": ("running", None), "quiet3h": ("running", now - timedelta(hours=3)),
             "waiting3h": ("checkpointed", now - timedelta(hours=3)), "waiting_no_heartbeat": ("checkpointed", None)}
    for name, (status, heartbeat) in cases.items():
        record.attrs.update(status=status, heartbeat=iso(heartbeat) if heartbeat else "")
        write_archive(tmp_path / "runs" / name / "archive.h5", record)
    old = (now - timedelta(hours=1)).timestamp()
    for name in ("no_heartbeat", "waiting_no_heartbeat"):
        os.utime(tmp_path / "runs" / name / "archive.h5", (old, old))
    rows = {Path(r.run_id).name: r for r in collect_runs([tmp_path / "runs"], now=now)}
    assert {name: row.status for name, row in rows.items()} == {
        "quiet20m": "running", "quiet30m": "stale", "no_heartbeat": "stale", "quiet3h": "stale",
        # A checkpointed run waits for its continuation, in the queue for hours maybe: never stale.
        "waiting3h": "checkpointed", "waiting_no_heartbeat": "checkpointed"}
    assert rows["quiet3h"].note.startswith("running, but no sign of life for 3h00m (heartbeat")
    assert rows["waiting3h"].note == "waiting 3h00m for its continuation (heartbeat)"
    assert rows["waiting_no_heartbeat"].note == "waiting 1h00m for its continuation (file time)"
    rows = {Path(r.run_id).name: r for r in collect_runs([tmp_path / "runs"], now=now, stale_after=60)}
    assert rows["quiet20m"].status == "stale" and rows["waiting3h"].status == "checkpointed"


def test_tickets_and_other_hdf5_files_beside_runs_are_passed_over(sweep, tmp_path, capsys):
    """Tickets exported beside their runs, an earlier summary and a foreign HDF5 file are no runs: counted in
    one line, not rows. Files that may be damaged archives stay `unreadable` rows."""
    assert TICKET_FORMAT == FORMAT       # results.py's copy of the ticket's format attribute
    runs = tmp_path / "runs"
    for run_id in ("tiny/keep=0.5/seed0", "tiny/keep=0.25/seed1"):
        shutil.copytree(sweep / run_id, runs / run_id)
        export_ticket(runs / run_id / "checkpoints" / "best.pt", runs / run_id / "best.ticket.h5")
    assert run_cli(sweep, "--out", runs / "summary.h5") == 0                  # kind="biprop-hpc results summary"
    with h5py.File(runs / "foreign.h5", "w") as h5:
        h5["x"] = np.arange(3)
    damaged = {"no_groups": runs / "broken/keep=0.5/no_groups/a.h5",             # a schema_version, no groups
               "named_archive": runs / "broken/keep=0.5/named/archive.h5",      # named as a run's archive
               "truncated_ticket": runs / "broken/keep=0.5/ticket.h5"}          # no longer HDF5 at all
    for name in ("no_groups", "named_archive"):
        damaged[name].parent.mkdir(parents=True)
        with h5py.File(damaged[name], "w") as h5:
            h5.attrs.update({"schema_version": SCHEMA_VERSION} if name == "no_groups" else {"kind": "foreign"})
    ticket = (runs / "tiny/keep=0.5/seed0/best.ticket.h5").read_bytes()
    damaged["truncated_ticket"].write_bytes(ticket[: len(ticket) // 2])
    capsys.readouterr()

    rows, passed_over = find_runs([runs])
    assert sorted(row.run_id for row in rows) == ["broken/keep=0.5/named", "broken/keep=0.5/ticket",
                                                  "keep=0.5/no_groups/a", "tiny/keep=0.25/seed1",
                                                  "tiny/keep=0.5/seed0"]
    assert [row.status for row in rows if "tiny" not in row.run_id] == ["unreadable"] * 3
    assert sorted((path.name, kind) for path, kind in passed_over) == [
        ("best.ticket.h5", "ticket"), ("best.ticket.h5", "ticket"), ("foreign.h5", "other"), ("summary.h5", "other")]
    assert run_cli(runs) == 0
    out = capsys.readouterr().out
    assert "5 runs: 2 completed, 3 unreadable" in out
    assert "passed over 4 HDF5 files that are not run archives (2 tickets, 2 other)" in out
    assert "best.ticket.h5" not in out and "summary.h5" not in out and "foreign.h5" not in out


def test_auto_grouping_ignores_the_seed_and_every_execution_key():
    """Runs that differ only in how they were executed (config.EXECUTION_KEYS) or in the seed are one group."""
    base = {"model": "conv2", "keep_ratio": 0.5, "seed": 0, "config_name": "a", "loader": "torch",
            "channels_last": False, "out": "runs", "threads": 1}

    def rows(key, values):
        return [RunRow(run_id=str(i), path="", status="completed", settings={**base, key: value})
                for i, value in enumerate(values)]
    for key in ("seed", *EXECUTION_KEYS):
        assert varying_keys(rows(key, [f"{key}-1", f"{key}-2"])) == [], key
    assert varying_keys(rows("keep_ratio", [0.5, 0.25])) == ["keep_ratio"]


@pytest.mark.parametrize("args, message", [
    (["/no/such/sweep"], "no such file or directory"),
    (["{runs}", "--filter", "keep_ration=0.5"], "'keep_ration' is not a config key"),
    (["{runs}", "--filter", "keep_ratio=half"], "keep_ratio is a number"),
    (["{runs}", "--filter", "keep_ratio"], "expected KEY=VALUE"),
    (["{runs}", "--group-by", "modle"], "--group-by modle: not a config key"),
    (["{runs}", "--sort", "tset_top1"], "--sort tset_top1: not a column"),
])
def test_bad_input_is_a_clear_error(sweep, capsys, args, message):
    assert run_cli(*[arg.format(runs=sweep) for arg in args]) == 2
    assert message in capsys.readouterr().err


def test_paper_configs_carry_the_reported_accuracy():
    reported = {"cifar10/vgg_small_mpt1-32_kn": 91.48, "cifar10/vgg_small_mpt1-32_sc": 91.48,
                "cifar10/resnet18_mpt1-32_kn": 94.66, "cifar10/resnet18_mpt1-32_sc": 94.66,
                "cifar10/resnet18_mpt1-32_kn_bn": 94.8, "cifar10/resnet18_mpt1-32_sc_bn": 94.8,
                "cifar10/vgg_small_bin_mpt1-1_kn": 89.11, "cifar10/vgg_small_bin_mpt1-1_sc": 89.11,
                "cifar10/vgg_small_bin_mpt1-1_kn_bn": 91.9, "cifar10/vgg_small_bin_mpt1-1_sc_bn": 91.9,
                "imagenet/wrn50-2_mpt1-32_sc": 72.67, "imagenet/wrn50-2_mpt1-32_sc_bn": 74.03,
                "imagenet/wrn34-2_mpt1-1_kn": 45.06, "imagenet/wrn34-2_mpt1-1_kn_bn": 52.07}
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        name = f"{path.parent.name}/{path.stem}"
        if path.parent.name in ("cifar10", "imagenet") and not path.stem.startswith("_"):
            assert build_config(str(path), {}).paper_top1 == reported.get(name, 0.0), name


# --- issue 18: one value per option, a clear error for no archives, stdout holding one format, archive
# dimensions and strings, plots of many groups ---------------------------------------------------------------

def test_group_by_and_filter_take_one_value_so_a_path_after_them_is_a_path(sweep, tmp_path, capsys):
    """Bug: with nargs="+" `results --group-by keep_ratio RUNS` took RUNS as a second key (and no path was left)."""
    assert run_cli("--group-by", "keep_ratio", sweep) == 0
    assert "grouped by: keep_ratio" in capsys.readouterr().out
    assert run_cli("--filter", "keep_ratio=0.25", sweep, "--csv", tmp_path / "f.csv") == 0
    assert sorted(r["run_id"] for r in csv_rows(tmp_path / "f.csv") if r["config"]) == [
        "tiny/keep=0.25/seed0", "tiny/keep=0.25/seed1", "tiny/keep=0.25/seed2"]
    # Repeated: a run must match every key (any of a key's comma-separated values).
    assert run_cli("--filter", "keep_ratio=0.5", "--filter", "seed=0,1", "--filter", "layer_type=biprop", sweep,
                   "--csv", tmp_path / "f.csv") == 0
    assert sorted(r["run_id"] for r in csv_rows(tmp_path / "f.csv") if r["config"]) == [
        "tiny/keep=0.5/seed0", "tiny/keep=0.5/seed1"]
    # Several keys: repeated, or comma-separated; the same groups either way.
    assert run_cli("--group-by", "config_name", "--group-by", "keep_ratio", sweep, "--csv", tmp_path / "a.csv") == 0
    assert run_cli(sweep, "--group-by", "config_name,keep_ratio", "--csv", tmp_path / "b.csv") == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert len(csv_rows(tmp_path / "a.csv")) == 3
    capsys.readouterr()
    # The old habit of several values after one option: the stray key is no path, and the error says why.
    assert run_cli("--group-by", "config_name", "keep_ratio", sweep) == 2
    err = capsys.readouterr().err
    assert "keep_ratio: no such file or directory" in err and "--group-by a,b" in err


def test_no_run_archive_under_the_paths_is_an_error(tmp_path, capsys):
    """Bug: an empty directory printed "0 runs:" and exited 0, as if a sweep had found nothing wrong."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(empty) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"no run archive under {empty}" in err and "*.h5" in err and "found no *.h5 file at all" in err
    with h5py.File(empty / "foreign.h5", "w") as h5:   # an HDF5 file that is no archive is still no run
        h5["x"] = np.arange(3)
    assert run_cli(empty) == 2
    assert "found only 1 HDF5 file that is not a run archive (1 other)" in capsys.readouterr().err


def test_stdout_holds_only_the_requested_format(sweep, tmp_path, capsys):
    """Bug: the command line printed a JSON result line after the table. Now stdout is the table alone, in the
    format asked; with csv, json and md the notes (grouping, left out, passed over) go to stderr."""
    assert run_cli(sweep, "--group-by", "auto") == 0
    out = capsys.readouterr().out
    assert not any(line.startswith("{") for line in out.splitlines())
    assert out.splitlines()[-1].startswith("  ") and out.splitlines()[-1].endswith("/archive.h5)")  # a left-out run

    assert run_cli(sweep, "--group-by", "auto", "--format", "csv", "--csv", tmp_path / "groups.csv") == 0
    out, err = capsys.readouterr()
    assert out.encode() == (tmp_path / "groups.csv").read_bytes()       # the same bytes as --csv FILE
    assert "grouped by: config_name, keep_ratio, layer_type" in err and "left out of the statistics" in err

    assert run_cli(sweep, "--group-by", "auto", "--format", "json") == 0
    out, err = capsys.readouterr()
    groups = json.loads(out)
    expected = {(r["config_name"], r["layer_type"], float(r["keep_ratio"])): r
                for r in csv_rows(tmp_path / "groups.csv")}
    assert {(g["config_name"], g["layer_type"], g["keep_ratio"]): g for g in groups}.keys() == expected.keys()
    for group in groups:
        row = expected[(group["config_name"], group["layer_type"], group["keep_ratio"])]
        assert group["runs"] == int(row["runs"]) and group["test_top1"] == float(row["test_top1"])
        assert group["test_top1_std"] == (float(row["test_top1_std"]) if row["test_top1_std"] else None)
    assert "grouped by:" in err

    assert run_cli(sweep, "--format", "json", "--sort", "test_top1") == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 12 and list(runs[0]) == [*TABLE_COLUMNS, "robustness"]  # robustness: null without one
    by_id = {run["run_id"]: run for run in runs}
    for run_id in REAL_COMPLETED:
        assert by_id[run_id]["test_top1"] == archive_values(sweep / run_id / "archive.h5")["final"]["test_top1"]

    assert run_cli(sweep, "--group-by", "auto", "--format", "md") == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 + len(expected)
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[:1] + lines[2:])
    assert lines[0].split(" | ")[:4] == ["| config_name", "keep_ratio", "layer_type", "runs"]
    assert lines[1] == "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    assert "left out of the statistics" in err


def test_archive_metrics_have_an_epoch_dimension_and_text_reads_as_str(sweep, tmp_path):
    """Bug: /metrics had no dimension scale (netCDF-4 readers made up phony_dim_0), and text attributes given as
    bytes came back as bytes. What h5py reads is the truth here (https://docs.h5py.org/en/latest/strings.html:
    variable-length strings in attributes are read as str; strings in datasets as bytes, always)."""
    path = sweep / "tiny/keep=0.25/seed2/archive.h5"            # written by a real run (and requeued)
    record = read_archive(path)
    record.attrs.update(job_id=np.bytes_(b"4711_3"), launcher=b"srun")
    write_archive(tmp_path / "archive.h5", record)
    runs = tmp_path / "runs"
    shutil.copytree(sweep / "tiny/keep=0.5/seed0", runs / "tiny/keep=0.5/seed0")
    assert run_cli(runs, "--out", tmp_path / "summary.h5") == 0
    for file, group in ((path, "/"), (tmp_path / "archive.h5", "/"),
                        (tmp_path / "summary.h5", "runs/tiny/keep=0.5/seed0")):   # the summary's copy too
        with h5py.File(file, "r") as h5:
            metrics = h5[group]["metrics"]
            epoch = metrics["epoch"]
            assert epoch.is_scale and epoch.attrs["NAME"] == b"epoch"
            assert list(epoch[()]) == list(range(1, len(epoch) + 1))
            for name in metrics:
                if name != "epoch":
                    assert metrics[name].dims[0].keys() == ["epoch"], name
                    assert metrics[name].dims[0][0] == epoch
            texts = {key: value for key, value in h5[group].attrs.items() if h5py.check_string_dtype(
                h5[group].attrs.get_id(key).dtype)}
            assert {"config", "status", "model", "job_id", "launcher"} <= texts.keys()
            assert all(type(value) is str for value in texts.values()), texts
            for table, fields in (("layers", ("name",)), ("restarts", ("time", "reason"))):
                for field in fields:   # variable-length UTF-8 (h5py reads dataset strings as bytes regardless)
                    info = h5py.check_string_dtype(h5[group][table].dtype[field])
                    assert (info.encoding, info.length) == ("utf-8", None)
    with h5py.File(tmp_path / "archive.h5", "r") as h5:
        assert (h5.attrs["job_id"], h5.attrs["launcher"]) == ("4711_3", "srun")
    assert read_archive(tmp_path / "archive.h5").restarts == record.restarts


def many_groups(count: int) -> list[RunRow]:
    """Completed runs of `count` settings (lr) x two keep ratios x two seeds, with long config names, so that the
    keep-ratio plot has `count` lines and the learning curves 2 x `count`, with two-line legend entries."""
    rows = []
    for i in range(count):
        for keep in (0.2, 0.5):
            for seed in (0, 1):
                settings = {"config_name": f"conv2_mpt1-32_kn_sweep_{i:02d}", "model": "conv2", "keep_ratio": keep,
                            "lr": 0.01 * (i + 1), "seed": seed, "layer_type": "biprop"}
                curve = [50.0 + i + epoch + seed for epoch in range(5)]
                record = RunRecord(attrs={}, metrics={"epoch": [1, 2, 3, 4, 5], "val_top1": curve})
                rows.append(RunRow(run_id=f"{i}/{keep}/{seed}", path="", status="completed", model="conv2",
                                   type="MPT-1/32", keep_ratio=keep, seed=seed, test_top1=60.0 + i + seed,
                                   settings=settings, record=record))
    return rows


def test_plots_of_13_groups_keep_the_legend_whole_and_every_line_distinct(tmp_path, monkeypatch):
    """Bug: with 13 groups the legend ran off the figure and the 10 colours repeated (all lines solid, one
    marker). The figures are caught as they are saved (Figure.savefig) and measured after a draw."""
    from matplotlib.figure import Figure
    from biprop_hpc.archive.plots import write_plots
    saved = []
    original = Figure.savefig

    def catch(figure, path, **kwargs):
        saved.append(figure)
        return original(figure, path, **kwargs)
    monkeypatch.setattr(Figure, "savefig", catch)
    write_plots(many_groups(13), tmp_path)

    top1, curves = saved
    for figure in saved:
        figure.canvas.draw()
        legend, frame = figure.axes[0].get_legend().get_window_extent(), figure.bbox
        assert frame.x0 <= legend.x0 and legend.x1 <= frame.x1 and frame.y0 <= legend.y0 and legend.y1 <= frame.y1, \
            (legend, frame)
    lines = [container.lines[0] for container in top1.axes[0].containers]        # the errorbar lines
    curves_lines = [line for line in curves.axes[0].get_lines() if not line.get_label().startswith("_")]
    for drawn, count in ((lines, 13), (curves_lines, 26)):
        styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in drawn}
        assert len(drawn) == count and len(styles) == count, styles
    from biprop_hpc.archive.plots import line_style
    assert len({tuple(line_style(i).values()) for i in range(280)}) == 280     # README: 280 distinct lines
