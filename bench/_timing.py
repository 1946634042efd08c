"""Small timing helpers shared by the CPU benchmarks (bench/cpu_step.py, allreduce.py, loader.py)."""
import os
import shutil
import statistics
import sys
import time


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def interleaved_times_ms(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Wall times (ms) of each named callable, run in turn (a, b, a, b, ...) so drifts in machine load hit all
    alike: {name: [time of round 1, round 2, ...]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def table(header: list[str], rows: list[list], formats: list[str]) -> str:
    """A plain right-aligned text table; `formats` are format specs per column (e.g. '.1f', 's')."""
    cells = [[format(value, spec) if not isinstance(value, str) else value for value, spec in zip(row, formats)]
             for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def mpirun_prefix(ranks: int, hint: str = "") -> tuple[list[str], dict]:
    """`mpirun ... -np ranks` on this host (every rank on the shared cores) and its environment; exits naming
    what is missing without mpirun."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        sys.exit(f"mpirun not found on PATH{hint}")
    env = dict(os.environ)
    root = os.geteuid() == 0
    if root:  # Open MPI refuses root unless told that it is meant
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return [mpirun, *(["--allow-run-as-root"] if root else []), "--oversubscribe", "--bind-to", "none",
            "-np", str(ranks)], env
