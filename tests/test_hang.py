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
from biprop_hpc.train.watchdog import Heartbeats, Watchdog

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


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_silent_ranks_are_named_with_their_hosts(tmp_path):
    """Heartbeat files of 4 ranks on a fake clock: rank 1 beat 2 s ago (fresh), rank 2 on node2 100 s ago, rank 3
    never (no file); with a 1 s interval a rank is silent after 3 s."""
    clock = FakeClock(1000.0)
    me = Heartbeats(tmp_path / "hb", 0, 4, "node1", clock)
    clock.now = 900.0
    Heartbeats(tmp_path / "hb", 2, 4, "node2", clock).beat()
    clock.now = 998.0
    Heartbeats(tmp_path / "hb", 1, 4, "node1", clock).beat()
    clock.now = 1000.0
    me.beat()
    ages = me.ages()
    assert ages == {1: ("node1", 2.0), 2: ("node2", 100.0), 3: (None, None)}
    assert watchdog.silent_ranks(ages, 1.0) == [(2, "node2", 100.0), (3, None, None)]
    assert watchdog.silent_ranks(ages, 0.5) == [(1, "node1", 2.0), (2, "node2", 100.0), (3, None, None)]
    assert watchdog.name_silent(watchdog.silent_ranks(ages, 1.0), 4) == (
        "rank 2 of 4 on node2, silent for 100 s; rank 3 of 4 (no heartbeat since this job started: stuck in "
        "start-up, or its node was lost) (no heartbeat: stopped, or its node is lost)")
    assert "every rank's heartbeat is fresh" in watchdog.name_silent([], 4)
    # a lost node of a large job: 8 ranks named, the rest counted
    many = [(rank, "node9", 50.0) for rank in range(32, 64)]
    assert watchdog.name_silent(many, 256).endswith("rank 39 of 256 on node9, silent for 50 s and 24 more silent "
                                                    "ranks (no heartbeat: stopped, or its node is lost)")
    # rank 0 empties the directory when it claims the run directory: files of an earlier job are gone
    watchdog.reset_heartbeats(tmp_path)
    assert (tmp_path / watchdog.HEARTBEAT_DIR).is_dir() and not list((tmp_path / watchdog.HEARTBEAT_DIR).iterdir())
    assert watchdog.heartbeat_interval(600) == 30 and watchdog.heartbeat_interval(10) == 1


def test_a_waiting_rank_names_the_rank_whose_heartbeat_stopped(tmp_path):
    """Three ranks in one process: rank 1 (nodeB) beats once and falls silent, as a stopped one; rank 2's thread
    keeps beating. Rank 0's watchdog (0.5 s: heartbeats every 0.05 s, silent after 0.15 s) waits in a collective."""
    ended, said, done = Ended(), [], threading.Event()
    dog = Watchdog(0.5, "rank 0 of 3 on nodeA", last_words=said.append, end=ended)
    dog.attach(Heartbeats(tmp_path, 0, 3, "nodeA"))
    Heartbeats(tmp_path, 1, 3, "nodeB").beat()
    live = Heartbeats(tmp_path, 2, 3, "nodeC")
    threading.Thread(target=lambda: [live.beat() for _ in iter(lambda: done.wait(0.02), True)], daemon=True).start()
    dog.start()
    try:
        with dog.waiting("allreduce 'x'"):
            assert ended.event.wait(5)
    finally:
        done.set()
    assert re.fullmatch(r"rank 0 of 3 on nodeA: no progress for \d s \(hang_timeout 0.5 s\), waiting in allreduce 'x' "
                        r"for rank 1 of 3 on nodeB, silent for \d s \(no heartbeat: stopped, or its node is lost\); "
                        r"ending the job \(exit 124\)", said[0]), said[0]
    dog.stop()
    assert not (tmp_path / "rank_0").exists()  # a finished rank is not a silent one


def test_heartbeats_that_cannot_be_read_do_not_keep_the_job_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(watchdog, "READ_HEARTBEATS_SECONDS", 0.2)
    ended, said, blocked = Ended(), [], threading.Event()
    heartbeats = Heartbeats(tmp_path, 0, 2, "nodeA")
    dog = Watchdog(0.3, "rank 0 of 2 on nodeA", last_words=said.append, end=ended)
    dog.attach(heartbeats)
    monkeypatch.setattr(heartbeats, "ages", lambda: blocked.wait() and {})  # a file system that does not answer
    with dog.start().waiting("allreduce 'x'"):
        assert ended.event.wait(5)
    blocked.set()
    assert f"for another rank, which is stopped or stuck (Horovod's stall warning above, if any, names it); the " \
           f"heartbeats in {tmp_path} gave no answer in 0.2 s; ending the job" in said[0]
    dog.stop()


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
    def timeout(*argv: str) -> float:
        return cli._hang_timeout(cli._train_config(cli._parser().parse_args(argv)))
    assert timeout("train", "--config", str(config)) == 42
    assert timeout("train", "--config", str(config), "--hang-timeout", "7") == 7
    assert timeout("train", "--lr", "-1") == 600  # a bad config: the default; rank 0 reports it
    assert timeout("models") == 0


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
    # ... and the stopped one, by its heartbeat (before heartbeats: "for another rank, which is stopped or stuck")
    assert "waiting in the optimizer step after step" in lines[0] and f"(its gradient allreduce) for rank " \
        f"{stopped_rank} of 2 on {socket.gethostname()}, silent for " in lines[0]
    assert "(no heartbeat: stopped, or its node is lost)" in lines[0]
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
def test_a_rank_stopped_in_the_start_up_ends_the_job(tmp_path, tiny_idx_dir):
    """Rank 1 stops as it builds the data, before the run's first checkpoint; rank 0 waits in the resume broadcast.
    Before the watchdog watched the start-up, nothing ended this job (the subprocess timeout fails the test)."""
    timeout = 8.0
    out = tmp_path / "out"
    out.mkdir()
    job = start_job(out, tiny_idx_dir, "startup:1", "--epochs", "1", "--hang-timeout", str(timeout))
    stopped = out / "stopped"
    deadline = time.monotonic() + 120
    while not stopped.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped_at = time.monotonic()
    assert stopped.exists(), finish(job, out, 5)[1]
    code, stderr = finish(job, out, timeout + HANG_MARGIN + 30)
    ended_after = time.monotonic() - stopped_at
    assert code == HUNG_EXIT, stderr
    assert timeout - 1 <= ended_after <= timeout + HANG_MARGIN, (ended_after, stderr)
    [line] = [line for line in stderr.splitlines() if "no progress for" in line]
    assert f"rank 0 of 2 on {socket.gethostname()}: no progress for" in line
    assert f"waiting in broadcast 'resume' for rank 1 of 2 on {socket.gethostname()}, silent for" in line
    assert not (out / "default/keep=0.5/run/archive.h5").exists()  # stopped before the archive's first write
    assert gone(int(stopped.read_text()), within=30)


def test_in_the_start_up_only_a_silent_rank_ends_the_job(tmp_path):
    """The start-up may rightly be slow (torch's first imports take seconds on a busy machine): a busy rank, or
    one waiting while every heartbeat is fresh, is not ended there; one waiting for a silent rank is."""
    ended = Ended()
    busy = Watchdog(0.2, "rank 0 of 2 on nodeA", end=ended).start(start_up=True)
    waiting = Watchdog(0.2, "rank 0 of 2 on nodeA", end=ended)
    waiting.attach(Heartbeats(tmp_path, 0, 2, "nodeA"))
    other = Watchdog(0.2, "rank 1 of 2 on nodeB", end=ended)
    other.attach(Heartbeats(tmp_path, 1, 2, "nodeB"))  # rank 1's own thread beats: fresh
    other.start(start_up=True)
    with waiting.start(start_up=True).waiting("broadcast 'resume'"):
        assert not ended.event.wait(1.0)  # five timeouts
        other.stop()  # rank 1 falls silent: its last beat now, never touched again
        Heartbeats(tmp_path, 1, 2, "nodeB").beat()
        assert ended.event.wait(5) and ended.code == HUNG_EXIT
    busy.stop()
    waiting.stop()


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
