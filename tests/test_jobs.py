"""`biprop jobs`: rendering for SLURM, LSF and Flux, sweeps, manifests, status, and the restart logic of the
scripts run with the scheduler's commands replaced by recording fakes (no scheduler needed).
The same scripts under a real one-node Slurm cluster: test_jobs_slurm.py."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from biprop_hpc.archive import METRICS, RunRecord, write_archive
from biprop_hpc.config import ConfigError
from biprop_hpc.jobs import add_jobs_commands
from biprop_hpc.jobs.resources import Resources, parse_time
from biprop_hpc.jobs.schedulers import SCHEDULERS, index_ranges

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fashion-mnist" / "conv2_mpt1-32.yaml"
BIG_JOB = ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "10", "--time", "12h", "--queue", "pbatch",
           "--account", "bank1", "--max-running", "3", "--max-restarts", "3"]


def jobs(*argv: str, cwd: Path):
    """Run `biprop jobs ARGV` in-process (no signal handlers, no distributed init), in directory cwd."""
    parser = argparse.ArgumentParser(prog="biprop")
    add_jobs_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["jobs", *map(str, argv)])
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return args.handler(args)
    finally:
        os.chdir(old)


def render(scheduler: str, tmp_path: Path, *extra: str, name: str = "job") -> Path:
    jobs("render", "--scheduler", scheduler, "--config", CONFIG, "--out", tmp_path / "runs", "--job-name", name,
         *extra, cwd=tmp_path)
    return tmp_path / "runs" / "sweeps" / name / "job.sh"


def directives(script: Path, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for line in script.read_text().splitlines() if line.startswith(prefix)]


def bash_n(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def fake_bin(tmp_path: Path, scripts: dict[str, str]) -> dict:
    """Executables on PATH that append "name args" to $CALLS and then run `body`; returns the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> "$CALLS"\n{body}\n')
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def run_script(script: Path, env: dict, **variables) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env={**env, **variables}, capture_output=True, text=True, timeout=60)


# --- resources, times, bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("4:00:00", 14400), ("1-12:00:00", 129600), ("240m", 14400),
                                           ("4h", 14400), ("1.5h", 5400), ("90", 5400), ("30s", 30), ("2d", 172800)])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["4:00", "abc", "0", "4:70:00", "-1h", ""])
def test_malformed_time_is_named(text):
    with pytest.raises(ConfigError, match=f"--time {text!r}"):
        parse_time(text)


def test_resources_checks():
    with pytest.raises(ConfigError, match="nodes x GPUs per node is 0"):
        Resources(gpus_per_node=0)
    with pytest.raises(ConfigError, match="--nodes 0"):
        Resources(nodes=0)
    with pytest.raises(ConfigError, match="one rank per GPU"):
        Resources(gpus_per_node=4, tasks_per_node=8)
    with pytest.raises(ConfigError, match="--signal-before"):
        Resources(time_seconds=300, warn_seconds=300)
    cpu = Resources(nodes=2, gpus_per_node=0, tasks_per_node=3)
    assert (cpu.ranks, cpu.ranks_per_node, cpu.gpus_per_rank) == (6, 3, 0)


@pytest.mark.parametrize("extra, message", [
    (["--scheduler", "pbs"], "--scheduler 'pbs' is not one of slurm, lsf, flux"),
    (["--sweep", "keep_ratoi=0.5,0.2"], "'keep_ratoi' is not a config key"),
    (["--sweep", "config=nowhere/*.yaml"], "'nowhere/\\*.yaml' matches no config file"),
    (["--sweep", "keep_ratio"], "write KEY=V1,V2"),
    (["--sweep", "keep_ratio=0.5,", ], "write KEY=V1,V2"),
    (["--sweep", "keep_ratio=0.5", "--sweep", "keep_ratio=0.2"], "swept twice"),
    (["--sweep", "keep_ratio=0.5,7"], "keep_ratio: 7.0 must be in \\(0, 1\\]"),
    (["--gpus-per-node", "0"], "nodes x GPUs per node is 0"),
    (["--time", "4:00"], "--time '4:00' is not a time"),
    (["--resume", "auto"], "'resume' cannot be set for a job"),
    (["--job-name", "a b"], "--job-name 'a b'"),
    (["--template", "missing.j2"], "job template .*missing.j2 does not exist"),
])
def test_bad_input_is_a_clear_error(tmp_path, extra, message):
    argv = ["render", "--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", tmp_path, *extra]
    if extra[0] == "--scheduler":
        argv[1:3] = []
    with pytest.raises(ConfigError, match=message):
        jobs(*argv, cwd=tmp_path)
    assert not (tmp_path / "sweeps").exists()


def test_bad_input_exits_2_through_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "biprop_hpc", "jobs", "submit", "--scheduler", "slurm",
                           "--config", str(CONFIG), "--time", "1h", "--sweep", "colour=red,blue"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "biprop: error: --sweep 'colour=red,blue': 'colour' is not a config key" in done.stderr


# --- sweeps ------------------------------------------------------------------------------------------------

def test_sweep_combinations_each_get_a_run_directory(tmp_path):
    jobs("render", "--scheduler", "slurm", "--time", "1h", "--out", tmp_path / "runs", "--job-name", "s",
         "--sweep", f"config={REPO}/configs/fashion-mnist/conv2_mpt1-*.yaml", "--sweep", "prune_rate=0.5,0.2,0.1",
         "--epochs", "3", "--no-augment", cwd=tmp_path)
    manifest = json.loads((tmp_path / "runs" / "sweeps" / "s" / "manifest.json").read_text())
    runs = manifest["runs"]
    assert [run["index"] for run in runs] == [1, 2, 3, 4, 5, 6]
    assert [Path(run["run_dir"]).relative_to(tmp_path / "runs").as_posix() for run in runs] == [
        f"conv2_mpt1-{kind}/keep={k}/seed0" for kind in ("1", "32") for k in ("0.5", "0.2", "0.1")]
    assert runs[4]["args"] == ["--config", str(REPO / "configs/fashion-mnist/conv2_mpt1-32.yaml"),
                               "--out", str(tmp_path / "runs"), "--no-augment", "--epochs", "3", "--keep-ratio", "0.2"]
    assert manifest["submissions"] == [] and manifest["scheduler"] == "slurm"


def test_sweeping_a_key_outside_the_run_path_names_the_runs(tmp_path):
    jobs("render", "--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", tmp_path, "--job-name", "lr",
         "--sweep", "lr=0.1,0.05", "--sweep", "milestones=3 6,4 8", cwd=tmp_path)
    runs = json.loads((tmp_path / "sweeps" / "lr" / "manifest.json").read_text())["runs"]
    assert [Path(run["run_dir"]).name for run in runs] == [
        "seed0_lr=0.1_milestones=3 6", "seed0_lr=0.1_milestones=4 8",
        "seed0_lr=0.05_milestones=3 6", "seed0_lr=0.05_milestones=4 8"]
    assert runs[1]["args"][4:] == ["--lr", "0.1", "--milestones", "4", "8", "--name", "seed0_lr=0.1_milestones=4 8"]


def test_configs_with_one_name_in_two_folders_are_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.yaml").write_text("model: conv2\n")
    with pytest.raises(ConfigError, match="would share a run directory"):
        jobs("render", "--scheduler", "slurm", "--time", "1h", "--sweep", "config=a/same.yaml,b/same.yaml",
             cwd=tmp_path)


def test_index_ranges():
    assert index_ranges([5, 1, 2, 3, 7, 8]) == "1-3,5,7-8"
    assert index_ranges([4]) == "4"


# --- rendered scripts --------------------------------------------------------------------------------------

def test_slurm_script(tmp_path):
    script = render("slurm", tmp_path, *BIG_JOB, "--sweep", "keep_ratio=0.5,0.2", "--sweep", "seed=0,1,2")
    bash_n(script)
    assert directives(script, "#SBATCH") == [
        "--job-name=job", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=10",
        "--time=0-12:00:00", "--partition=pbatch", "--account=bank1", "--signal=USR1@300", "--requeue",
        "--open-mode=append", "--array=1-6%3", f"--output={script.parent}/logs/run%a_job%A.out"]
    text = script.read_text()
    assert "srun --mpi=pmix --nodes=2 --ntasks-per-node=4 --cpus-per-task=10 --wait=60 \\\n" in text
    assert '"${BIPROP[@]}" train "${RUN[@]}" --resume auto &' in text
    assert f"source {REPO}/env/site.sh" in text
    assert f"6) RUN=(--config {CONFIG} --out {tmp_path}/runs --keep-ratio 0.2 --seed 2) ;;" in text
    assert 'scontrol requeue "$JOB"' in text and "JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" in text


def test_one_run_is_not_an_array(tmp_path):
    script = render("slurm", tmp_path, "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "30m")
    bash_n(script)
    found = directives(script, "#SBATCH")
    assert "--ntasks-per-node=2" in found and not any(d.startswith(("--array", "--gpus")) for d in found)
    assert f"--output={script.parent}/logs/run1_job%j.out" in found
    assert "INDEX=1\nJOB=$SLURM_JOB_ID\n" in script.read_text()


def test_lsf_script(tmp_path):
    script = render("lsf", tmp_path, *BIG_JOB, "--sweep", "keep_ratio=0.5,0.2", "--signal-before", "10m")
    bash_n(script)
    assert directives(script, "#BSUB") == [
        '-J "job[1-2]%3"', "-nnodes 2", "-W 720", "-G bank1", "-q pbatch",
        f"-o {script.parent}/logs/run%I_job%J.out", "-wa USR1", "-wt 10"]
    text = script.read_text()
    assert "jsrun -n 8 -r 4 -a 1 -g 1 -c 10 -b packed:10 \\\n" in text
    assert '"${BIPROP[@]}" train "${RUN[@]}" --resume auto &' in text
    assert "export HDF5_USE_FILE_LOCKING=FALSE" in (REPO / "env" / "site.sh").read_text()


def test_flux_script(tmp_path):
    script = render("flux", tmp_path, *BIG_JOB, "--sweep", "keep_ratio=0.5,0.2,0.1", "--time", "1-00:00:30")
    bash_n(script)
    assert directives(script, "# flux:") == [
        "--job-name=job", "-N 2", "-n 8", "-g 1", "-c 10", "-t 86430s", "-q pbatch", "-B bank1",
        "--signal=USR1@300s", f"--output={script.parent}/logs/run{{cc}}_job{{{{id}}}}.out"]
    assert "flux submit -N 2 -n 8 -g 1 -c 10 -o exit-timeout=60s \\\n" in script.read_text()


# --- restart logic, with the scheduler's commands faked --------------------------------------------------

def test_slurm_requeues_an_array_task_until_the_restarts_are_used(tmp_path):
    script = render("slurm", tmp_path, "--time", "1h", "--sweep", "keep_ratio=0.5,0.2", "--max-restarts", "2")
    env = fake_bin(tmp_path, {"srun": "exit $RC", "scontrol": "exit 0"})
    job = dict(SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="2", SLURM_JOB_ID="7")
    done = run_script(script, env, RC="75", SLURM_RESTART_COUNT="1", **job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls(tmp_path)[-1] == "scontrol requeue 5_2"
    assert calls(tmp_path)[0].startswith("srun --mpi=pmix --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --wait=60 ")
    assert calls(tmp_path)[0].endswith(f"train --config {CONFIG} --out {tmp_path}/runs --keep-ratio 0.2 --resume auto")
    done = run_script(script, env, RC="75", SLURM_RESTART_COUNT="2", **job)
    assert done.returncode == 75 and "all 2 restarts are used" in done.stdout
    assert calls(tmp_path)[-1].startswith("srun")
    for rc in ("0", "1", "2", "130"):
        assert run_script(script, env, RC=rc, **job).returncode == int(rc)
    assert sum(line.startswith("scontrol") for line in calls(tmp_path)) == 1


def test_lsf_brequeues_and_counts_restarts(tmp_path):
    script = render("lsf", tmp_path, "--time", "1h", "--sweep", "keep_ratio=0.5,0.2", "--max-restarts", "2")
    env = fake_bin(tmp_path, {"jsrun": "exit $RC", "brequeue": "exit 0"})
    job = dict(LSB_JOBID="77", LSB_JOBINDEX="2")
    for _ in range(2):
        assert run_script(script, env, RC="75", **job).returncode == 0
    done = run_script(script, env, RC="75", **job)
    assert done.returncode == 75 and "all 2 restarts are used" in done.stdout
    assert [line for line in calls(tmp_path) if line.startswith("brequeue")] == ["brequeue 77[2]"] * 2
    assert (script.parent / "restarts" / "77.2").read_text().strip() == "2"
    assert calls(tmp_path)[0] == (f"jsrun -n 1 -r 1 -a 1 -g 1 -c 1 -b packed:1 {sys.executable} -m biprop_hpc train "
                                  f"--config {CONFIG} --out {tmp_path}/runs --keep-ratio 0.2 --resume auto")
    assert run_script(script, env, RC="1", **job).returncode == 1
    assert sum(line.startswith("brequeue") for line in calls(tmp_path)) == 2


def test_lsf_warning_signal_reaches_jsrun_and_requeues(tmp_path):
    script = render("lsf", tmp_path, "--time", "1h")
    # jsrun waits for USR1, like the ranks do, then exits 75 (checkpointed).
    env = fake_bin(tmp_path, {"jsrun": "trap 'echo jsrun got USR1 >> \"$CALLS\"; exit 75' USR1\n"
                                       "for i in $(seq 300); do sleep 0.1; done; exit 9",
                              "brequeue": "exit 0"})
    proc = subprocess.Popen(["bash", str(script)], env={**env, "LSB_JOBID": "78"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: any(line.startswith("jsrun -n") for line in calls(tmp_path)))
    time.sleep(0.5)  # jsrun's trap is set
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert calls(tmp_path)[1:] == ["jsrun got USR1", "brequeue 78"], output


FAKE_FLUX = """\
case "$1 $2" in
    "submit "*) echo f42 ;;
    "job attach") while [[ -n ${WAIT_FOR_KILL:-} && ! -e $CALLS.killed ]]; do sleep 0.1; done; exit $RC ;;
    "job kill") touch "$CALLS.killed" ;;
    "--parent batch") echo fNEXT ;;
esac"""


def test_flux_continuation_is_submitted_with_a_dependency(tmp_path):
    script = render("flux", tmp_path, "--time", "1h", "--sweep", "keep_ratio=0.5,0.2", "--max-restarts", "2")
    env = fake_bin(tmp_path, {"flux": FAKE_FLUX})
    done = run_script(script, env, RC="75", FLUX_JOB_ID="f7", FLUX_JOB_CC="2")
    assert done.returncode == 0, done.stdout + done.stderr
    logs = script.parent / "logs"
    assert calls(tmp_path) == [
        f"flux submit -N 1 -n 1 -g 1 -c 1 -o exit-timeout=60s {sys.executable} -m biprop_hpc train --config {CONFIG} "
        f"--out {tmp_path}/runs --keep-ratio 0.2 --resume auto",
        "flux job attach f42",
        "flux --parent batch --dependency=afterany:f7 --env=BIPROP_INDEX=2 --env=BIPROP_RESTARTS=1 "
        f"--output={logs}/run2_job{{{{id}}}}.out {script}"]
    assert (script.parent / "continuations.txt").read_text() == "2 fNEXT\n"
    # the continuation's continuation is counted; the last one gives up
    done = run_script(script, env, RC="75", FLUX_JOB_ID="fNEXT", BIPROP_INDEX="2", BIPROP_RESTARTS="2")
    assert done.returncode == 75 and "all 2 restarts are used" in done.stdout
    assert calls(tmp_path)[-1] == "flux job attach f42"
    for rc in ("0", "1"):
        assert run_script(script, env, RC=rc, FLUX_JOB_ID="f8", FLUX_JOB_CC="1").returncode == int(rc)
    assert sum(line.startswith("flux --parent") for line in calls(tmp_path)) == 1


def test_flux_batch_script_forwards_the_warning_to_the_ranks(tmp_path):
    script = render("flux", tmp_path, "--time", "1h")
    env = fake_bin(tmp_path, {"flux": FAKE_FLUX})
    proc = subprocess.Popen(["bash", str(script)], env={**env, "RC": "75", "WAIT_FOR_KILL": "1", "FLUX_JOB_ID": "f9"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: "flux job attach f42" in calls(tmp_path))
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert calls(tmp_path)[2:] == ["flux job kill --signal=USR1 f42",
                                   f"flux --parent batch --dependency=afterany:f9 --env=BIPROP_INDEX=1 "
                                   f"--env=BIPROP_RESTARTS=1 --output={script.parent}/logs/run1_job{{{{id}}}}.out "
                                   f"{script}"], output


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- submit, resubmit, status ------------------------------------------------------------------------------

def archive(run_dir: Path, status: str, epochs_done: int, planned: int = 3, restarts: int = 0, top1=None) -> None:
    metrics = {name: [float(e + 1) for e in range(epochs_done)] for name in METRICS}
    metrics["epoch"] = list(range(1, epochs_done + 1))
    record = RunRecord(attrs={"status": status, "epochs": planned, "config": json.dumps({"epochs": planned})},
                       metrics=metrics, final={"test_top1": top1} if top1 is not None else {},
                       restarts=[{"time": "t", "epoch": 1, "step": 5, "reason": "SIGUSR1"}] * restarts)
    write_archive(run_dir / "archive.h5", record)


def test_submit_records_job_ids_and_resubmits_only_unfinished_runs(tmp_path, monkeypatch):
    env = fake_bin(tmp_path, {"sbatch": "echo 100", "squeue": 'echo "$SQUEUE"'})
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("CALLS", env["CALLS"])
    argv = ["submit", "--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", tmp_path / "runs",
            "--sweep", "keep_ratio=0.5,0.2,0.1,0.05", "--job-name", "s"]
    jobs(*argv, cwd=tmp_path)
    directory = tmp_path / "runs" / "sweeps" / "s"
    assert calls(tmp_path) == [f"sbatch --parsable --array=1-4 {directory}/job.sh"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["submissions"][0]["job_ids"] == {"1": "100_1", "2": "100_2", "3": "100_3", "4": "100_4"}
    runs = [Path(run["run_dir"]) for run in manifest["runs"]]
    archive(runs[0], "completed", 3, top1=84.43)   # done
    archive(runs[1], "running", 1)                 # killed: the scheduler has forgotten it
    monkeypatch.setenv("SQUEUE", "100_3 PENDING\n100_4 RUNNING")
    jobs(*argv, cwd=tmp_path)
    assert calls(tmp_path)[-1] == f"sbatch --parsable --array=2 {directory}/job.sh"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["submissions"][1]["job_ids"] == {"2": "100_2"}
    monkeypatch.setenv("SQUEUE", "100_2 RUNNING\n100_3 PENDING\n100_4 RUNNING")
    jobs(*argv, cwd=tmp_path)
    assert [line.split()[0] for line in calls(tmp_path)] == ["sbatch", "squeue", "sbatch", "squeue"]
    with pytest.raises(ConfigError, match="has other runs"):
        jobs(*argv[:-4], "--sweep", "keep_ratio=0.5", "--job-name", "s", cwd=tmp_path)


def test_a_forgotten_job_is_not_an_unreachable_scheduler(tmp_path, monkeypatch):
    env = fake_bin(tmp_path, {"squeue": 'echo "$ERROR" >&2; exit 1'})
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("CALLS", env["CALLS"])
    monkeypatch.setenv("ERROR", "slurm_load_jobs error: Invalid job id specified")
    assert SCHEDULERS["slurm"].query(["12_1", "12_2"]) == {}
    monkeypatch.setenv("ERROR", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
    assert SCHEDULERS["slurm"].query(["12_1"]) is None
    assert calls(tmp_path) == ["squeue -h --array -t all -j 12 -o %i %T"] * 2


def test_status_from_archives_and_logs_without_a_scheduler(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")  # neither squeue nor anything else
    directory = tmp_path / "runs" / "sweeps" / "s"
    runs = [tmp_path / "runs" / "conv2" / f"keep={k}" / "seed0" for k in ("0.5", "0.4", "0.3", "0.2", "0.1")]
    for run_dir in runs:
        run_dir.mkdir(parents=True)
    archive(runs[0], "completed", 3, restarts=2, top1=84.43)
    archive(runs[1], "running", 1)
    archive(runs[2], "failed", 2)
    archive(runs[3], "checkpointed", 1, restarts=1)
    (directory / "logs").mkdir(parents=True)
    (directory / "logs" / "run3_job100_3.out").write_text("start\n" + "".join(f"line {i}\n" for i in range(12)))
    manifest = {"manifest_version": 1, "name": "s", "scheduler": "slurm", "created": "", "script": "", "workdir": "",
                "runs": [{"index": i, "args": [], "run_dir": str(r), "values": {}} for i, r in enumerate(runs, 1)],
                "submissions": [{"job_ids": {str(i): f"100_{i}" for i in range(1, 6)}}]}
    (directory / "manifest.json").write_text(json.dumps(manifest))

    assert jobs("status", directory, cwd=tmp_path) is None
    table = capsys.readouterr().out
    assert "s (slurm, 5 run(s): 1 completed, 1 running, 1 failed, 1 checkpointed, 1 queued)" in table
    lines = {line.split()[0]: line.split(None, 5) for line in table.splitlines()[2:7]}
    assert lines["1"][1:5] == ["completed", "100_1", "2", "conv2/keep=0.5/seed0"]
    assert "test top-1 84.43" in lines["1"][5]
    assert lines["2"][1] == "running" and "epoch 2/3" in lines["2"][5]
    assert lines["3"][1] == "failed" and "failed in epoch 3/3" in lines["3"][5]
    assert lines["4"][1] == "checkpointed" and "checkpointed in epoch 2/3" in lines["4"][5]
    assert lines["5"][1] == "queued" and "no archive yet" in lines["5"][5]
    assert "run 3, last lines of its log:\n    line 4\n" in table

    result = jobs("status", directory / "manifest.json", "--json", cwd=tmp_path)
    states = {run["index"]: run for run in result["jobs"][0]["runs"]}
    assert [states[i]["state"] for i in range(1, 6)] == ["completed", "running", "failed", "checkpointed", "queued"]
    assert states[4]["restarts"] == 1 and states[1]["restarts"] == 2
    assert states[3]["log"] == [f"line {i}" for i in range(4, 12)]
