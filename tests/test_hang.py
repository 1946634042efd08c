"""A hung rank ends the job: real 2-rank mpirun runs of `biprop train` (tests/hang_worker.py).

- rank 1 (or 0) stopped with SIGSTOP mid-epoch (after the epoch-1 checkpoint): the other rank, waiting in a
  collective, ends the job within hang_timeout + HANG_MARGIN seconds with exit 124 and one line naming itself, its
  host and what it waits in; the archive says why (when rank 0 is alive to write it); last.pt is untouched, and
  continues the run; the stopped rank is gone too;
- a slow but live run (every step and validation batch 2 s; an epoch and a validation pass each longer than the
  timeout) completes: progress is per step and per evaluation batch, not per epoch.
Before the watchdog, the first job never ended (rank 0 waited for ever; the issue measured 242 s): the
subprocess timeout makes that a failure, and whatever is left of the job is killed by its pids.
"""
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import threading

import pytest

import biprop_hpc.train.watchdog as watchdog
from biprop_hpc import cli
from biprop_hpc.archive import read_archive
from biprop_hpc.config import EXECUTION_KEYS, ConfigError, build_config
from biprop_hpc.dist import Local, horovod_stall_environment, set_horovod_stall_check
from biprop_hpc.train import Run
from biprop_hpc.train.checkpoint import load_checkpoint
from biprop_hpc.train.stopping import HUNG_EXIT
from biprop_hpc.train.watchdog import Watchdog

REPO = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("hang_worker.py"))
# From the stop to mpirun's exit, beyond hang_timeout: the watchdog's poll (timeout / 10, at most 5 s), its last
# words (the archive) and mpirun's teardown of the stopped rank; measured here about 2 s, on 2 busy cores.
HANG_MARGIN = 12.0

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (env/install.sh installs it)")


# --- the watchdog alone (in this process; its `end` records instead of ending) --------------------------------

class Ended:
    def __init__(self):
        self.code, self.event = None, threading.Event()

    def __call__(self, code):
        self.code = code
        self.event.set()


def test_the_watchdog_ends_only_after_timeout_seconds_without_progress():
    ended, said = Ended(), []
    dog = Watchdog(0.5, "rank 3 of 4 on nodeX", last_words=said.append, end=ended).start()
    for step in range(15):  # 1.5 s of progress every 0.1 s: three timeouts long, and never idle for one
        time.sleep(0.1)
        dog.progress(f"training step {step}")
    assert not ended.event.is_set()
    with dog.waiting("allreduce 'x'"):
        assert ended.event.wait(5)
    assert ended.code == HUNG_EXIT == 124
    assert re.fullmatch(r"rank 3 of 4 on nodeX: no progress for \d s \(hang_timeout 0.5 s\), waiting in allreduce 'x' "
                        r"for another rank, which is stopped or stuck .*; ending the job \(exit 124\)", said[0])
    dog.stop()


def test_a_busy_rank_says_it_is_the_stuck_one_and_ends_even_if_its_last_words_block(monkeypatch):
    monkeypatch.setattr(watchdog, "LAST_WORDS_SECONDS", 0.3)
    ended, blocked = Ended(), threading.Event()
    dog = Watchdog(0.2, "rank 1 of 2 on nodeY", last_words=lambda message: blocked.wait(), end=ended)
    dog.start().progress("validation after epoch 3")
    assert ended.event.wait(5) and ended.code == HUNG_EXIT
    assert "busy in validation after epoch 3, not waiting for other ranks: this rank is the stuck one" in dog.hung()
    blocked.set()


def test_a_stopped_or_disabled_watchdog_never_ends_the_process():
    ended = Ended()
    Watchdog(0, "x", end=ended).start()
    dog = Watchdog(0.1, "x", end=ended).start()
    dog.stop()
    assert not ended.event.wait(0.5)


def test_the_hang_timeout_key_and_horovods_stall_check():
    assert build_config(None, {}).hang_timeout == 600 and "hang_timeout" in EXECUTION_KEYS
    with pytest.raises(ConfigError, match="hang_timeout: must be >= 0 seconds"):
        build_config(None, {"hang_timeout": "-1"})
    # Horovod warns after a sixth of the timeout: 60 s (its default) at the default 600, never under 1 s
    assert horovod_stall_environment(600) == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60"}
    assert horovod_stall_environment(30) == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "5"}
    assert horovod_stall_environment(2) == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "1"}
    assert horovod_stall_environment(0) == {}
    environ = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "120"}
    set_horovod_stall_check(30, environ)
    assert environ == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "120"}  # a value the user exported stays
    set_horovod_stall_check(30, environ := {})
    assert environ == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "5"}


def test_the_timeout_is_known_before_horovod_starts_from_the_config_file_and_the_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("hang_timeout: 42\n")
    parse = cli._parser().parse_args
    assert cli._hang_timeout(parse(["train", "--config", str(config)])) == 42
    assert cli._hang_timeout(parse(["train", "--config", str(config), "--hang-timeout", "7"])) == 7
    assert cli._hang_timeout(parse(["train", "--lr", "-1"])) == 600  # a bad config: the default; rank 0 reports it
    assert cli._hang_timeout(parse(["models"])) == 0


# --- real mpirun jobs ------------------------------------------------------------------------------------------


def start_job(out: Path, data: Path, mode: str, *flags: str) -> subprocess.Popen:
    command = ["mpirun", "--oversubscribe", "-np", "2"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    command += [sys.executable, WORKER, str(out), mode, "--dataset", "mnist", "--data", str(data), "--model", "conv2",
                "--width-mult", "0.25", "--batch-size", "16", "--train-subset", "200", "--threads", "1",
                "--out", str(out), "--name", "run", "--lr-schedule", "constant", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def finish(job: subprocess.Popen, out: Path, timeout: float) -> tuple[int, str]:
    """The job's exit code and stderr; on a timeout, the job and its ranks are killed, and the test fails."""
    try:
        _, stderr = job.communicate(timeout=timeout)
        return job.returncode, stderr
    except subprocess.TimeoutExpired:
        job.kill()
        for pid_file in out.glob("pid_*"):  # mpirun's ranks, stopped or waiting, would outlive it
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _, stderr = job.communicate()
        pytest.fail(f"the job did not end within {timeout:.0f} s (a hung rank kept it waiting):\n{stderr[-3000:]}")


def gone(pid: int, within: float) -> bool:
    """Whether process `pid` ends and is reaped within `within` seconds (a rank left orphaned by mpirun is a
    zombie for a second or two, until init reaps it; until then the run lock counts its pid as alive)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.1)
    return False


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_mpirun
@pytest.mark.parametrize("stopped_rank", [1, 0])
def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path, tiny_idx_dir, stopped_rank):
    timeout, waiting_rank = 10.0, 1 - stopped_rank
    out = tmp_path / "out"
    out.mkdir()
    # 6 steps per epoch (180 training images, global batch 32): the rank stops after step 2 of epoch 2
    job = start_job(out, tiny_idx_dir, f"stop:8:{stopped_rank}", "--epochs", "3", "--hang-timeout", str(timeout))
    stopped = out / "stopped"
    deadline = time.monotonic() + 120
    while not stopped.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped_at = time.monotonic()
    assert stopped.exists(), finish(job, out, 5)[1]
    last = out / "default/keep=0.5/run/checkpoints/last.pt"
    before = sha256(last)  # rank 0 cannot write again: it is stopped, or waits for rank 1

    code, stderr = finish(job, out, timeout + HANG_MARGIN + 30)
    ended_after = time.monotonic() - stopped_at

    assert code == HUNG_EXIT, stderr
    assert timeout - 1 <= ended_after <= timeout + HANG_MARGIN, (ended_after, stderr)
    lines = [line for line in stderr.splitlines() if "no progress for" in line]
    assert len(lines) == 1, stderr  # the waiting rank's; the stopped rank says nothing
    assert f"rank {waiting_rank} of 2 on {socket.gethostname()}: no progress for" in lines[0]
    assert "waiting in the optimizer step after step" in lines[0] and "(its gradient allreduce) for another rank" \
        in lines[0]
    assert f"ending the job (exit {HUNG_EXIT})" in lines[0]
    assert "Missing ranks" not in stderr  # Horovod's coordinator itself waits on a stopped rank: no stall warning
    assert gone(int(stopped.read_text()), within=30)  # the launcher took the stopped rank down with the job

    assert sha256(last) == before
    checkpoint = load_checkpoint(last)
    assert (checkpoint["state"]["epoch"], checkpoint["state"]["step"]) == (1, 0)
    archive = read_archive(out / "default/keep=0.5/run/archive.h5")
    assert archive.metrics["epoch"] == [1]
    if stopped_rank == 1:
        assert archive.attrs["status"] == "failed"
        assert archive.attrs["end_reason"] == lines[0].split("] ", 1)[1]  # the line, without time and rank prefix
        reason = archive.attrs["end_reason"]
    else:  # rank 0, which writes the archive, is the stopped one: it stays as it was, with an old heartbeat
        assert archive.attrs["status"] == "running" and "end_reason" not in archive.attrs
        reason = "killed without a word (the archive still said running)"

    # the checkpoint continues (one process, the same global batch), and the continuation says why it was needed
    cfg = build_config(None, {"dataset": "mnist", "data": str(tiny_idx_dir), "model": "conv2", "width_mult": 0.25,
                              "batch_size": 32, "train_subset": 200, "threads": 1, "out": str(out), "name": "run",
                              "lr_schedule": "constant", "epochs": 3, "resume": "auto"})
    Run(cfg, Local()).fit()
    archive = read_archive(out / "default/keep=0.5/run/archive.h5")
    assert archive.attrs["status"] == "completed" and archive.metrics["epoch"] == [1, 2, 3]
    assert [(r["epoch"], r["step"], r["reason"]) for r in archive.restarts] == [(1, 0, reason)]


@needs_mpirun
def test_a_slow_but_live_run_is_not_ended(tmp_path, tiny_idx_dir):
    """Each rank takes 2 s per training step and per validation batch (eval batch 2: 5 batches per rank), against
    an 8 s timeout (6 s to spare for one rank falling behind another on busy cores): the epoch (6 steps, 12 s) and
    the validation pass (10 s) each take longer than the timeout."""
    out = tmp_path / "out"
    out.mkdir()
    job = start_job(out, tiny_idx_dir, "slow:2", "--epochs", "1", "--eval-batch-size", "2", "--test-subset", "8",
                    "--hang-timeout", "8")
    code, stderr = finish(job, out, 120)
    assert code == 0, stderr
    assert "no progress for" not in stderr
    assert read_archive(out / "default/keep=0.5/run/archive.h5").attrs["status"] == "completed"


@needs_mpirun
def test_a_stuck_rank_names_itself_and_horovod_names_it_missing(tmp_path, tiny_idx_dir):
    """Rank 1's Python blocks after step 2, outside a collective (its Horovod thread lives on). Its own watchdog
    says it is the stuck one; Horovod's stall warning (its check time set to a sixth of the timeout,
    dist.horovod_stall_environment) lists rank 1 as missing before the job ends."""
    timeout = 6.0
    out = tmp_path / "out"
    out.mkdir()
    job = start_job(out, tiny_idx_dir, "stuck:2", "--epochs", "1", "--hang-timeout", str(timeout))
    code, stderr = finish(job, out, 120)
    assert code == HUNG_EXIT, stderr
    assert f"rank 1 of 2 on {socket.gethostname()}: no progress for" in stderr
    assert "busy in training step 2/6 of epoch 1 (data, forward, backward), not waiting for other ranks: this rank " \
           "is the stuck one" in stderr
    warning = stderr.index("Missing ranks:")
    assert stderr[warning:].split("\n")[1].startswith("1: [")  # Horovod's list: rank 1, with the tensors it lacks
    assert warning < stderr.index("no progress for")
