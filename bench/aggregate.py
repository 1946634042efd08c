"""`biprop results` on 1,000 run archives: how long the table takes (target: under 10 s on 2 cores).

  python bench/aggregate.py [--runs 1000] [--source ARCHIVE] [--repeats 3]

The sweep is made of copies of one real archive (default: the 10-epoch Fashion-MNIST Conv2 run in
bench/results/h100-2026-11-26/) with varied attributes, written with write_archive into a temporary directory
laid out as runs are (<out>/<config>/keep=<k>/<name>/archive.h5): 2 models x 2 inits x 5 keep ratios x seeds,
their accuracies shifted, 3% still running, 2% stale (heartbeat a day old), 1% failed. Timed, median of
--repeats:
  library   collect_runs + group by auto + the formatted group table, in this process (imports done)
  command   `python -m biprop_hpc results DIR --group-by auto` as a fresh process (imports included)
The files were just written, so they are in the page cache: this measures the program, not a cold file system.
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from biprop_hpc.archive import RunRecord, read_archive, write_archive
from biprop_hpc.archive.results import collect_runs, format_groups, group_runs, group_summary, varying_keys

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "bench/results/h100-2026-11-26/conv2_mpt1-32.h5"
MODELS, INITS, KEEPS = ("conv2", "conv2_bin"), ("kn", "sc"), (0.05, 0.1, 0.2, 0.3, 0.5)


def make_sweep(source: Path, out: Path, runs: int) -> None:
    base = read_archive(source)
    rng = random.Random(0)
    now = datetime.now(timezone.utc)
    for index in range(runs):
        model, init, keep = MODELS[index % 2], INITS[index // 2 % 2], KEEPS[index // 4 % 5]
        seed = index // 20
        config_name = f"{model}_{init}"
        config = {**base.config, "model": model, "weight_init": init, "keep_ratio": keep, "seed": seed,
                  "name": f"seed{seed}", "config_name": config_name, "out": str(out)}
        draw = rng.random()
        status = "failed" if draw < 0.01 else "running" if draw < 0.04 else "stale" if draw < 0.06 else "completed"
        heartbeat = now - timedelta(days=1) if status == "stale" else now
        attrs = {**base.attrs, "config": json.dumps(config, sort_keys=True), "model": model, "keep_ratio": keep,
                 "seed": seed, "status": "running" if status == "stale" else status,
                 "heartbeat": heartbeat.isoformat(timespec="seconds")}
        shift = rng.gauss(0, 1) - 10 * (0.5 - keep)
        metrics = {**base.metrics, "val_top1": [v + shift for v in base.metrics["val_top1"]]}
        final = {} if status != "completed" else {
            **base.final, "best_val_top1": base.final["best_val_top1"] + shift,
            "test_top1": base.final["test_top1"] + shift, "test_top5": min(100.0, base.final["test_top5"] + shift / 4)}
        write_archive(out / config_name / f"keep={keep:g}" / f"seed{seed}" / "archive.h5",
                      RunRecord(attrs, metrics, final, base.layers))


def library_table(directory: Path) -> str:
    rows = collect_runs([str(directory)])
    keys = varying_keys(rows)
    return format_groups([group_summary(group) for group in group_runs(rows, keys)], keys)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--source", type=Path, default=SOURCE, help="a real run archive to copy")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "runs"
        start = time.perf_counter()
        make_sweep(args.source, sweep, args.runs)
        print(f"wrote {args.runs} archives in {time.perf_counter() - start:.1f} s ({sweep})")
        table = library_table(sweep)
        print(table.splitlines()[0][:120], f"... ({len(table.splitlines()) - 2} groups)")
        library = median_seconds(lambda: library_table(sweep), args.repeats)
        command = [sys.executable, "-m", "biprop_hpc", "results", str(sweep), "--group-by", "auto"]
        cli = median_seconds(lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL), args.repeats)
        print(f"{args.runs} archives, median of {args.repeats}: library {library:.2f} s "
              f"({1e3 * library / args.runs:.2f} ms per archive), command {cli:.2f} s (target < 10 s)")


if __name__ == "__main__":
    main()
