"""Files that ship inside the package, found through importlib.resources: the paper's configs
(biprop_hpc/configs/<dataset>/<name>.yaml), the job templates (biprop_hpc/jobs/templates/*.sh.j2) and the default
site environment of job scripts (biprop_hpc/jobs/site.sh). A wheel holds only biprop_hpc/**, so they live here.

In a clone the real files live here too, and the paths README uses are relative symlinks to them: configs/ ->
biprop_hpc/configs, jobs/<scheduler>.sh.j2 -> biprop_hpc/jobs/templates/, env/site.sh -> biprop_hpc/jobs/site.sh.
Only standard-library imports: config.py imports this module.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIG_SUFFIX = ".yaml"


def packaged_path(package: str, *parts: str) -> Path:
    """The file-system path of a file or directory inside `package`. pip installs a wheel unpacked, where
    importlib.resources gives a plain path; a zipped package has none, and a job script cannot source a file
    inside a zip, so that case is refused."""
    resource = resources.files(package).joinpath(*parts)
    if not isinstance(resource, Path):
        raise RuntimeError(f"{package} is not installed as files on disk ({resource}): install it with pip")
    return resource


def configs_dir() -> Path:
    return packaged_path("biprop_hpc", "configs")


def config_names(with_bases: bool = False) -> list[str]:
    """Names of the packaged configs, `<dataset>/<stem>` (e.g. `cifar10/conv4_mpt1-32_kn`), sorted. Files whose
    name starts with `_` are `base:` files that other configs build on; they are left out unless asked for."""
    root = configs_dir()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*" + CONFIG_SUFFIX)
                  if with_bases or not path.name.startswith("_"))


def packaged_config(name: str) -> Path | None:
    """The packaged config that `name` names, or None. Accepted forms: `cifar10/conv4_mpt1-32_kn`, with
    `.yaml`, and with a leading `configs/` (the path README shows, relative to a clone)."""
    stem = name.removeprefix("configs/").removesuffix(CONFIG_SUFFIX)
    if stem in config_names(with_bases=True):
        return configs_dir() / (stem + CONFIG_SUFFIX)
    return None


def config_file(given: str | Path) -> str | Path:
    """`--config` as given when that file exists; else the packaged config it names (so README's
    `--config configs/cifar10/...yaml` and `--config cifar10/conv4_mpt1-32_kn` work outside a clone); else as
    given, for the config reader to report as missing."""
    if Path(given).exists():
        return given
    packaged = packaged_config(str(given))
    return str(packaged) if packaged is not None else given
