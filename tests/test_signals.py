"""SIGTERM stops every long-running command but `train` within 2 s (killed by the signal: a shell's $? is 143),
leaving no partial output and no worker process behind. (`train` checkpoints on SIGUSR1/SIGTERM instead:
test_train.py, test_jobs_slurm.py.)

Each command runs as a real process (`python -m biprop_hpc ...`) on an input large enough that it is still at
work when the signal comes, and is signalled only once it provably works: its input file is open (seen in
/proc/PID/fd), its first output file exists, or its scheduler query has started. Linux only (/proc).
"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_idx, write_tiny_dataset
from biprop_hpc import cli
from biprop_hpc.config import build_config
from biprop_hpc.dist import Local
from biprop_hpc.ticket.export import export_ticket
from biprop_hpc.train import train

REPO = Path(__file__).resolve().parents[1]
STOP_SECONDS = 2.0
LEGACY_ARCHIVE = REPO / "bench/results/h100-2026-11-26/conv2_mpt1-32.h5"


# --- watching a process through /proc ---------------------------------------------------------------------

def descendants(pid: int) -> set[int]:
    """Children, grandchildren, ... of `pid` (/proc/PID/task/TID/children, proc(5))."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                kids = Path(f"/proc/{parent}/task/{thread}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped (the state is the field after the command's parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def open_files(pid: int) -> list[str]:
    """The files the process (and its workers) hold open."""
    paths = []
    for process in {pid} | descendants(pid):
        try:
            fds = os.listdir(f"/proc/{process}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                paths.append(os.readlink(f"/proc/{process}/fd/{fd}"))
            except OSError:
                pass
    return paths


def holds_open_under(pid: int, directory: Path, suffix: str = "") -> bool:
    return any(path.startswith(f"{directory}/") and path.endswith(suffix) for path in open_files(pid))


class Command:
    """`python -m biprop_hpc ARGS` started in the background, its output in files under `logs`."""

    def __init__(self, logs: Path, *args, env: dict | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = logs / "stdout", logs / "stderr"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "biprop_hpc", *map(str, args)], cwd=REPO,
                                            stdout=out, stderr=err, env={**os.environ, **(env or {})})
        self.pid = self.process.pid

    def wait_until(self, condition, what: str, timeout: float = 90) -> None:
        """Poll every 2 ms until `condition()`; fail if the command ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the command ended (exit {self.process.returncode}) before {what}:\n"
                            f"{self.stderr.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no sign within {timeout} s that {what}")
            time.sleep(0.002)

    def kill(self) -> None:
        for pid in [self.pid, *descendants(self.pid)]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> None:
        """Send `signum`; the command must end within STOP_SECONDS, killed by the signal (a shell's $? is
        128 + signum, which it also exits with when the signal came during start-up), leaving no worker process
        and no result on stdout (it was stopped, not finished)."""
        workers = descendants(self.pid)
        assert self.process.poll() is None, "the command ended before it could be stopped"
        sent = time.monotonic()
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=10 * STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {10 * STOP_SECONDS:g} s after {signum.name}")
        took = time.monotonic() - sent
        while any(map(alive, workers)) and time.monotonic() < sent + STOP_SECONDS:
            time.sleep(0.01)
        left = sorted(pid for pid in workers if alive(pid))
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        stderr = self.stderr.read_text()
        assert code in (-signum, 128 + signum), f"exit {code}:\n{stderr[-2000:]}"
        assert f"biprop: stopped by {signum.name}" in stderr, stderr[-2000:]
        assert took < STOP_SECONDS, f"took {took:.2f} s to stop:\n{stderr[-2000:]}"
        assert not left, f"worker processes {left} still run {STOP_SECONDS:g} s after {signum.name}"
        # A command prints its result as one JSON line when it finishes: this one was stopped before.
        assert not any(line.startswith("{") for line in self.stdout.read_text().splitlines())


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


# --- inputs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint and its ticket of a ResNet-18 (half width; exporting it takes seconds), and an IDX dataset of
    its geometry (8x8, 10 classes) whose test split of 3000 images takes it seconds to score."""
    root = tmp_path_factory.mktemp("signals")
    data = write_tiny_dataset(root)
    cfg = build_config(None, {"dataset": "mnist", "data": str(data), "model": "resnet18_cifar", "width_mult": 0.5,
                              "epochs": 1, "batch_size": 32, "eval_batch_size": 64, "train_subset": 32,
                              "val_fraction": 0.2, "out": str(root / "runs"), "threads": 1, "name": "r18"})
    train(cfg, Local())
    checkpoint = cfg.run_dir() / "checkpoints" / "best.pt"
    ticket = Path(export_ticket(checkpoint, root / "r18.ticket.h5")["ticket"])
    big = root / "big"
    big.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("train-images-idx3-ubyte", (100, 8, 8)), ("train-labels-idx1-ubyte", (100,)),
                        ("t10k-images-idx3-ubyte", (3000, 8, 8)), ("t10k-labels-idx1-ubyte", (3000,))):
        write_idx(big / name, rng.integers(0, 10 if "labels" in name else 256, shape), compress=False)
    return {"checkpoint": checkpoint, "ticket": ticket, "data": big}


# --- the commands -----------------------------------------------------------------------------------------

def test_data_prepare_stops_with_its_writing_workers(fashion_mnist, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    command = Command(tmp_path / "logs", "data", "prepare", "fashion-mnist", "--source", fashion_mnist,
                      "--out", out / "tree")
    command.wait_until(lambda: any(out.glob(".tree.*.partial/train/*/*.jpg")), "it wrote its first JPEG")
    command.stop()
    # The tree is renamed into place only when complete; its partial version (hidden) may stay.
    assert [path.name for path in out.iterdir() if not path.name.startswith(".tree.")] == []


def test_data_check_stops_with_its_decoding_workers(tmp_path):
    tree = tmp_path / "tree"
    gradient = np.add.outer(np.arange(768), np.arange(768)) % 256
    image = tmp_path / "image.jpg"
    Image.fromarray(gradient.astype(np.uint8)).convert("RGB").save(image, quality=95)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tree / split / name).mkdir(parents=True)
            for index in range(400):
                shutil.copyfile(image, tree / split / name / f"{index:04d}.jpg")
    command = Command(tmp_path / "logs", "data", "check", tree)
    command.wait_until(lambda: holds_open_under(command.pid, tree, ".jpg"), "it decoded images")
    command.stop()
    assert not (tree / "filelist").exists()


def test_results_stops_while_reading_archives(tmp_path):
    sweep, out = tmp_path / "runs", tmp_path / "out"
    for index in range(400):
        (sweep / "c" / "keep=0.5" / f"seed{index}").mkdir(parents=True)
        shutil.copyfile(LEGACY_ARCHIVE, sweep / "c" / "keep=0.5" / f"seed{index}" / "archive.h5")
    out.mkdir()
    command = Command(tmp_path / "logs", "results", sweep, "--out", out / "summary.h5", "--csv", out / "runs.csv")
    command.wait_until(lambda: holds_open_under(command.pid, sweep, ".h5"), "it read archives")
    command.stop()
    assert files_under(out) == []


@pytest.mark.parametrize("source", ["checkpoint", "ticket"])
def test_evaluate_stops(run, tmp_path, source):
    command = Command(tmp_path / "logs", "evaluate", f"--{source}", run[source], "--data", run["data"],
                      "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    command.wait_until(lambda: str(run[source]) in open_files(command.pid), f"it opened the {source}")
    command.stop()


def test_export_stops_without_a_partial_ticket(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    command = Command(tmp_path / "logs", "export", "--checkpoint", run["checkpoint"], "--out", out / "t.h5")
    command.wait_until(lambda: str(run["checkpoint"]) in open_files(command.pid), "it opened the checkpoint")
    command.stop()
    assert files_under(out) == []


def test_infer_stops_without_partial_predictions(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    command = Command(tmp_path / "logs", "infer", "--ticket", run["ticket"], "--data", run["data"], "--threads", "1",
                      "--predictions", out / "predictions.npy")
    command.wait_until(lambda: str(run["ticket"]) in open_files(command.pid), "it opened the ticket")
    command.stop()
    assert files_under(out) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_jobs_status_stops_and_ends_its_scheduler_query(tmp_path, signum):
    """A scheduler that does not answer (a stand-in squeue that sleeps) keeps `jobs status` waiting up to 30 s
    (schedulers._query's timeout); SIGTERM ends the wait and the query, and so does a scheduler's warning
    (SIGUSR1), which only `train` takes as "checkpoint now"."""
    directory = tmp_path / "sweeps" / "s"
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(
        '{"manifest_version": 1, "name": "s", "scheduler": "slurm", "created": "", "script": "", "workdir": "", '
        f'"runs": [{{"index": 1, "args": [], "run_dir": "{tmp_path}/runs/r", "values": {{}}}}], '
        '"submissions": [{"job_ids": {"1": "100_1"}}]}')
    bin_dir, asked = tmp_path / "bin", tmp_path / "asked"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f'#!/bin/bash\necho $$ > "{asked}.tmp" && mv "{asked}.tmp" "{asked}"\n'
                                    "exec sleep 60\n")
    (bin_dir / "squeue").chmod(0o755)
    command = Command(tmp_path / "logs", "jobs", "status", directory,
                      env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    command.wait_until(asked.exists, "it asked the scheduler")
    query = int(asked.read_text())
    command.stop(signum)
    assert not alive(query), "the scheduler query outlived the command"


# --- a signal during start-up -------------------------------------------------------------------------------

@pytest.fixture
def own_signal_handlers():
    """main() installs its handlers in this (the test's) process: put the test process's own back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_start_up_ends_a_command_before_it_starts(tmp_path, monkeypatch, capsys,
                                                                  own_signal_handlers, signum):
    """Until the command line is parsed, the stop signals are only recorded (`train` must not be killed by one
    during its start-up); any other command then ends at once, exit 128 + signum, having done nothing."""
    make_parser = cli._parser

    def parser_signalled_while_parsing():
        parser = make_parser()
        parse = parser.parse_known_args

        def parse_known_args(argv):
            os.kill(os.getpid(), signum)      # as a scheduler's signal would come during a slow start-up
            return parse(argv)
        parser.parse_known_args = parse_known_args
        return parser

    monkeypatch.setattr(cli, "_parser", parser_signalled_while_parsing)
    assert cli.main(["results", str(tmp_path), "--csv", str(tmp_path / "runs.csv")]) == 128 + signum
    assert not (tmp_path / "runs.csv").exists()
    assert f"biprop: stopped by {signum.name}" in capsys.readouterr().err


def test_trains_deadline_does_not_stop_other_commands(tmp_path, monkeypatch, own_signal_handlers):
    """BIPROP_STOP_AT (the job scripts' deadline for `train`) counts as a stop request for train only."""
    monkeypatch.setenv("BIPROP_STOP_AT", "1")          # long past
    assert cli.main(["configs", "copy", "fashion-mnist/default", str(tmp_path) + "/"]) == 0
    assert (tmp_path / "default.yaml").exists()


def test_an_unsupported_launcher_is_a_one_line_error(tmp_path, monkeypatch, capsys, own_signal_handlers):
    """init_distributed refusing a launcher (torchrun's variables, biprop_hpc.dist) is bad input like any other:
    exit 2 and one line, not a traceback."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    assert cli.main(["results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("biprop: error: ") and err.count("\n") == 1, err
