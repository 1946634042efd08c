"""The command line as a user meets it: help text for every train flag, --version, --print-config, `biprop
models`, shell completion through argcomplete's real bash hook, a start without torch, and under a real 2-rank
mpirun an error common to all ranks printed once while a rank's own error still names its rank."""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import biprop_hpc
from biprop_hpc import cli
from conftest import write_tiny_dataset
from biprop_hpc.config import CHOICES, FIELDS, build_config, config_yaml, field_comments

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent   # the venv's console scripts: biprop, register-python-argcomplete
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biprop_hpc", *args], capture_output=True, text=True,
                          timeout=300, env=ENV, **kwargs)


def train_parser() -> argparse.ArgumentParser:
    commands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


# --- help -------------------------------------------------------------------------------------------------------

def test_every_train_flag_says_what_it_means_its_default_and_its_allowed_values():
    defaults = {key: field.default for key, field in FIELDS.items()}
    flags = {a.dest: a for a in train_parser()._actions if a.dest not in ("help", "config", "print_config")}
    assert set(FIELDS) <= set(flags)
    for dest, action in flags.items():
        assert action.help and "(default: " in action.help, f"--{dest} has no help text or default"
        text = action.help.split(" (default: ")[0]
        assert len(text) > 8, f"--{dest}: {text!r} says nothing"
        assert dest not in FIELDS or text == field_comments()[dest]   # one source: the key's comment in Config
        if dest in CHOICES:
            assert action.metavar == "{" + ",".join(CHOICES[dest]) + "}"
    assert flags["amp"].help == "mixed precision on CUDA: none | bf16 | fp16 (default: none)"   # README's example
    assert flags["epochs"].help.endswith(f"(default: {defaults['epochs']})")
    shown = subprocess.run([BIN / "biprop", "train", "--help"], capture_output=True, text=True, env=ENV).stdout
    assert "--amp {none,bf16,fp16}" in shown and "mixed precision on CUDA" in shown
    assert "(default: kept_fraction)" in " ".join(shown.split())  # argparse wraps lines


def test_version():
    done = subprocess.run([BIN / "biprop", "--version"], capture_output=True, text=True, env=ENV)
    assert (done.returncode, done.stdout) == (0, f"biprop-hpc {biprop_hpc.__version__}\n")


# --- --print-config -----------------------------------------------------------------------------------------------

def test_print_config_prints_the_merged_config_which_runs_as_the_same_config(tmp_path, capsys):
    config = REPO / "configs/cifar10/conv4_mpt1-32_kn.yaml"
    flags = ["--lr", "0.05", "--milestones", "3", "5", "--no-augment", "--seed", "3", "--out", str(tmp_path / "out")]
    assert cli.main(["train", "--config", str(config), *flags, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "out").exists()   # printed, not run
    original = build_config(str(config), cli._overrides(cli._parser().parse_args(["train", *flags])))
    same_name = tmp_path / f"{config.stem}.yaml"
    same_name.write_text(printed)
    assert build_config(str(same_name), {}) == original
    # a copy under another name runs under that name: config_name follows the file, as for any config
    other = tmp_path / "mine.yaml"
    other.write_text(printed)
    assert build_config(str(other), {}) == build_config(str(config), {**original.to_dict(), "config_name": "mine"})


@pytest.mark.parametrize("config", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")
                                          if not p.name.startswith("_")))
def test_every_packaged_config_round_trips_through_print_config(tmp_path, config):
    original = build_config(str(REPO / config), {"name": "run"})
    copy = tmp_path / Path(config).name
    copy.write_text(config_yaml(original, str(REPO / config)))
    assert build_config(str(copy), {}) == original


def test_print_config_of_a_bad_value_is_an_error():
    done = run("train", "--amp", "fp64", "--print-config")
    assert done.returncode == 2 and "biprop: error: amp: 'fp64' is not one of none, bf16, fp16" in done.stderr


# --- biprop models ------------------------------------------------------------------------------------------------

def test_a_positional_argument_split_from_the_others_by_an_option_is_named(tmp_path, capsys):
    """argparse leaves `results a --group-by model b`'s b over; it used to be reported as an unknown option with a
    flag suggestion."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["results", str(tmp_path), "--group-by", "model", "more_runs"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unexpected argument 'more_runs'" in err and "together" in err and "did you mean" not in err


def test_a_negative_log_seconds_is_refused():
    with pytest.raises(ValueError, match="log_seconds: must be >= 0"):
        build_config(None, {"log_seconds": "-1"}).validate()


def test_models_lists_the_zoo_with_parameter_counts(capsys):
    torchvision = pytest.importorskip("torchvision")
    from torch import nn

    from biprop_hpc.models import MODELS
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "cifar10 3x32x32, 10 classes; imagenet 3x224x224, 1000 classes" in out   # the input counted on
    rows = {line.split()[0]: line.split() for line in out.splitlines()[5:]}
    assert set(rows) == set(MODELS)
    # Conv-2 (Frankle & Carbin): 3x3 convs 3->64->64, pool, FC 16*16*64->256->256->10 on 32x32 inputs
    assert rows["conv2"][1:] == ["cifar10", f"{3*64*9 + 64*64*9 + 16*16*64*256 + 256*256 + 256*10:,}", "0"]
    # ImageNet ResNets: torchvision's conv and linear weights (its BN affine and FC bias are not BIPROP weights)
    for name in ("resnet18", "resnet50", "wide_resnet50_2"):
        reference = getattr(torchvision.models, name)(weights=None)
        weights = sum(m.weight.numel() for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert rows[name][1:3] == ["imagenet", f"{weights:,}"]


# --- a fast start, shell completion ----------------------------------------------------------------------------

def test_the_command_line_is_built_without_torch():
    code = ("import sys, biprop_hpc.cli as c; c._parser()\n"
            "print(sorted(m for m in ('torch', 'horovod', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert done.stdout.strip() == "[]", done.stderr


def test_the_choices_agree_with_the_implementations():
    from biprop_hpc import choices
    from biprop_hpc.data.datasets import DATASETS
    assert tuple(DATASETS) == choices.FILE_DATASETS


@pytest.mark.skipif(shutil.which("bash") is None or not (BIN / "register-python-argcomplete").exists(),
                    reason="needs bash and argcomplete (in setup.cfg's install_requires)")
def test_bash_completion_through_argcomplete_as_readme_sets_it_up():
    """README's `eval "$(register-python-argcomplete biprop)"`, then bash's completion call as bash makes it
    on a Tab (COMP_LINE, COMP_POINT, COMP_WORDS, COMP_CWORD; see `man bash`, Programmable Completion)."""
    def complete(line: str) -> list[str]:
        script = ('eval "$(register-python-argcomplete biprop)"\n'
                  f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({line}); '
                  'COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n'
                  '_python_argcomplete biprop\nprintf "%s\\n" "${COMPREPLY[@]}"\n')
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
        return [word.strip() for word in done.stdout.splitlines() if word.strip()]

    assert complete("biprop tr") == ["train"]
    assert complete("biprop train --amp b") == ["bf16"]
    assert complete("biprop train --lr-sch") == ["--lr-schedule"]


# --- one error, once ----------------------------------------------------------------------------------------------

def mpirun(*contexts: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A real mpirun of one or more app contexts (`-np N [--wdir D] command`, joined by ':', Open MPI's MPMD)."""
    command = ["mpirun", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    for index, context in enumerate(contexts):
        command += ([":"] if index else []) + context
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd)


def train_args(data: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "biprop_hpc", "train", "--dataset", "mnist", "--data", data, "--model",
            "conv2_bin", "--width-mult", "0.25", "--epochs", "1", "--eval-batch-size", "25", "--val-fraction",
            "0.2", "--threads", "1", "--out", str(out), "--name", "run", *extra]


needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (env/install.sh installs it)")


@needs_mpirun
def test_an_error_every_rank_has_is_printed_once_by_rank_0(tmp_path, tiny_idx_dir):
    bad_value = mpirun(["-np", "2", *train_args(str(tiny_idx_dir), tmp_path / "out", "--amp", "fp64")], cwd=tmp_path)
    assert bad_value.returncode == 2
    assert bad_value.stderr.count("biprop: error:") == 1, bad_value.stderr
    assert "\nbiprop: error: amp: 'fp64' is not one of none, bf16, fp16\n" in "\n" + bad_value.stderr
    # a command-line error: every rank parses the same command line
    typo = mpirun(["-np", "2", *train_args(str(tiny_idx_dir), tmp_path / "out", "--save-evry", "2")], cwd=tmp_path)
    assert typo.returncode == 2
    assert typo.stderr.count("biprop: error:") == 1, typo.stderr
    assert "biprop: error: unknown option --save-evry; did you mean --save-every?" in typo.stderr
    # an error rank 0 finds and broadcasts (train.loop._on_root): the checkpoint to resume from is missing
    missing = mpirun(["-np", "2", *train_args(str(tiny_idx_dir), tmp_path / "out", "--resume", "nowhere.pt")],
                     cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.count("biprop: error:") == 1, missing.stderr
    assert "\nbiprop: error: resume: checkpoint nowhere.pt does not exist" in "\n" + missing.stderr


@needs_mpirun
def test_an_error_of_one_rank_names_that_rank(tmp_path):
    """Two app contexts with their own working directories: the relative --data exists only in rank 0's, as
    a dataset on a node-local disk that one node lacks."""
    (tmp_path / "node0/data").mkdir(parents=True)
    (tmp_path / "node1").mkdir()
    write_tiny_dataset(tmp_path / "node0/data")
    args = train_args("data", tmp_path / "out")
    done = mpirun(["-np", "1", "--wdir", str(tmp_path / "node0"), *args],
                  ["-np", "1", "--wdir", str(tmp_path / "node1"), *args], cwd=tmp_path)
    assert done.returncode != 0
    assert "[rank 1] biprop: error: dataset mnist: directory 'data' does not exist" in done.stderr, done.stderr
    assert done.stderr.count("biprop: error:") == 1
