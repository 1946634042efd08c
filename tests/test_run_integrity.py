"""One run per directory, one set of settings per run: the ways a campaign could report one run's numbers as
another's, each tried for real (subprocesses of `biprop`, real mpirun and torchrun, real lock files).

- a resume (of a completed or of a stopped run) with another result-changing setting is refused, naming it;
- a second writer on a run directory is refused and changes nothing; a dead holder's lock is taken over;
- torchrun's ranks are refused before any of them touches a file;
- an end-of-epoch checkpoint continues on another number of ranks (1 -> 2, 2 -> 1), a mid-epoch one does not;
- the archive exists from a run's first second and its heartbeat is refreshed within epochs;
- run names are one safe path component; an --out with a space works.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import biprop_hpc.train.loop as loop
from conftest import epochs_done, file_hashes
from biprop_hpc.archive import read_archive
from biprop_hpc.config import ConfigError, build_config
from biprop_hpc.dist import Local
from biprop_hpc.train import Run
from biprop_hpc.train.checkpoint import load_checkpoint
from biprop_hpc.train.lock import LOCK_NAME, RunLock, RunLocked

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER = str(Path(__file__).with_name("dist_worker.py"))


def biprop(*args, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biprop_hpc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def train_args(out: Path, data: Path, *extra) -> list:
    return ["train", "--dataset", "mnist", "--data", data, "--model", "conv2", "--width-mult", "0.25",
            "--batch-size", "32", "--threads", "1", "--out", out, "--lr-schedule", "constant", *extra]


# --- one run, one set of settings --------------------------------------------------------------------------

def test_a_completed_run_is_done_only_for_its_own_settings(tmp_path, tiny_idx_dir):
    args = train_args(tmp_path, tiny_idx_dir, "--epochs", "1", "--lr", "0.1")
    first = biprop(*args)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "default/keep=0.5/seed0"
    before = file_hashes(run_dir)
    same = biprop(*args, "--resume", "auto")  # a requeued job of a finished run: nothing to do
    assert same.returncode == 0 and "completed already" in same.stderr
    assert json.loads(same.stdout)["test_top1"] == json.loads(first.stdout)["test_top1"]
    other = biprop(*args[:-2], "--lr", "0.01", "--resume", "auto")
    assert other.returncode == 2, other.stderr
    assert "lr 0.1 -> 0.01" in other.stderr and "Traceback" not in other.stderr
    assert other.stdout == ""  # no result of the lr-0.1 run handed out as this one's
    assert file_hashes(run_dir) == before


def test_a_stopped_run_resumed_with_other_settings_is_refused(tmp_path, tiny_idx_dir):
    """The run stops after epoch 1 (a SIGUSR1 at the epoch's last step, as dist_worker records it), so its
    checkpoint is an end-of-epoch one, then is continued with another lr and weight decay: refused, naming
    both, nothing changed; continued with its own settings: completes, with one lr per epoch as configured."""
    out = tmp_path / "out"
    stopped = subprocess.run([sys.executable, WORKER, "train", str(out), str(tiny_idx_dir), "batch_size=32",
                              "stop_at=10:0", "lr=0.1", "epochs=3"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert stopped.returncode == 75, stopped.stderr
    run_dir = out / "default/keep=0.5/run"
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["state"]["epoch"] == 1
    before = file_hashes(run_dir)
    common = ["train", "--dataset", "mnist", "--data", tiny_idx_dir, "--model", "conv2", "--width-mult", "0.25",
              "--batch-size", "32", "--eval-batch-size", "25", "--val-fraction", "0.2", "--threads", "1",
              "--out", out, "--name", "run", "--lr-schedule", "constant", "--epochs", "3", "--resume", "auto"]
    changed = biprop(*common, "--lr", "0.01", "--weight-decay", "0")
    assert changed.returncode == 2
    assert "lr 0.1 -> 0.01" in changed.stderr and "weight_decay 0.0001 -> 0.0" in changed.stderr
    assert file_hashes(run_dir) == before
    same = biprop(*common, "--lr", "0.1")
    assert same.returncode == 0, same.stderr
    record = read_archive(run_dir / "archive.h5")
    assert record.metrics["lr"] == [0.1, 0.1, 0.1] and json.loads(record.attrs["config"])["lr"] == 0.1


def test_a_changed_global_batch_is_refused_and_named(tmp_path, tiny_idx_dir):
    args = train_args(tmp_path, tiny_idx_dir, "--epochs", "1")
    assert biprop(*args).returncode == 0
    more = biprop(*args, "--batch-size", "16", "--resume", "auto")  # the last --batch-size wins
    assert more.returncode == 2
    assert "global batch 32 (batch_size 32 x 1 rank(s)) -> 16 (batch_size 16 x 1 rank(s))" in more.stderr


# --- the run lock ------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_and_changes_nothing(tmp_path, tiny_idx_dir):
    """A live holder (this test process) owns the directory of a stopped run: `--resume auto` and a fresh run
    are refused (exit 2, naming the holder) and not one byte of the directory changes."""
    args = train_args(tmp_path, tiny_idx_dir, "--epochs", "1")
    assert biprop(*args).returncode == 0
    run_dir = tmp_path / "default/keep=0.5/seed0"
    with RunLock(run_dir):
        before = file_hashes(run_dir)
        for extra in (["--resume", "auto"], ["--new-name"]):
            second = biprop(*args, *extra)
            if extra == ["--new-name"]:  # --new-name moves on to a free directory instead
                assert second.returncode == 0 and json.loads(second.stdout)["run_dir"].endswith("seed0_2")
                continue
            assert second.returncode == 2, second.stderr
            assert f"in use by pid {os.getpid()} on {socket.gethostname()}" in second.stderr
        assert file_hashes(run_dir) == before


def test_two_runs_started_at_once_on_one_directory_one_wins(tmp_path, tiny_idx_dir):
    """The race the old "directory holds a run" check lost: two fresh runs at the same moment."""
    args = train_args(tmp_path, tiny_idx_dir, "--epochs", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", "biprop_hpc", *map(str, args)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert "in use by pid" in loser or "already holds a run" in loser
    record = read_archive(tmp_path / "default/keep=0.5/seed0/archive.h5")
    assert record.attrs["status"] == "completed" and record.metrics["epoch"] == [1, 2]
    assert not (tmp_path / "default/keep=0.5/seed0" / LOCK_NAME).exists()  # released at the end


def write_lock(directory: Path, **holder) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job_id": "", "started": "x", "token": "t",
                                **holder}))
    return path


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path / "a", host=socket.gethostname(), pid=dead.pid)  # this host, process ended
    with RunLock(tmp_path / "a"):
        assert json.loads((tmp_path / "a" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"process {dead.pid} on this host has ended" in caplog.text
    old = write_lock(tmp_path / "b")  # another host, silent for 10 minutes
    os.utime(old, (time.time() - 600, time.time() - 600))
    with RunLock(tmp_path / "b"):
        pass
    assert "no heartbeat for 600 s" in caplog.text
    write_lock(tmp_path / "c")  # another host, fresh heartbeat: may be alive
    with pytest.raises(RunLocked, match="in use by pid 1 on elsewhere"):
        RunLock(tmp_path / "c").acquire()
    assert json.loads((tmp_path / "c" / LOCK_NAME).read_text())["host"] == "elsewhere"  # left as it was


def test_the_holder_refreshes_its_heartbeat_and_a_requeue_of_its_job_waits_for_it(tmp_path, monkeypatch):
    lock = RunLock(tmp_path, refresh_seconds=0.1).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 1  # refreshed by the holder's thread
    lock.release()
    assert not path.exists()
    # An earlier incarnation of this job (SLURM requeued it after its node died): waited for until stale.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_lock(tmp_path, job_id="4242")
    started = time.monotonic()
    with RunLock(tmp_path, stale_seconds=1.0, refresh_seconds=0.2):
        waited = time.monotonic() - started
    assert 0.8 <= waited < 5
    # Another job's lock whose heartbeat is late (3 refreshes missed) is waited for too; a punctual one is not.
    monkeypatch.setenv("SLURM_JOB_ID", "5000")
    late = write_lock(tmp_path, job_id="4242")
    os.utime(late, (time.time() - 0.7, time.time() - 0.7))
    started = time.monotonic()
    with RunLock(tmp_path, stale_seconds=1.0, refresh_seconds=0.2):
        assert 0.2 <= time.monotonic() - started < 5
    write_lock(tmp_path, job_id="4242")
    started = time.monotonic()
    with pytest.raises(RunLocked, match="job 4242"):
        RunLock(tmp_path, stale_seconds=1.0, refresh_seconds=0.2).acquire()
    assert time.monotonic() - started < 0.5


def test_torchrun_ranks_are_refused_before_touching_anything(tmp_path, tiny_idx_dir):
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.fail("torchrun is missing from the venv (it comes with torch)")
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29533", "-m", "biprop_hpc",
                           *map(str, train_args(tmp_path / "out", tiny_idx_dir, "--epochs", "1"))],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    # torchrun ends the other rank as soon as one fails, so one or both get to say why
    assert "biprop: error: started by a launcher biprop-hpc does not support (WORLD_SIZE" in done.stderr
    assert "mpirun" in done.stderr and "srun --mpi=pmix" in done.stderr
    assert not (tmp_path / "out").exists()


# --- continuing on another number of ranks -----------------------------------------------------------------

def mpirun(ranks: int, *args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    command = ["mpirun", "--oversubscribe", "-np", str(ranks)] if ranks > 1 else []
    if ranks > 1 and os.geteuid() == 0:
        command.insert(1, "--allow-run-as-root")
    done = subprocess.run(command + [sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == returncode, done.stdout + done.stderr
    return done


def worker(ranks: int, out: Path, data: Path, *extra: str, returncode: int = 0) -> Path:
    mpirun(ranks, WORKER, "train", str(out), str(data), "epochs=2", *extra, returncode=returncode)
    return out / "default/keep=0.5/run"


def assert_close_models(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:  # summation order differs between rank counts: float tolerance, as README says
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (env/install.sh installs it)")
@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_an_end_of_epoch_checkpoint_continues_on_another_number_of_ranks(tmp_path, tiny_idx_dir, before, after):
    """Global batch 32 throughout (32 x 1 or 16 x 2). The run stops at the end of epoch 1 on `before` ranks
    (the stop request at global step 10, the epoch's last) and is continued on `after` ranks: it ends as the
    uninterrupted run on `before` ranks does, to float tolerance (a model without BN)."""
    batch = {1: "batch_size=32", 2: "batch_size=16"}
    run_dir = worker(before, tmp_path / "split", tiny_idx_dir, batch[before], "stop_at=10:0", returncode=75)
    state = load_checkpoint(run_dir / "checkpoints/last.pt")["state"]
    assert (state["epoch"], state["step"]) == (1, 0)  # an end-of-epoch checkpoint
    worker(after, tmp_path / "split", tiny_idx_dir, batch[after], "resume=auto")
    whole_dir = worker(before, tmp_path / "whole", tiny_idx_dir, batch[before])
    assert_close_models(torch.load(tmp_path / "split/model_0.pt"), torch.load(tmp_path / "whole/model_0.pt"))
    split, whole = read_archive(run_dir / "archive.h5"), read_archive(whole_dir / "archive.h5")
    assert split.attrs["status"] == "completed" and split.attrs["world_size"] == after
    assert split.metrics["epoch"] == [1, 2] and split.metrics["train_loss"][0] == whole.metrics["train_loss"][0]
    assert split.metrics["train_loss"][1] == pytest.approx(whole.metrics["train_loss"][1], rel=1e-4)
    assert [(r["epoch"], r["step"], r["reason"]) for r in split.restarts] == [(1, 0, "SIGUSR1")]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (env/install.sh installs it)")
def test_a_mid_epoch_checkpoint_continues_only_on_its_own_ranks(tmp_path, tiny_idx_dir):
    """A BN model stopped mid-epoch on one process; two ranks (global batch kept) are refused with the reason,
    then the same ranks continue it."""
    run_dir = worker(1, tmp_path, tiny_idx_dir, "model=conv2_bin", "batch_size=32", "stop_at=4:0", returncode=75)
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["state"]["step"] == 5
    before = file_hashes(run_dir)
    refused = biprop_under_mpirun(2, tmp_path, tiny_idx_dir, "--batch-size", "16")
    assert refused.returncode != 0
    assert "written in the middle of an epoch by 1 rank(s) with batch_size 32" in refused.stderr
    assert file_hashes(run_dir) == before
    worker(1, tmp_path, tiny_idx_dir, "model=conv2_bin", "batch_size=32", "resume=auto")
    assert read_archive(run_dir / "archive.h5").attrs["status"] == "completed"


def biprop_under_mpirun(ranks, out, data, *extra):
    command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks), sys.executable, "-m",
               "biprop_hpc", "train", "--dataset", "mnist", "--data", str(data), "--model", "conv2_bin",
               "--width-mult", "0.25", "--epochs", "2", "--eval-batch-size", "25", "--val-fraction", "0.2",
               "--out", str(out), "--lr", "0.05", "--threads", "1", "--name", "run", "--lr-schedule", "constant",
               "--resume", "auto", *extra]
    if os.geteuid() != 0:
        command.remove("--allow-run-as-root")
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# --- visible from the first second ---------------------------------------------------------------------------

def test_the_archive_is_written_at_start_and_refreshed_within_epochs(tmp_path, tiny_idx_dir, monkeypatch):
    """Every write of the archive, recorded: the first comes before any training step (status running, no
    epoch yet); with a heartbeat due at every step, epoch 1's steps each rewrite it; with the default interval,
    no step does (the hot path stays free)."""
    writes = []
    real_write = loop.write_archive

    def recording_write(path, record):
        writes.append((record.attrs["status"], len(record.metrics["epoch"]), record.attrs["heartbeat"]))
        real_write(path, record)

    monkeypatch.setattr(loop, "write_archive", recording_write)
    cfg = dict(dataset="mnist", data=str(tiny_idx_dir), model="conv2", width_mult=0.25, epochs=1, batch_size=32,
               val_fraction=0.2, out=str(tmp_path), threads=1)
    steps = 10  # 320 training images / 32
    Run(build_config(None, {**cfg, "name": "default_interval"}), Local()).fit()
    assert writes == [("running", 0, writes[0][2]), ("running", 1, writes[1][2]), ("completed", 1, writes[2][2])]
    writes.clear()
    monkeypatch.setattr(loop, "HEARTBEAT_SECONDS", 0.0)
    Run(build_config(None, {**cfg, "name": "every_step"}), Local()).fit()
    assert [w[:2] for w in writes] == [("running", 0)] * (1 + steps) + [("running", 1), ("completed", 1)]


def test_a_continuation_is_visible_before_its_first_epoch_ends(tmp_path, tiny_idx_dir, monkeypatch):
    run = Run(build_config(None, dict(dataset="mnist", data=str(tiny_idx_dir), model="conv2", width_mult=0.25,
                                      epochs=2, batch_size=32, out=str(tmp_path), threads=1)), Local())
    original = Run._epoch

    def killed_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(Run, "_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    archive = tmp_path / "default/keep=0.5/seed0/archive.h5"
    assert read_archive(archive).attrs["status"] == "interrupted"
    seen = []
    monkeypatch.setattr(Run, "_epoch", lambda self, epoch: seen.append(read_archive(archive)) or original(self, epoch))
    Run(build_config(None, dict(dataset="mnist", data=str(tiny_idx_dir), model="conv2", width_mult=0.25, epochs=2,
                                batch_size=32, out=str(tmp_path), threads=1, resume="auto")), Local()).fit()
    assert seen[0].attrs["status"] == "running" and seen[0].metrics["epoch"] == [1]
    assert [r["reason"] for r in seen[0].restarts] == ["interrupted (SIGINT)"]


def test_results_sees_a_run_in_its_first_epoch(tmp_path, tiny_idx_dir):
    process = subprocess.Popen([sys.executable, "-m", "biprop_hpc",
                                *map(str, train_args(tmp_path, tiny_idx_dir, "--epochs", "200"))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        archive = tmp_path / "default/keep=0.5/seed0/archive.h5"
        deadline = time.monotonic() + 120
        while not archive.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGSTOP)  # held in its first epoch while results looks
        table = biprop("results", tmp_path, "--csv", tmp_path / "table.csv")
        assert epochs_done(archive) == 0
    finally:
        process.kill()
        process.communicate()
    assert table.returncode == 0, table.stderr
    import csv
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [(r["run_id"], r["status"], r["epochs_done"], r["epochs_total"]) for r in rows] == [
        ("default/keep=0.5/seed0", "running", "0", "200")]


# --- names and paths ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["exp/seed0", "seed0\nrm -rf", "a b", "../up", ".hidden", ""])
def test_a_run_name_is_one_safe_path_component(tmp_path, name):
    if name == "":  # empty means the default seed<N>
        assert build_config(None, {"name": name, "out": str(tmp_path)}).name == "seed0"
        return
    with pytest.raises(ConfigError, match="not a valid run directory name"):
        build_config(None, {"name": name, "out": str(tmp_path)})
    done = biprop("train", "--name", name, "--out", tmp_path)
    assert done.returncode == 2 and "not a valid run directory name" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_out_directory_with_a_space_works(tmp_path, tiny_idx_dir):
    out = tmp_path / "my runs"
    done = biprop(*train_args(out, tiny_idx_dir, "--epochs", "1"))
    assert done.returncode == 0, done.stderr
    assert read_archive(out / "default/keep=0.5/seed0/archive.h5").attrs["status"] == "completed"
