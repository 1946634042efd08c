"""The built wheel works outside a clone: its templates, configs and site.sh are package data (a wheel holds only
biprop_hpc/**), and `biprop configs list | show | copy` serves the packaged configs.

The wheel test builds a wheel from a copy of the checkout's files (tracked and not ignored; never in the checkout,
where a stale build/ could hide a missing file), installs it with --no-deps into an empty venv that sees this
venv's packages through a .pth file (a venv made from a venv cannot use --system-site-packages: that would expose
the base interpreter's packages, not this venv's), and runs that venv's `biprop` from a directory outside the
clone. Python documents that a .pth line adds a directory to sys.path, and that .pth files in such a directory
are not read (https://docs.python.org/3/library/site.html), so this venv's editable-install finder stays out.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from biprop_hpc.config import ConfigError, build_config
from biprop_hpc.configs_command import add_configs_commands
from conftest import call_command
from biprop_hpc.package_data import config_file, config_names, configs_dir

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "biprop_hpc"
CONFIG = "cifar10/conv4_mpt1-32_kn"


def checkout_copy(destination: Path) -> Path:
    """The checkout's files as git sees them (tracked or untracked-but-not-ignored), symlinks kept as links."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        # Paths under a linked directory (configs/... while configs -> biprop_hpc/configs) come with the link.
        if not os.path.lexists(source) or any((REPO / parent).is_symlink() for parent in Path(name).parents):
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = checkout_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("biprop_hpc-*.whl")
    return built


def test_the_wheel_holds_the_package_data_as_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        members = {info.filename: info for info in archive.infolist()}
        for name in ["biprop_hpc/jobs/site.sh", "biprop_hpc/jobs/templates/slurm.sh.j2",
                     "biprop_hpc/jobs/templates/lsf.sh.j2", "biprop_hpc/jobs/templates/flux.sh.j2",
                     "biprop_hpc/configs/cifar10/_mpt1-32.yaml", f"biprop_hpc/configs/{CONFIG}.yaml"]:
            assert name in members, name
            assert archive.read(name) == (REPO / name).read_bytes()  # the file's content, not a link
        packaged = {name for name in members if name.startswith("biprop_hpc/configs/")}
    assert packaged == {f"biprop_hpc/configs/{path.relative_to(configs_dir()).as_posix()}"
                        for path in configs_dir().rglob("*.yaml")}


def test_an_installed_wheel_renders_a_job_and_lists_configs_outside_the_clone(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "outer-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "work"  # outside the clone: nothing here for a relative path to find
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*argv):
        return subprocess.run([str(arg) for arg in argv], cwd=work, env=env, capture_output=True, text=True,
                              timeout=120)

    imported = run(python, "-c", "import biprop_hpc; print(biprop_hpc.__file__)")
    assert Path(imported.stdout.strip()).is_relative_to(site_packages), imported
    installed = site_packages / "biprop_hpc"

    listed = run(venv / "bin" / "biprop", "configs", "list")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0].split() == ["NAME", "DATASET", "MODEL", "KEEP", "EPOCHS", "PAPER_TOP1"]
    assert [row.split()[0] for row in rows[1:]] == config_names()
    assert f"{CONFIG} cifar10 conv4 0.5 250 -" in [" ".join(row.split()) for row in rows]

    done = run(venv / "bin" / "biprop", "jobs", "render", "--dry-run", "--scheduler", "slurm", "--config", CONFIG,
               "--data", work / "cifar-10-batches-py", "--no-check-data", "--time", "1h", "--out", work / "runs")
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --time=0-01:00:00" in done.stdout  # the packaged template rendered
    assert f"source {installed / 'jobs' / 'site.sh'}" in done.stdout  # the packaged site environment
    assert "export HDF5_USE_FILE_LOCKING=FALSE" in (installed / "jobs" / "site.sh").read_text()
    assert f"--config {installed / 'configs' / CONFIG}.yaml" in done.stdout  # the name found the packaged file
    assert not (work / "runs").exists()  # --dry-run wrote nothing

    copied = run(venv / "bin" / "biprop", "configs", "copy", CONFIG)
    assert copied.returncode == 0, copied.stderr
    assert (work / "conv4_mpt1-32_kn.yaml").read_text() == (PACKAGED / "configs" / f"{CONFIG}.yaml").read_text()
    assert (work / "_mpt1-32.yaml").is_file()  # its base: file, so the copy runs as it is


# --- `biprop configs` and packaged names, in the clone -------------------------------------------------------

def configs(*argv: str, cwd: Path):
    return call_command(add_configs_commands, ["configs", *argv], cwd)


def test_the_readme_paths_are_links_into_the_package():
    assert (REPO / "configs").resolve() == PACKAGED / "configs"
    assert (REPO / "env" / "site.sh").resolve() == PACKAGED / "jobs" / "site.sh"
    for scheduler in ("slurm", "lsf", "flux"):
        template = f"{scheduler}.sh.j2"
        assert (REPO / "jobs" / template).resolve() == PACKAGED / "jobs" / "templates" / template


def test_a_packaged_name_is_the_same_config_as_its_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_path = build_config(str(REPO / "configs" / f"{CONFIG}.yaml"), {})
    for given in (CONFIG, f"{CONFIG}.yaml", f"configs/{CONFIG}.yaml"):
        assert build_config(given, {}) == by_path
    (tmp_path / "configs" / "cifar10").mkdir(parents=True)
    own = tmp_path / "configs" / f"{CONFIG}.yaml"
    own.write_text("dataset: cifar10\nmodel: conv2\n")
    assert config_file(f"configs/{CONFIG}.yaml") == f"configs/{CONFIG}.yaml"  # an existing file comes first
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("cifar10/no_such_config", {})


def test_show_and_unknown_names(tmp_path, capsys):
    configs("show", CONFIG, cwd=tmp_path)
    assert capsys.readouterr().out == (PACKAGED / "configs" / f"{CONFIG}.yaml").read_text()
    configs("show", "cifar10/_mpt1-32", cwd=tmp_path)  # a base file
    assert capsys.readouterr().out == (PACKAGED / "configs" / "cifar10" / "_mpt1-32.yaml").read_text()
    with pytest.raises(ConfigError, match=f"no packaged config 'conv4_mpt1-32_kn'; closest: {CONFIG}"):
        configs("show", "conv4_mpt1-32_kn", cwd=tmp_path)


def test_copy_refuses_to_overwrite_without_force(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    target.write_text("lr: 0.5\n")
    with pytest.raises(ConfigError, match="mine.yaml exists with other content: add --force"):
        configs("copy", CONFIG, target, cwd=tmp_path)
    assert target.read_text() == "lr: 0.5\n" and not (tmp_path / "_mpt1-32.yaml").exists()  # nothing written
    configs("copy", CONFIG, target, "--force", cwd=tmp_path)
    copy, packaged = build_config(str(target), {}).to_dict(), build_config(CONFIG, {}).to_dict()
    assert copy.pop("config_name") == "mine" and packaged.pop("config_name") == "conv4_mpt1-32_kn"
    assert copy == packaged  # the copy and its base file make the same config
    capsys.readouterr()
    configs("copy", CONFIG, target, cwd=tmp_path)  # the same content again: nothing to refuse
    assert capsys.readouterr().out.split() == ["unchanged", str(target), "unchanged", str(tmp_path / "_mpt1-32.yaml")]
    with pytest.raises(ConfigError, match="directory .*nowhere does not exist"):
        configs("copy", CONFIG, tmp_path / "nowhere" / "x.yaml", cwd=tmp_path)
    configs("copy", CONFIG, "mine/", cwd=tmp_path)  # README's example: a new directory
    assert (tmp_path / "mine" / "conv4_mpt1-32_kn.yaml").is_file() and (tmp_path / "mine" / "_mpt1-32.yaml").is_file()
