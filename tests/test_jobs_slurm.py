"""`biprop jobs` against a real one-node Slurm cluster (tests/slurm_cluster.py): rendered jobs train under
`srun --mpi=pmix`, a sweep runs as one job array, the warning signal leads to a mid-epoch checkpoint, a
requeue and an exact continuation, and a killed rank ends the job so that a resubmission continues it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from biprop_hpc.archive import read_archive


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist" / "conv2_mpt1-32.yaml"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")
# Compared between an interrupted and an uninterrupted run (timings differ, of course).
COMPARED = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5")


def small_run(data: Path, out: Path, train_subset: int, epochs: int) -> list[str]:
    return ["--config", str(CONFIG), "--data", str(data), "--out", str(out), "--device", "cpu", "--threads", "1",
            "--width-mult", "0.25", "--batch-size", "32", "--train-subset", str(train_subset),
            "--test-subset", "256", "--epochs", str(epochs)]


def biprop(cluster, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`biprop ARGS` with this cluster's SLURM_CONF; sbatch passes the environment on to the job."""
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "biprop_hpc", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def submit(cluster, cwd: Path, *args: str, ranks: int = 2) -> dict:
    """Submit with `biprop jobs submit`; the manifest it wrote, its runs' directories made absolute (it records
    them relative to its own directory)."""
    done = biprop(cluster, cwd, "jobs", "submit", "--scheduler", "slurm", "--gpus-per-node", "0",
                  "--tasks-per-node", str(ranks), "--time", "10m", *args)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    manifest = next(cwd.rglob("sweeps/*/manifest.json"))
    recorded = json.loads(manifest.read_text())
    runs = [{**run, "run_dir": str((manifest.parent / run["run_dir"]).resolve())} for run in recorded["runs"]]
    return recorded | {"path": str(manifest), "runs": runs}


def job_ids(manifest: dict) -> list[str]:
    return list(manifest["submissions"][-1]["job_ids"].values())


def wait_until_ended(cluster, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job_info(job_id)
        if info.get("JobState") in ENDED:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not end in {timeout:.0f} s: {info}\n{cluster.diagnostics()}")
        time.sleep(0.5)


def wait_for_epochs(run_dir: Path, epochs: int, timeout: float, log: Path) -> None:
    """Until the run's archive records `epochs` finished epochs (the archive is replaced atomically)."""
    deadline = time.monotonic() + timeout
    while True:
        archive = run_dir / "archive.h5"
        if archive.exists() and len(read_archive(archive).metrics["epoch"]) >= epochs:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_dir}: not {epochs} epoch(s) after {timeout:.0f} s\n{logs(log)}")
        time.sleep(0.2)


def logs(directory: Path) -> str:
    return "\n".join(f"--- {path}\n{path.read_text(errors='replace')}" for path in sorted(directory.rglob("*.out")))


def status(cluster, cwd: Path, manifest: dict) -> dict[int, dict]:
    done = biprop(cluster, cwd, "jobs", "status", manifest["path"], "--json")
    assert done.returncode == 0, done.stderr
    return {run["index"]: run for run in json.loads(done.stdout.splitlines()[-1])["jobs"][0]["runs"]}


def assert_completed(run_dir: Path, ranks: int, epochs: int, log: str) -> dict:
    record = read_archive(run_dir / "archive.h5")
    assert record.attrs["status"] == "completed", log
    assert record.attrs["world_size"] == ranks
    assert record.attrs["launcher"] == ("srun" if ranks > 1 else "none")  # one process never starts Horovod
    assert record.metrics["epoch"] == list(range(1, epochs + 1))
    assert {"test_top1", "test_loss", "best_epoch"} <= set(record.final) and record.layers, log
    return record


def test_rendered_two_rank_job_trains_and_completes(slurm, fashion_mnist, tmp_path):
    where = tmp_path / "a dir"  # sbatch must read the quoted --output, bash the quoted paths of the commands
    where.mkdir()
    manifest = submit(slurm, where, *small_run(fashion_mnist, where / "runs", 1024, 1))
    [job] = job_ids(manifest)
    info = wait_until_ended(slurm, job, timeout=240)
    log = logs(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    run_dir = Path(manifest["runs"][0]["run_dir"])
    assert run_dir.is_relative_to(where)
    record = assert_completed(run_dir, ranks=2, epochs=1, log=log)
    assert record.attrs["job_id"] == job and record.restarts == []
    assert (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "checkpoints" / "best.pt").exists()
    assert (Path(manifest["path"]).parent / "logs" / f"run1_job{job}.out").exists()
    assert "completed" in log and "the ranks stop by themselves at" in log, log  # squeue's end time was read


def test_sweep_is_one_job_array_with_a_run_directory_each(slurm, fashion_mnist, tmp_path):
    manifest = submit(slurm, tmp_path, *small_run(fashion_mnist, tmp_path / "runs", 512, 1),
                      "--sweep", "keep_ratio=0.5,0.3,0.1", "--max-running", "2", "--job-name", "keeps", ranks=1)
    ids = job_ids(manifest)
    assert len({job.split("_")[0] for job in ids}) == 1 and [job.split("_")[1] for job in ids] == ["1", "2", "3"]
    assert manifest["submissions"][-1]["command"].startswith("sbatch --parsable --array=1-3%2 ")
    for job in ids:
        info = wait_until_ended(slurm, job, timeout=300)
        assert info["JobState"] == "COMPLETED", f"{info}\n{logs(tmp_path)}"
    directories = [Path(run["run_dir"]) for run in manifest["runs"]]
    assert [d.relative_to(tmp_path / "runs").as_posix() for d in directories] == [
        f"conv2_mpt1-32/keep={k}/seed0_train_subset=512_test_subset=256_batch_size=32_width_mult=0.25_epochs=1"
        for k in ("0.5", "0.3", "0.1")]  # the result-changing keys given to the job, in the config's key order
    for directory, keep in zip(directories, (0.5, 0.3, 0.1)):
        record = assert_completed(directory, ranks=1, epochs=1, log=logs(tmp_path))
        assert record.attrs["keep_ratio"] == keep
    states = status(slurm, tmp_path, manifest)
    assert [states[i]["state"] for i in (1, 2, 3)] == ["completed"] * 3
    assert [states[i]["job_id"] for i in (1, 2, 3)] == ids
    table = biprop(slurm, tmp_path, "jobs", "status", str(Path(manifest["path"]).parent)).stdout
    assert "keeps (slurm, 3 run(s): 3 completed)" in table and table.count("test top-1 ") == 3
    done = biprop(slurm, tmp_path, "jobs", "submit", "--scheduler", "slurm", "--gpus-per-node", "0",
                  "--tasks-per-node", "1", "--time", "10m", *small_run(fashion_mnist, tmp_path / "runs", 512, 1),
                  "--sweep", "keep_ratio=0.5,0.3,0.1", "--max-running", "2", "--job-name", "keeps")
    assert "nothing to submit" in done.stdout, done.stdout + done.stderr


def test_warning_signal_checkpoints_requeues_and_continues_exactly(slurm, fashion_mnist, tmp_path):
    # One array, two identical runs: the first gets the warning mid-epoch, the second is the reference.
    manifest = submit(slurm, tmp_path, *small_run(fashion_mnist, tmp_path / "runs", 16000, 2),
                      "--sweep", "name=signalled,reference")
    signalled, reference = job_ids(manifest)
    run_dir, reference_dir = (Path(run["run_dir"]) for run in manifest["runs"])
    wait_for_epochs(run_dir, 1, timeout=240, log=tmp_path)
    time.sleep(1.5)  # into epoch 2
    # The warning as the script sees it with --full: the batch shell (which must survive it) and every task.
    done = slurm.run("scancel", "--signal=USR1", "--full", signalled)
    assert done.returncode == 0, done.stderr
    infos = [wait_until_ended(slurm, job, timeout=400) for job in (signalled, reference)]
    log = logs(tmp_path)
    assert [(info["JobState"], info["Restarts"]) for info in infos] == [("COMPLETED", "1"), ("COMPLETED", "0")], log
    assert "checkpointed; requeue 1 of 3" in log and "restart 1 (at most 3)" in log, log
    record = assert_completed(run_dir, ranks=2, epochs=2, log=log)
    expected = assert_completed(reference_dir, ranks=2, epochs=2, log=log)
    [restart] = record.restarts
    assert restart["reason"] == "SIGUSR1" and restart["epoch"] == 1 and restart["step"] > 0, restart
    assert expected.restarts == [] and record.attrs["job_id"] == signalled
    assert {name: record.metrics[name] for name in COMPARED} == {name: expected.metrics[name] for name in COMPARED}
    assert record.final == expected.final
    states = status(slurm, tmp_path, manifest)
    assert [(states[i]["state"], states[i]["restarts"]) for i in (1, 2)] == [("completed", 1), ("completed", 0)]


def test_killed_rank_ends_the_job_and_a_resubmission_continues(slurm, fashion_mnist, tmp_path):
    args = small_run(fashion_mnist, tmp_path / "runs", 12000, 2)
    manifest = submit(slurm, tmp_path, *args)
    [job] = job_ids(manifest)
    run_dir = Path(manifest["runs"][0]["run_dir"])
    wait_for_epochs(run_dir, 1, timeout=240, log=tmp_path)
    [victim] = rank_processes(slurm, job, rank=1)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    info = wait_until_ended(slurm, job, timeout=150)
    ended_after = time.monotonic() - killed
    log = logs(tmp_path)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{log}"
    assert ended_after < 120, f"the job took {ended_after:.0f} s to end after a rank was killed\n{log}"
    assert read_archive(run_dir / "archive.h5").attrs["status"] != "completed"
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert status(slurm, tmp_path, manifest)[1]["state"] == "failed"

    manifest = submit(slurm, tmp_path, *args)  # the same command again: submits the unfinished run
    assert len(manifest["submissions"]) == 2
    [again] = job_ids(manifest)
    info = wait_until_ended(slurm, again, timeout=300)
    log = logs(tmp_path)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    record = assert_completed(run_dir, ranks=2, epochs=2, log=log)
    [restart] = record.restarts
    assert restart["epoch"] >= 1, restart  # continued from the checkpoint of epoch 1 (or later), not from scratch
    assert record.attrs["job_id"] == again


def rank_processes(cluster, job_id: str, rank: int) -> list[int]:
    """Pids of the `biprop train` task with SLURM_PROCID=rank of this cluster's job."""
    wanted = {f"SLURM_CONF={cluster.conf}".encode(), f"SLURM_JOB_ID={job_id}".encode(),
              f"SLURM_PROCID={rank}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted <= environ and b"biprop_hpc" in command and b"train" in command:
            found.append(int(entry.name))
    return found
