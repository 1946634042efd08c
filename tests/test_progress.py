"""What a batch job's log shows (issue 18): progress lines within epochs when stderr is a file, one start line,
rank 0's log copied to <run dir>/run.log across continuations, and the main job run a second time.

The runs are real: `biprop train` under a real mpirun with 2 ranks on the tiny IDX set (conftest.py), its stderr
redirected to a file as a batch scheduler does; jobs/run-default.sh itself runs in a scratch copy of the
repository layout (the JPEG tree's preparation skipped, the dataset overridden with the tiny one).
"""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.overrides import TorchFunctionMode

from biprop_hpc.config import build_config
from biprop_hpc.dist import Local
from biprop_hpc.train import Run
from biprop_hpc.train.progress import RUN_LOG, EpochProgress, duration

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None,
                                  reason="needs Open MPI (env/install.sh installs it)")

# One progress line: epoch, step/steps, running train loss, global img/s, lr, elapsed and left (epoch, run).
PROGRESS = re.compile(r"epoch (\d+)/(\d+)  step (\d+)/(\d+)  train loss (\d+\.\d{4})  (\d+) img/s  lr (\S+)  "
                      r"epoch (\d+:\d\d:\d\d) elapsed, (\d+:\d\d:\d\d|\?) left  "
                      r"run (\d+:\d\d:\d\d) elapsed, (\d+:\d\d:\d\d|\?) left$")
START = re.compile(r"\] run (\S+): 2 rank\(s\) on \S+ \[cpu cpu\]; loader memory; 23 steps per epoch of 16 images; "
                   r"2 epochs, (from the start|continuing at epoch 1, step \d+); config default")
SUMMARY = re.compile(r"epoch (\d+)/2  lr ")


def train_under_mpirun(out: Path, data: Path, log_file: Path, *extra: str, **env: str):
    """2 ranks of `biprop train`, stderr appended to `log_file` (not a terminal); (exit status, stdout)."""
    command = ["mpirun", "--oversubscribe", "-np", "2", sys.executable, "-m", "biprop_hpc", "train",
               "--dataset", "mnist", "--data", str(data), "--model", "conv2", "--width-mult", "0.25",
               "--batch-size", "8", "--threads", "1", "--out", str(out), "--epochs", "2",
               "--lr-schedule", "constant", *extra]
    if os.geteuid() == 0:
        command.insert(1, "--allow-run-as-root")
    with open(log_file, "a") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return done.returncode, done.stdout


def progress_lines(lines: list[str]) -> list[re.Match]:
    return [match for line in lines if (match := PROGRESS.search(line))]


@needs_mpirun
def test_a_redirected_log_shows_progress_within_epochs_and_run_log_keeps_it_across_continuations(
        tmp_path, tiny_idx_dir):
    """Run 1 stops at once (BIPROP_STOP_AT in the past: checkpointed after its first steps, exit 75) with a line
    every step (--log-interval 1); run 2 continues it with --log-interval 1000 and --log-seconds 0.001, so its
    lines come from the time trigger. 360 training images, global batch 16: 23 steps per epoch."""
    out, first_log, second_log = tmp_path / "runs", tmp_path / "first.err", tmp_path / "second.err"
    code, _ = train_under_mpirun(out, tiny_idx_dir, first_log, "--log-interval", "1", "--log-seconds", "0",
                                 BIPROP_STOP_AT="1")
    first = first_log.read_text().splitlines()
    assert code == 75, first
    assert [m.group(2) for line in first if (m := START.search(line))] == ["from the start"]
    lines = progress_lines(first)
    assert lines and [int(m.group(3)) for m in lines] == list(range(1, len(lines) + 1))  # every step
    run_dir = out / "default/keep=0.5/seed0"
    run_log = (run_dir / RUN_LOG).read_text()
    for line in first:
        if "[rank 0]" in line:  # rank 0's records, each once in run.log, in order, without stderr's prefix
            assert run_log.count(line.split("[rank 0] ", 1)[1] + "\n") == 1, line
    assert "checkpointed at epoch 1" in run_log

    code, stdout = train_under_mpirun(out, tiny_idx_dir, second_log, "--resume", "auto", "--log-interval", "1000",
                                      "--log-seconds", "0.001")
    second = second_log.read_text().splitlines()
    assert code == 0, second
    starts = [m.group(2) for line in second if (m := START.search(line))]
    assert len(starts) == 1 and starts[0].startswith("continuing at epoch 1, step ")
    summary = next(i for i, line in enumerate(second) if SUMMARY.search(line))
    in_epoch_1 = progress_lines(second[:summary])
    assert in_epoch_1, second  # lines within the first epoch, before its summary line
    for match in in_epoch_1:
        epoch, epochs, step, steps, loss, rate, lr = match.groups()[:7]
        assert (epoch, epochs, steps, lr) == ("1", "2", "23", "0.1")
        assert 0 < int(step) <= 23 and float(loss) > 0 and int(rate) > 0
    assert progress_lines(second[summary + 1:])  # and in epoch 2
    assert not [line for line in second if "[rank 1]" in line]  # only rank 0 logs

    appended = (run_dir / RUN_LOG).read_text()
    assert appended.startswith(run_log)  # the continuation appends
    rest = appended[len(run_log):].splitlines()
    assert len(rest) == len([line for line in second if "[rank 0]" in line])  # each record once
    assert [line.split(" ", 2)[2] for line in rest] == [line.split("[rank 0] ", 1)[1] for line in second
                                                        if "[rank 0]" in line]
    assert json.loads(stdout)["run_dir"] == str(run_dir)


def main_job_copy(tmp_path: Path) -> Path:
    """jobs/run-default.sh in a scratch copy of the repository's layout, its JPEG tree marked as prepared."""
    root = tmp_path / "repo"
    (root / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs/run-default.sh", root / "jobs/run-default.sh")
    (root / "configs").symlink_to((REPO / "configs").resolve())
    (root / "data/fashion-mnist-jpeg/filelist").mkdir(parents=True)
    (root / "data/fashion-mnist-jpeg/filelist/test.txt").touch()
    return root


@needs_mpirun
def test_the_main_job_run_again_continues_or_prints_the_finished_result_and_exits_0(tmp_path, tiny_idx_dir):
    """The real script with the same flags: stopped at once (a checkpoint, exit 75), run again it continues the
    run to the end; run again once more it touches nothing and says, in one line, where the run is, its test
    top-1 and how to start another; with --new-name a new run starts beside it."""
    root = main_job_copy(tmp_path)
    flags = ["--dataset", "mnist", "--data", str(tiny_idx_dir), "--loader", "torch", "--width-mult", "0.25",
             "--batch-size", "8", "--epochs", "1"]

    def main_job(*extra, **env):
        return subprocess.run(["bash", str(root / "jobs/run-default.sh"), *flags, *extra], capture_output=True,
                              text=True, timeout=300,
                              env={**os.environ, "BIPROP_VENV": str(VENV), "OMP_NUM_THREADS": "1",
                                   "OMPI_MCA_rmaps_base_oversubscribe": "1", **env})

    stopped = main_job(BIPROP_STOP_AT="1")
    assert stopped.returncode == 75, stopped.stderr
    first = main_job()
    assert first.returncode == 0, first.stderr
    assert "continuing at epoch 1, step " in first.stderr
    result = json.loads(first.stdout)
    run_dir = root / "runs/default/keep=0.5/seed0"
    assert root / result["run_dir"] == run_dir  # relative to the repository, where the script runs
    run_log = (run_dir / RUN_LOG).read_text()

    again = main_job()
    assert again.returncode == 0, again.stderr
    said = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(said) == 1, again.stderr  # one line, no error, no launcher banner
    assert (f"runs/default/keep=0.5/seed0 has completed already: test top1 {result['test_top1']:.2f} "
            f"(best epoch 1); nothing to do. To start another run add --new-name (the next free seed0_N) or "
            "--name NAME") in said[0]
    assert json.loads(again.stdout) == result
    assert (run_dir / RUN_LOG).read_text() == run_log  # nothing touched

    new = main_job("--new-name")
    assert new.returncode == 0, new.stderr
    assert json.loads(new.stdout)["run_dir"].endswith("runs/default/keep=0.5/seed0_2")


def test_a_failure_leaves_its_traceback_in_run_log(tmp_path, tiny_idx_dir, monkeypatch, caplog):
    """The traceback goes to run.log only (the command line prints it on stderr), after the run's start line."""
    cfg = build_config(None, {"dataset": "mnist", "data": str(tiny_idx_dir), "model": "conv2", "width_mult": 0.25,
                              "epochs": 1, "batch_size": 16, "out": str(tmp_path), "threads": 1})

    def failing_epoch(self, epoch):
        raise RuntimeError("a failure in epoch 1")

    monkeypatch.setattr(Run, "_epoch", failing_epoch)
    before = list(logging.getLogger("biprop_hpc").handlers)  # (other tests' Runs that never fit leave theirs)
    run = Run(cfg, Local())
    with caplog.at_level(logging.INFO, logger="biprop_hpc"), pytest.raises(RuntimeError):
        run.fit()
    text = (run.dir / RUN_LOG).read_text()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d run \S+: 1 rank\(s\) on ", text)
    assert "the run failed on rank 0" not in caplog.text  # not printed twice
    assert "the run failed on rank 0:\nTraceback" in text and text.endswith("RuntimeError: a failure in epoch 1\n")
    assert logging.getLogger("biprop_hpc").handlers == before  # run.log is closed and detached at the end of fit


class HostReads(TorchFunctionMode):
    """Records each read of a tensor's value back to the host (`item`) made by Run._train_epoch."""

    def __init__(self):
        super().__init__()
        self.items = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "item" and sys._getframe(1).f_code.co_name == "_train_epoch":
            self.items += 1
        return func(*args, **(kwargs or {}))


def test_the_loss_is_read_back_only_on_the_steps_that_log(tmp_path, tiny_idx_dir, caplog):
    """One process, 23 steps, log_interval 5 and no time trigger: TensorBoard reads the step loss at global
    steps 0, 5, ..., 20 and the progress lines read the running loss after steps 5, 10, 15, 20: 9 reads."""
    cfg = build_config(None, {"dataset": "mnist", "data": str(tiny_idx_dir), "model": "conv2", "width_mult": 0.25,
                              "epochs": 1, "batch_size": 16, "out": str(tmp_path), "threads": 1, "log_interval": 5,
                              "log_seconds": 0})
    run = Run(cfg, Local())
    try:
        with caplog.at_level(logging.INFO, logger="biprop_hpc"), HostReads() as reads:
            run._train_epoch(0, progress_lines=True)
    finally:
        run._release()
    steps = [int(m.group(3)) for m in progress_lines(caplog.messages)]
    assert steps == [5, 10, 15, 20]
    assert reads.items == len(range(0, 23, 5)) + len(steps)


def test_a_line_is_due_every_log_interval_steps_or_log_seconds_whichever_first():
    """A stand-in clock: lines at the step count, at the time, and the count and time restart at each line."""
    now = [0.0]
    progress = EpochProgress(0, 2, [16] * 100, 0, every_steps=10, every_seconds=60, run_started=0.0,
                             clock=lambda: now[0])
    assert not progress.due(9)
    assert progress.due(10)  # steps first
    now[0] = 20.0
    progress.line(10, 1.0, 0.1)
    now[0] = 79.0
    assert not progress.due(19)
    now[0] = 80.0
    assert progress.due(11)  # time first: 60 s since the last line
    # 176 images in 80 s (2.2 img/s): 1424 images left of this epoch (647 s), then one of 1600 (727 s)
    line = progress.line(11, 1.0, 0.1)
    assert line == ("epoch 1/2  step 11/100  train loss 1.0000  2 img/s  lr 0.1  epoch 0:01:20 elapsed, "
                    "0:10:47 left  run 0:01:20 elapsed, 0:22:55 left")
    no_time = EpochProgress(0, 1, [16] * 100, 0, every_steps=10, every_seconds=0, run_started=0.0,
                            clock=lambda: now[0])
    now[0] = 1e6
    assert not no_time.due(9) and no_time.due(10)  # log_seconds 0: steps only
    assert duration(3725) == "1:02:05" and duration(float("nan")) == "?"
