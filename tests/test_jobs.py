"""`biprop jobs`: rendering for SLURM, LSF and Flux, sweeps, manifests, status, and the restart logic of the
scripts run with the scheduler's commands replaced by recording fakes (no scheduler needed).
The same scripts under a real one-node Slurm cluster: test_jobs_slurm.py."""
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import call_command
from image_tree import make_image_tree

from biprop_hpc.archive import METRICS, RunRecord, read_archive, write_archive
from biprop_hpc.config import ConfigError, build_config
from biprop_hpc.data import DATASETS, DatasetMissing
from biprop_hpc.data.build import build_data
from biprop_hpc.dist import scheduler_job_id
from biprop_hpc.jobs import add_jobs_commands, checks
from biprop_hpc.jobs.resources import Resources, parse_time
from biprop_hpc.jobs.schedulers import SCHEDULERS, index_ranges
from biprop_hpc.jobs.status import latest_job_ids
from biprop_hpc.train.checkpoint import load_checkpoint
from biprop_hpc.train.stopping import DEADLINE_REASON, StopRequests

REPO = Path(__file__).resolve().parents[1]
# Resolved as the jobs record it: configs/ is a link to the packaged biprop_hpc/configs.
CONFIG = (REPO / "configs" / "fashion-mnist" / "conv2_mpt1-32.yaml").resolve()
BIG_JOB = ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "10", "--time", "12h", "--queue", "pbatch",
           "--account", "bank1", "--max-running", "3", "--max-restarts", "3"]


def jobs(*argv: str, cwd: Path):
    """Run `biprop jobs ARGV` in-process, in directory cwd."""
    return call_command(add_jobs_commands, ["jobs", *argv], cwd)


def render(scheduler: str, tmp_path: Path, *extra: str, name: str = "job") -> Path:
    jobs("render", "--scheduler", scheduler, "--config", CONFIG, "--out", tmp_path / "runs", "--job-name", name,
         *extra, cwd=tmp_path)
    return tmp_path / "runs" / "sweeps" / name / "job.sh"


def manifest_run_dirs(manifest: Path) -> list[Path]:
    """The manifest's run directories: recorded relative to its directory (absolute by version 1)."""
    runs = json.loads(manifest.read_text())["runs"]
    return [(manifest.parent / run["run_dir"]).resolve() for run in runs]


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
    assert runs[0]["run_dir"] == "../../conv2_mpt1-1/keep=0.5/seed0_augment=false_epochs=3"   # where it moves
    found = manifest_run_dirs(tmp_path / "runs" / "sweeps" / "s" / "manifest.json")
    assert [d.relative_to(tmp_path / "runs").as_posix() for d in found] == [
        f"conv2_mpt1-{kind}/keep={k}/seed0_augment=false_epochs=3" for kind in ("1", "32") for k in ("0.5", "0.2", "0.1")]
    assert runs[4]["args"] == ["--config", str((REPO / "configs/fashion-mnist/conv2_mpt1-32.yaml").resolve()),
                               "--out", str(tmp_path / "runs"), "--no-augment", "--epochs", "3", "--keep-ratio", "0.2",
                               "--name", "seed0_augment=false_epochs=3"]
    assert manifest["submissions"] == [] and manifest["scheduler"] == "slurm"


def test_sweeping_a_key_outside_the_run_path_names_the_runs(tmp_path):
    jobs("render", "--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", tmp_path, "--job-name", "lr",
         "--sweep", "lr=0.1,0.05", "--sweep", "milestones=3 6,4 8", cwd=tmp_path)
    runs = json.loads((tmp_path / "sweeps" / "lr" / "manifest.json").read_text())["runs"]
    assert [Path(run["run_dir"]).name for run in runs] == [
        "seed0_lr=0.1_milestones=3,6", "seed0_lr=0.1_milestones=4,8",
        "seed0_lr=0.05_milestones=3,6", "seed0_lr=0.05_milestones=4,8"]
    assert runs[1]["args"][4:] == ["--lr", "0.1", "--milestones", "4", "8", "--name", "seed0_lr=0.1_milestones=4,8"]


def test_fixed_overrides_that_change_results_are_part_of_the_run_name(tmp_path):
    """The review's clash: two sweeps over keep ratios, one with --lr 0.1 and one with --lr 0.01, both listed
    .../keep=0.5/seed0. Keys that only say how a run executes (data, threads, device, ...) stay out of names;
    equal values written differently (0.10, 0.1) give one name; a path value is named by a digest."""
    def run_dirs(name, *extra):
        jobs("render", "--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", tmp_path, "--job-name",
             name, "--data", tmp_path / "some data", "--no-check-data", "--threads", "2", "--device", "cpu", *extra,
             cwd=tmp_path)
        found = manifest_run_dirs(tmp_path / "sweeps" / name / "manifest.json")
        return [d.relative_to(tmp_path).as_posix() for d in found]

    first = run_dirs("a", "--sweep", "keep_ratio=0.5,0.2", "--lr", "0.1")
    second = run_dirs("b", "--sweep", "keep_ratio=0.5,0.1", "--lr", "0.01")
    assert first == ["conv2_mpt1-32/keep=0.5/seed0_lr=0.1", "conv2_mpt1-32/keep=0.2/seed0_lr=0.1"]
    assert second == ["conv2_mpt1-32/keep=0.5/seed0_lr=0.01", "conv2_mpt1-32/keep=0.1/seed0_lr=0.01"]
    assert run_dirs("c", "--lr", "0.10", "--seed", "3") == ["conv2_mpt1-32/keep=0.5/seed3_lr=0.1"]
    assert run_dirs("d", "--name", "exp", "--sweep", "seed=1,2") == ["conv2_mpt1-32/keep=0.5/exp_seed=1",
                                                                     "conv2_mpt1-32/keep=0.5/exp_seed=2"]
    [digest] = run_dirs("e", "--pretrained", tmp_path / "a model.pt")
    assert re.fullmatch(r"conv2_mpt1-32/keep=0.5/seed0_pretrained=[0-9a-f]{10}", digest)
    assert run_dirs("f") == ["conv2_mpt1-32/keep=0.5/seed0"]


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


# --- checks before queueing --------------------------------------------------------------------------------

CONFIGS = CONFIG.parents[1]


def train_says(config: Path, overrides: dict) -> str:
    """What `biprop train` says when a run starts (build_data, as Run does) and its data is not there."""
    with pytest.raises(DatasetMissing) as refused:
        build_data(build_config(str(config), overrides), 0, 1, torch.device("cpu"))
    return str(refused.value)


@pytest.mark.parametrize("config, flags", [
    ("cifar10/conv2_mpt1-32_kn.yaml", {"data": "empty"}),            # a directory without the CIFAR-10 batches
    ("fashion-mnist/conv2_mpt1-32.yaml", {"data": "empty"}),         # ... without the four IDX files
    ("fashion-mnist/conv2_mpt1-32.yaml", {}),                        # its standard directory absent
    ("imagenet/wrn50-2_mpt1-32_sc.yaml", {"data": "nowhere"}),       # a tree that does not exist
    ("imagenet/wrn50-2_mpt1-32_sc.yaml", {"data": "no-val"}),        # a tree without val/
    ("fashion-mnist/conv2_mpt1-32.yaml", {"dataset": "imagenet"}),   # an image tree and no --data
    ("fashion-mnist/default.yaml", {}),                              # the config's relative data/... is absent
])
def test_missing_data_is_refused_before_anything_is_written(tmp_path, monkeypatch, config, flags):
    """Every way a run's data can be missing is refused at render, in the words `biprop train` would use at
    the start of the job, naming the runs and --no-check-data; with --no-check-data the job is written."""
    (tmp_path / "empty").mkdir()
    make_image_tree(tmp_path / "no-val", classes=2, per_class={"train": 1})
    assert DATASETS["fashion-mnist"].default_dir == "/usr/share/datasets/fashion-mnist"   # README
    standard = dataclasses.replace(DATASETS["fashion-mnist"], default_dir=str(tmp_path / "standard"))
    monkeypatch.setitem(DATASETS, "fashion-mnist", standard)
    monkeypatch.chdir(tmp_path)   # relative data paths are the job's working directory's, as train's
    flags = {key: str(tmp_path / value) if key == "data" else value for key, value in flags.items()}
    given = [word for key, value in flags.items() for word in (f"--{key}", value)]
    argv = ["render", "--scheduler", "slurm", "--config", CONFIGS / config, "--time", "1h", "--out", tmp_path / "runs",
            "--job-name", "j", "--sweep", "seed=0,1,2", *given]
    with pytest.raises(DatasetMissing) as refused:
        jobs(*argv, cwd=tmp_path)
    message = str(refused.value)
    assert message.startswith(f"runs 1-3 ({tmp_path / 'runs'}/") and " and 2 more): " in message, message
    assert train_says(CONFIGS / config, flags) in message
    assert message.endswith("if the path exists only on the compute nodes, pass --no-check-data)")
    assert not (tmp_path / "runs").exists()
    jobs(*argv, "--no-check-data", cwd=tmp_path)
    assert (tmp_path / "runs" / "sweeps" / "j" / "job.sh").exists()


def test_a_dataset_without_a_standard_directory_needs_data_exit_2(tmp_path):
    """CIFAR-10 has no standard directory and nothing is downloaded: without --data the job is refused (exit 2,
    nothing written), where `biprop train` would have looked for the batches in its working directory."""
    done = subprocess.run([sys.executable, "-m", "biprop_hpc", "jobs", "submit", "--scheduler", "slurm", "--config",
                           str(CONFIGS / "cifar10" / "conv4_mpt1-32_kn.yaml"), "--time", "1h"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert (f"biprop: error: run 1 ({tmp_path}/runs/conv4_mpt1-32_kn/keep=0.5/seed0): dataset cifar10: no --data "
            "given, and it has no standard directory. Point --data at the extracted `cifar-10-batches-py` "
            "directory") in done.stderr
    assert "pass --no-check-data" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_data_that_is_there_passes_and_each_path_is_looked_at_once(tmp_path, tiny_idx_dir, monkeypatch):
    original, looked = checks.check_data_path, []
    monkeypatch.setattr(checks, "check_data_path", lambda *place: looked.append(place) or original(*place))
    jobs("render", "--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", tmp_path / "runs", "--job-name",
         "a", "--dataset", "mnist", "--data", tiny_idx_dir, "--sweep", "seed=" + ",".join(map(str, range(12))),
         cwd=tmp_path)
    assert looked == [("mnist", str(tiny_idx_dir))]   # 12 runs, one data path
    make_image_tree(tmp_path / "tree", classes=2, per_class={"train": 1, "val": 1})
    jobs("render", "--scheduler", "slurm", "--config", CONFIGS / "imagenet" / "wrn50-2_mpt1-32_sc.yaml", "--time",
         "1h", "--out", tmp_path / "runs", "--job-name", "b", "--data", "tree", "--sweep", "keep_ratio=0.5,0.1",
         cwd=tmp_path)
    assert looked[1:] == [("imagenet", "tree")]   # relative to the working directory, as the job's
    (tmp_path / "cifar").mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:   # what read_cifar10_split opens
        (tmp_path / "cifar" / name).write_bytes(b"")
    jobs("render", "--scheduler", "slurm", "--config", CONFIGS / "cifar10" / "conv2_mpt1-32_kn.yaml", "--time", "1h",
         "--out", tmp_path / "runs", "--job-name", "c", "--data", tmp_path / "cifar", cwd=tmp_path)
    assert all((tmp_path / "runs" / "sweeps" / name / "job.sh").exists() for name in "abc")


def test_a_run_that_train_would_refuse_is_refused_at_render(tmp_path):
    """Every run's config is built and checked as `biprop train` builds it: a bad value names its run."""
    argv = ["render", "--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", tmp_path / "runs"]
    with pytest.raises(ConfigError, match=r"^run 2 \(.*/keep=0.5/seed0_model=conv9\): model: unknown 'conv9'.* "
                                          r"Known models: .*conv2, "):
        jobs(*argv, "--sweep", "model=conv2,conv9", cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"^run 3 of 4 \(epochs=0, lr=0.1\): epochs: must be >= 1, got 0$"):
        jobs(*argv, "--sweep", "epochs=3,0", "--sweep", "lr=0.1,0.2", cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"^lr_schedule multistep needs milestones"):
        jobs(*argv, "--lr-schedule", "multistep", cwd=tmp_path)
    assert not (tmp_path / "runs").exists()


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
    assert f"source {(REPO / 'env' / 'site.sh').resolve()}" in text  # a link to the packaged site.sh
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
    # No --signal: a broker of rank > 0 would shut down on it (see the template); the ranks keep a deadline.
    assert directives(script, "# flux:") == [
        "--job-name=job", "-N 2", "-n 8", "-g 1", "-c 10", "-t 86430s", "-q pbatch", "-B bank1",
        f"--output={script.parent}/logs/run{{cc}}_job{{{{id}}}}.out"]
    assert "flux submit -N 2 -n 8 -g 1 -c 10 -o exit-timeout=60s \\\n" in script.read_text()


def sbatch_words(line: str) -> list[str]:
    """The words sbatch reads from an #SBATCH line, as _get_argument in SchedMD/slurm src/sbatch/opt.c reads
    them: ' or " quote, a backslash takes the next character as it is, an unquoted # ends the line; an
    unmatched quote is fatal."""
    words, i = [], 0
    while True:
        while i < len(line) and line[i].isspace():
            i += 1
        if i == len(line):
            return words
        word, quote, escaped = "", "", False
        while i < len(line) and (quote or not line[i].isspace()):
            char, i = line[i], i + 1
            if escaped:
                word, escaped = word + char, False
            elif char == "\\":
                escaped = True
            elif quote:
                quote, word = ("", word) if char == quote else (quote, word + char)
            elif char in "\"'":
                quote = char
            elif char == "#":
                return words + [word] if word else words
            else:
                word += char
        assert not quote, f"sbatch: unmatched {quote} in {line!r}"
        words.append(word)


def flux_directive_words(line: str) -> list[str]:
    """The words `flux batch` reads from a `# flux:` line (Directive in flux-core
    src/bindings/python/flux/job/directives.py)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.escapedquotes = "\"'"
    return list(lexer)


# bsub's parser is not public; IBM's documentation quotes #BSUB values as a shell would (#BSUB -R "span[hosts=1]").
PARSERS = {"slurm": ("#SBATCH", sbatch_words), "lsf": ("#BSUB", shlex.split), "flux": ("# flux:", flux_directive_words)}


@pytest.mark.parametrize("scheduler", ["slurm", "lsf", "flux"])
def test_paths_with_spaces_survive_directives_and_commands(tmp_path, scheduler):
    where = tmp_path / "my work"
    where.mkdir()
    site_env = where / "site env.sh"
    site_env.write_text('echo "site env sourced" >> "$CALLS"\n')
    script = render(scheduler, where, "--time", "1h", "--site-env", site_env, "--sweep", "keep_ratio=0.5,0.2")
    assert script.parent == where / "runs" / "sweeps" / "job"
    bash_n(script)
    prefix, words = PARSERS[scheduler]
    parsed = [words(line) for line in directives(script, prefix)]
    logs = f"{script.parent}/logs"
    wanted = {"slurm": [f"--output={logs}/run%a_job%A.out"], "lsf": ["-o", f"{logs}/run%I_job%J.out"],
              "flux": [f"--output={logs}/run{{cc}}_job{{{{id}}}}.out"]}[scheduler]
    assert wanted in parsed, parsed
    # Each argument on its own line shows where the words of a command begin and end.
    args = 'printf "%s\\n" "$PWD" "$@" > "$CALLS.args"'
    env = fake_bin(tmp_path, {"srun": f"{args}; exit 75", "scontrol": "exit 0", "squeue": "exit 1",
                              "jsrun": f"{args}; exit 75", "brequeue": "exit 0", "bjobs": "exit 1",
                              "flux": FAKE_FLUX.replace('"--parent batch") echo fNEXT',
                                                        f'"--parent batch") {args}; echo fNEXT')})
    variables = {"slurm": dict(SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="2", SLURM_JOB_ID="7"),
                 "lsf": dict(LSB_JOBID="77", LSB_JOBINDEX="2"), "flux": {}}[scheduler]
    if scheduler == "flux":
        env = flux_batch_environment(env, "ƒ7", FLUX_JOB_CC="2", RC="75")
    done = run_script(script, env, **variables)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls(tmp_path)[0] == "site env sourced"
    recorded = Path(f"{tmp_path}/calls.args").read_text().splitlines()
    if scheduler == "flux":  # the continuation: its log and the script are one word each
        assert recorded[-2:] == [f"--output={logs}/run2_job{{{{id}}}}.out", str(script)]
        assert (script.parent / "continuations.txt").read_text().startswith("2 fNEXT ")
    else:  # the ranks: the working directory and `biprop train ... --out DIR`
        assert recorded[0] == str(where)
        assert recorded[recorded.index("--out") + 1] == f"{where}/runs"
    if scheduler == "lsf":
        assert (script.parent / "restarts" / "77.2").read_text().strip() == "1"


@pytest.mark.parametrize("bad, message", [("a\nb", "a line break cannot be written into a job script"),
                                          ('say "hi"', "cannot hold a double quote or a backslash"),
                                          ("back\\slash", "cannot hold a double quote or a backslash")])
def test_paths_a_script_cannot_hold_are_refused(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        render("slurm", tmp_path, "--time", "1h", "--out", tmp_path / bad)
    assert not list(tmp_path.rglob("job.sh"))


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


# The job's end as the scripts read it: `squeue -h -j ID -o %e` prints the expected end in local time, ISO
# without a zone (squeue(1) %e; the real Slurm test checks the script reads it); SLURM_JOB_END_TIME (Slurm 23.02+)
# holds unix seconds. `bjobs -noheader -o time_left` prints the time left as "H:MM L" (IBM LSF bjobs -WL).
@pytest.mark.parametrize("scheduler", ["slurm", "lsf"])
def test_scripts_give_the_ranks_the_batch_job_id_and_a_deadline(tmp_path, scheduler):
    script = render(scheduler, tmp_path, "--time", "2h", "--sweep", "keep_ratio=0.5,0.2")
    record = 'echo "ranks BIPROP_JOB_ID=$BIPROP_JOB_ID BIPROP_STOP_AT=${BIPROP_STOP_AT:-}" >> "$CALLS"; exit 0'
    if scheduler == "slurm":
        env = fake_bin(tmp_path, {"srun": record, "squeue": 'echo "$SQUEUE_END"', "scontrol": "exit 0"})
        job = dict(SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="2", SLURM_JOB_ID="7", SQUEUE_END="2031-01-02T03:04:05")
        expected = int(datetime(2031, 1, 2, 3, 4, 5).timestamp()) - 300
        assert run_script(script, env, **job).returncode == 0
        assert calls(tmp_path)[0] == "squeue -h -j 7 -o %e"
        assert ranks(tmp_path) == [f"ranks BIPROP_JOB_ID=5_2 BIPROP_STOP_AT={expected}"]
        assert run_script(script, env, SLURM_JOB_END_TIME="2000000000", **job).returncode == 0
        assert ranks(tmp_path)[-1] == f"ranks BIPROP_JOB_ID=5_2 BIPROP_STOP_AT={2000000000 - 300}"
        job["SQUEUE_END"] = "N/A"
    else:
        env = fake_bin(tmp_path, {"jsrun": record, "bjobs": 'echo "$TIME_LEFT"'})
        job = dict(LSB_JOBID="77", LSB_JOBINDEX="2", TIME_LEFT="1:05 L")
        before = time.time()
        assert run_script(script, env, **job).returncode == 0
        assert calls(tmp_path)[0] == "bjobs -noheader -o time_left 77[2]"
        stop_at = int(ranks(tmp_path)[0].rpartition("=")[2])
        assert ranks(tmp_path) == [f"ranks BIPROP_JOB_ID=77[2] BIPROP_STOP_AT={stop_at}"]
        assert before + 3900 - 300 - 1 <= stop_at <= time.time() + 3900 - 300
        job["TIME_LEFT"] = ""
    # A deadline the scheduler does not confirm is dropped, even one left in the environment.
    assert run_script(script, env, BIPROP_STOP_AT="1", **job).returncode == 0
    assert ranks(tmp_path)[-1].endswith("BIPROP_STOP_AT="), calls(tmp_path)


def ranks(tmp_path: Path) -> list[str]:
    return [line for line in calls(tmp_path) if line.startswith("ranks ")]


# `flux` as a batch script meets it, from flux-core's source and documentation (flux-framework/flux-core):
# - a command reaches its instance through FLUX_URI, which the broker sets for its initial program
#   (src/broker/runat.c runat_command_modenv); without it there is nothing to connect to.
# - `flux getattr jobid`: the batch job's id in the enclosing instance, F58 (doc/man7/flux-broker-attributes.rst
#   "jobid", taken from the PMI kvsname that src/shell/pmi/pmi.c encodes as f58).
# - `flux job timeleft`: the whole seconds left to the instance, 4294967295 without a limit
#   (src/cmd/job/timeleft.c; src/common/libjob/job.c flux_job_timeleft asks the instance's R without FLUX_JOB_ID).
# - `flux submit` prints the new job's id; the job gets the submitter's environment (flux-submit(1) --env).
# - `flux job attach ID` exits with the job's exit code; it handles only SIGINT and SIGTSTP
#   (src/cmd/job/attach.c attach_signal_cb), so any other signal ends it (bash's default does the same here).
# - `flux job kill --signal=SIG ID` signals the job's tasks (src/shell/kill.c).
# - `flux --parent batch ...` submits to the enclosing instance and prints the id (doc/man1/flux-batch.rst).
FAKE_FLUX = """\
[[ -n ${FLUX_URI:-} ]] || { echo "flux: flux_open: No such file or directory" >&2; exit 1; }
case "$1 $2" in
    "getattr jobid") [[ -n ${JOBID_ATTRIBUTE:-} ]] && echo "$JOBID_ATTRIBUTE" || exit 1 ;;
    "job timeleft") [[ -n ${TIMELEFT:-} ]] && echo "$TIMELEFT" || exit 1 ;;
    "submit "*) echo "step BIPROP_JOB_ID=$BIPROP_JOB_ID BIPROP_STOP_AT=${BIPROP_STOP_AT:-}" >> "$CALLS"; echo f42 ;;
    "job attach") while [[ -n ${WAIT_FOR_KILL:-} && ! -e $CALLS.killed ]]; do sleep 0.1; done; exit $RC ;;
    "job kill") touch "$CALLS.killed" ;;
    "--parent batch") echo fNEXT ;;
    *) echo "fake flux: '$*' is not in this stand-in" >&2; exit 1 ;;
esac"""
# The variables flux-core removes from the environment of a broker's initial program, the batch script
# (src/broker/runat.c env_blocklist; doc/man7/flux-environment.rst "INITIAL PROGRAM ENVIRONMENT").
FLUX_BLOCKED = ("FLUX_JOB_ID", "FLUX_ENCLOSING_ID", "FLUX_JOB_SIZE", "FLUX_JOB_NNODES", "FLUX_JOB_TMPDIR",
                "FLUX_TASK_RANK", "FLUX_TASK_LOCAL_ID", "FLUX_URI", "FLUX_KVS_NAMESPACE", "FLUX_PROXY_REMOTE",
                "FLUX_PMI_LIBRARY_PATH", "I_MPI_PMI_LIBRARY")


def flux_batch_environment(env: dict, enclosing_id: str | None, **variables) -> dict:
    """The environment of a batch script under Flux: the job's environment (what `flux batch` copied, here
    `env` with a FLUX_JOB_ID a login shell inside another job could have had) less the blocked variables, plus
    FLUX_URI and, in current releases, FLUX_ENCLOSING_ID = the batch job's id as the broker has it, F58 with
    "ƒ" (runat.c runat_command_modenv; older releases leave it unset). FLUX_JOB_CC, which `flux batch --cc`
    puts in the job's environment (flux-environment(7)), is not blocked."""
    job_env = {**env, "FLUX_JOB_ID": "fLOGIN", "FLUX_TASK_RANK": "0", "PMI_RANK": "0"}
    batch = {k: v for k, v in job_env.items() if k not in FLUX_BLOCKED and not k.startswith(("PMI_", "SLURM_"))}
    batch["FLUX_URI"] = "local:///tmp/flux-test/local-0"
    if enclosing_id:
        batch["FLUX_ENCLOSING_ID"] = enclosing_id
    return {**batch, **variables}


@pytest.mark.parametrize("release", ["current", "older"])
def test_flux_continuation_depends_on_the_batch_jobs_own_id(tmp_path, release):
    """The review's bug: the script used FLUX_JOB_ID, which a batch script never has, and died under set -u."""
    script = render("flux", tmp_path, "--time", "1h", "--sweep", "keep_ratio=0.5,0.2", "--max-restarts", "2")
    env = fake_bin(tmp_path, {"flux": FAKE_FLUX})
    batch = (flux_batch_environment(env, "ƒ7Ab", FLUX_JOB_CC="2") if release == "current" else
             flux_batch_environment(env, None, JOBID_ATTRIBUTE="f7Ab", FLUX_JOB_CC="2"))
    before = time.time()
    done = run_script(script, batch, RC="75", TIMELEFT="3600")
    assert done.returncode == 0, done.stdout + done.stderr
    logs = script.parent / "logs"
    step = [line for line in calls(tmp_path) if line.startswith("step ")]
    stop_at = int(step[0].rpartition("=")[2])
    assert step == [f"step BIPROP_JOB_ID=f7Ab BIPROP_STOP_AT={stop_at}"]
    assert before + 3600 - 300 - 1 <= stop_at <= time.time() + 3600 - 300
    assert [line for line in calls(tmp_path) if not line.startswith("step ")] == [
        *(["flux getattr jobid"] if release == "older" else []),
        "flux job timeleft",
        f"flux submit -N 1 -n 1 -g 1 -c 1 -o exit-timeout=60s {sys.executable} -m biprop_hpc train --config {CONFIG} "
        f"--out {tmp_path}/runs --keep-ratio 0.2 --resume auto",
        "flux job attach f42",
        "flux --parent batch --dependency=afterany:f7Ab --env=BIPROP_INDEX=2 --env=BIPROP_RESTARTS=1 "
        f"--output={logs}/run2_job{{{{id}}}}.out {script}"]
    [line] = (script.parent / "continuations.txt").read_text().splitlines()
    index, job_id, when = line.split()
    assert (index, job_id) == ("2", "fNEXT") and before - 1 <= datetime.fromisoformat(when).timestamp() <= time.time()
    # the continuation's continuation is counted; the last one gives up
    done = run_script(script, batch, RC="75", BIPROP_INDEX="2", BIPROP_RESTARTS="2")
    assert done.returncode == 75 and "all 2 restarts are used" in done.stdout
    assert calls(tmp_path)[-1] == "flux job attach f42"
    for rc in ("0", "1"):
        assert run_script(script, batch, RC=rc).returncode == int(rc)
    assert sum(line.startswith("flux --parent") for line in calls(tmp_path)) == 1


def start_in_its_own_group(script: Path, env: dict) -> subprocess.Popen:
    """The script as the leader of a process group, as the broker and its initial program are (PR #6740:
    rc2 runs in the broker's process group, which the job shell signals with killpg)."""
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_flux_usr1_to_the_batch_job_reaches_the_ranks_and_a_continuation_follows(tmp_path):
    script = render("flux", tmp_path, "--time", "1h")
    env = fake_bin(tmp_path, {"flux": FAKE_FLUX})
    proc = start_in_its_own_group(script, flux_batch_environment(env, "ƒ9", RC="75", WAIT_FOR_KILL="1"))
    wait_for(lambda: "flux job attach f42" in calls(tmp_path))
    os.killpg(proc.pid, signal.SIGUSR1)  # `flux job kill -s USR1 <batch job>`: the script and attach get it too
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert calls(tmp_path)[-2:] == ["flux job kill --signal=USR1 f42",
                                    f"flux --parent batch --dependency=afterany:f9 --env=BIPROP_INDEX=1 "
                                    f"--env=BIPROP_RESTARTS=1 --output={script.parent}/logs/run1_job{{{{id}}}}.out "
                                    f"{script}"], output


@pytest.mark.parametrize("signals", [("TERM", "HUP"), ("ALRM", "HUP")], ids=["cancel", "time-limit"])
def test_flux_cancel_or_time_limit_stops_the_ranks_without_a_continuation(tmp_path, signals):
    """`flux cancel` sends SIGTERM, the time limit SIGALRM (src/modules/job-exec/job-exec.c jobinfo_cancel,
    timelimit_cb) to the job shells, which pass it to the broker's process group; the broker then aborts its
    initial program with SIGHUP (src/broker/state_machine.c state_machine_kill, runat.c abort_signal).
    As with SLURM, where a cancelled or expired job is not requeued, no continuation follows."""
    script = render("flux", tmp_path, "--time", "1h")
    env = fake_bin(tmp_path, {"flux": FAKE_FLUX})
    proc = start_in_its_own_group(script, flux_batch_environment(env, "ƒ9", RC="75", WAIT_FOR_KILL="1"))
    wait_for(lambda: "flux job attach f42" in calls(tmp_path))
    for name in signals:
        os.killpg(proc.pid, getattr(signal, f"SIG{name}"))
        time.sleep(0.3)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, output
    assert calls(tmp_path)[-1] == "flux job kill --signal=TERM f42", output
    assert f"checkpointed after SIG{signals[0]}" in output and "submit again" in output
    assert not (script.parent / "continuations.txt").exists()


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- submit, resubmit, status ------------------------------------------------------------------------------

def archive(run_dir: Path, status: str, epochs_done: int, planned: int = 3, restarts: int = 0, top1=None,
            config: dict | None = None) -> None:
    metrics = {name: [float(e + 1) for e in range(epochs_done)] for name in METRICS}
    metrics["epoch"] = list(range(1, epochs_done + 1))
    config = config or {"epochs": planned}
    record = RunRecord(attrs={"status": status, "epochs": config["epochs"], "config": json.dumps(config)},
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
    runs = manifest_run_dirs(directory / "manifest.json")
    settings = [build_config(str(CONFIG), {"keep_ratio": k, "out": str(tmp_path / "runs")}).to_dict()
                for k in (0.5, 0.2)]
    archive(runs[0], "completed", 3, top1=84.43, config=settings[0])   # done
    archive(runs[1], "running", 1, config=settings[1])                 # killed: the scheduler has forgotten it
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
    # Its config file edited since (another lr): the directory holds a run with other settings, so the
    # submission is refused before anything is queued, naming the difference.
    edited = tmp_path / "edited" / CONFIG.name
    edited.parent.mkdir()
    edited.write_text(CONFIG.read_text().replace("base: ", f"base: {CONFIG.parent}/").replace("lr: 0.1\n", "lr: 0.01\n"))
    with pytest.raises(ConfigError, match=r"keep=0.5/seed0 holds a run with other settings \(lr 0.1 -> 0.01\)"):
        jobs(*argv[:3], "--config", edited, *argv[5:-4], "--sweep", "keep_ratio=0.5", "--job-name", "x",
             cwd=tmp_path)
    assert calls(tmp_path)[-1].startswith("squeue")  # nothing submitted


def test_status_orders_submissions_and_continuations_by_time(tmp_path):
    manifest = {"submissions": [{"time": "2020-01-01T10:00:00+00:00", "job_ids": {"1": "fA", "2": "fB"}},
                                {"time": "2020-01-01T12:00:00+00:00", "job_ids": {"1": "fD"}}]}
    (tmp_path / "continuations.txt").write_text("1 fC 2020-01-01T11:00:00+01:00\n"    # 10:00 UTC, before fD
                                                "2 fE 2020-01-01T11:00:00+00:00\n")   # after fB
    assert latest_job_ids(manifest, tmp_path) == {1: "fD", 2: "fE"}
    # A line without a time (written before times were) counts as written when the file last changed.
    (tmp_path / "continuations.txt").write_text("1 fC\n")
    assert latest_job_ids(manifest, tmp_path) == {1: "fC", 2: "fB"}
    os.utime(tmp_path / "continuations.txt", (0, datetime(2020, 1, 1, 11).timestamp()))
    assert latest_job_ids(manifest, tmp_path) == {1: "fD", 2: "fB"}


def test_a_flux_submission_after_a_continuation_is_not_submitted_again(tmp_path, monkeypatch):
    """The review's bug: the continuation's id hid the later submission, so `jobs submit` saw an ended job
    and submitted a run that was queued or running."""
    minutes = iter(range(60))  # a clock that moves a minute at each look, so that every event has its own time
    monkeypatch.setattr("biprop_hpc.jobs.job.now", lambda: f"2030-01-01T10:{next(minutes):02d}:00+00:00")
    env = fake_bin(tmp_path, {"flux": 'case "$1" in batch) echo "ƒB$RANDOM" ;; jobs) echo "$FLUX_JOBS" ;; esac'})
    for name in ("PATH", "CALLS"):
        monkeypatch.setenv(name, env[name])
    argv = ["submit", "--scheduler", "flux", "--config", CONFIG, "--time", "1h", "--out", tmp_path / "runs",
            "--job-name", "s"]
    jobs(*argv, cwd=tmp_path)
    directory = tmp_path / "runs" / "sweeps" / "s"
    [submission] = json.loads((directory / "manifest.json").read_text())["submissions"]
    [first] = submission["job_ids"].values()
    assert first.startswith("fB")  # F58 ids are kept with an ASCII "f", whatever the locale made flux print
    # Its continuation ran and ended; the run is not done: submitting again submits it.
    (directory / "continuations.txt").write_text(f"1 fC {submission['time'].replace(':00+', ':30+')}\n")
    monkeypatch.setenv("FLUX_JOBS", f"{first} INACTIVE\nƒC INACTIVE")
    jobs(*argv, cwd=tmp_path)
    [second] = json.loads((directory / "manifest.json").read_text())["submissions"][1]["job_ids"].values()
    # That submission runs; the ended continuation must not hide it.
    monkeypatch.setenv("FLUX_JOBS", f"{first} INACTIVE\nƒC INACTIVE\nƒ{second[1:]} RUN")
    jobs(*argv, cwd=tmp_path)
    assert [line.split()[:2] for line in calls(tmp_path)] == [["flux", "batch"], ["flux", "jobs"], ["flux", "batch"],
                                                             ["flux", "jobs"]]


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


def test_a_moved_sweep_shows_the_states_of_its_runs(tmp_path, monkeypatch):
    """The manifest records run directories relative to itself: after `mv` of the out directory, status still
    finds every run's archive (with absolute paths it said "queued, no archive yet" for all of them)."""
    env = fake_bin(tmp_path, {"sbatch": "echo 100"})   # no squeue: the scheduler cannot be asked
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("CALLS", env["CALLS"])
    before, after = tmp_path / "scratch" / "runs", tmp_path / "project" / "moved runs"
    jobs("submit", "--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", before, "--job-name", "s",
         "--sweep", "keep_ratio=0.5,0.2,0.1", cwd=tmp_path)
    runs = manifest_run_dirs(before / "sweeps" / "s" / "manifest.json")
    archive(runs[0], "completed", 3, restarts=1, top1=84.43)
    archive(runs[1], "checkpointed", 1)

    def states(where: Path) -> list[tuple]:
        [job] = jobs("status", where / "sweeps" / "s", "--json", cwd=tmp_path)["jobs"]
        return [(run["state"], run["detail"], run["restarts"], run["run_dir"]) for run in job["runs"]]

    def expected(where: Path) -> list[tuple]:
        return [("completed", "test top-1 84.43", 1, str(where / "conv2_mpt1-32/keep=0.5/seed0")),
                ("checkpointed", "checkpointed in epoch 2/3; a continuation resumes it, or submit again", 0,
                 str(where / "conv2_mpt1-32/keep=0.2/seed0")),
                ("queued", "no archive yet (the scheduler cannot be asked)", 0,
                 str(where / "conv2_mpt1-32/keep=0.1/seed0"))]

    assert states(before) == expected(before)
    after.parent.mkdir()
    before.rename(after)
    assert states(after) == expected(after)


def test_dry_run_prints_the_submit_command_and_writes_nothing(tmp_path, capsys):
    """README: `--dry-run` prints the script, manifest and submit command and writes nothing."""
    argv = ["--scheduler", "slurm", "--config", CONFIG, "--time", "1h", "--out", tmp_path / "runs", "--job-name", "d",
            "--sweep", "keep_ratio=0.5,0.2", "--dry-run"]
    script = tmp_path / "runs" / "sweeps" / "d" / "job.sh"
    for command in ("render", "submit"):
        jobs(command, *argv, cwd=tmp_path)
        printed = capsys.readouterr().out
        assert printed.startswith(f"==> {script} <==\n#!/bin/bash\n")
        assert f"==> {script.parent / 'manifest.json'} <==\n{{" in printed
        assert printed.endswith(f"\nwould submit: sbatch --parsable --array=1-2 {script}\n")
    assert list(tmp_path.iterdir()) == []


# --- what the scripts give the ranks: the batch job's id and a deadline ------------------------------------

def test_the_batch_jobs_id_comes_before_the_ranks_own():
    assert scheduler_job_id({"BIPROP_JOB_ID": "f7Ab", "FLUX_JOB_ID": "f42"}) == "f7Ab"
    assert scheduler_job_id({"BIPROP_JOB_ID": "5_2", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "9"}) == "5_2"
    assert scheduler_job_id({"FLUX_JOB_ID": "f42"}) == "f42"
    assert scheduler_job_id({"LSB_JOBID": "77", "LSB_JOBINDEX": "4"}) == "77[4]"


def test_a_deadline_is_a_stop_request_once_it_has_passed():
    now = [100.0]
    stop = StopRequests({"BIPROP_STOP_AT": "150"}, clock=lambda: now[0])
    assert stop.stop_at == 150 and stop.reason is None
    now[0] = 150.0
    assert stop.reason == DEADLINE_REASON
    stop._record(signal.SIGTERM, None)  # the first request is the one that counts
    assert stop.reason == DEADLINE_REASON
    signalled = StopRequests({"BIPROP_STOP_AT": "150"}, clock=lambda: now[0] - 100)
    signalled._record(signal.SIGUSR1, None)
    now[0] = 1000.0
    assert signalled.reason == "SIGUSR1"
    assert StopRequests({}).stop_at is None and StopRequests({"BIPROP_STOP_AT": " "}).stop_at is None
    for bad in ("soon", "nan", "inf"):
        with pytest.raises(ValueError, match=f"BIPROP_STOP_AT='{bad}' is not a time: give unix seconds"):
            StopRequests({"BIPROP_STOP_AT": bad})


def test_train_stops_at_its_deadline_and_records_the_batch_jobs_id(tmp_path, tiny_idx_dir):
    """`biprop train` as the ranks run it, with a deadline that has passed: a checkpoint after its first
    steps, exit 75, the reason in the checkpoint, and the archive naming the batch job, not the step."""
    env = {**os.environ, "BIPROP_STOP_AT": str(int(time.time()) - 1), "BIPROP_JOB_ID": "f7Ab", "FLUX_JOB_ID": "f42"}
    done = subprocess.run([sys.executable, "-m", "biprop_hpc", "train", "--dataset", "mnist", "--model", "conv2",
                           "--data", str(tiny_idx_dir), "--width-mult", "0.25", "--batch-size", "4", "--threads", "1",
                           "--out", str(tmp_path), "--name", "late", "--epochs", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 75, done.stderr
    [archive] = tmp_path.rglob("late/archive.h5")
    record = read_archive(archive)
    assert record.attrs["status"] == "checkpointed" and record.attrs["job_id"] == "f7Ab"
    state = load_checkpoint(archive.parent / "checkpoints" / "last.pt")["state"]
    assert state["stop_reason"] == DEADLINE_REASON and state["epoch"] == 0 and 0 < state["step"] <= 2, state
    assert f"{DEADLINE_REASON}: checkpointed at epoch 1" in done.stderr
