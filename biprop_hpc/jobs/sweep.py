"""Runs of a job: the combinations of `--sweep key=v1,v2,...` values, each a `biprop train` command line
with its own run directory.

A job with one run is a sweep of one combination. Combinations are numbered 1..N in `itertools.product`
order of the sweep options as given; the job script maps an array index to one of them.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

from biprop_hpc.archive import ArchiveError, read_archive
from biprop_hpc.config import (ALIASES, EXECUTION_KEYS, FIELDS, SAFE_NAME, Config, ConfigError, build_config,
                              describe_differences, result_differences)
from biprop_hpc.jobs.checks import check_runs

_TYPES = typing.get_type_hints(Config)
# Keys a job sets itself: every run continues with --resume auto, in the run directory of its config.
NOT_GIVEN_TO_JOBS = {"resume": "jobs always run `biprop train ... --resume auto`",
                     "new_name": "a continued run must find its own directory again",
                     "config_name": "it is the config file's name"}
# Keys that are part of a run directory's path <out>/<config_name>/keep=<k>/<name>/.
PATH_KEYS = ("config", "out", "keep_ratio", "name")


@dataclass(frozen=True)
class Run:
    index: int           # the job array index that picks this run, 1..N
    args: list[str]      # `biprop train` arguments (the script adds --resume auto)
    run_dir: str         # absolute
    values: dict         # this combination's sweep values, as given: key -> string

    @property
    def shell_args(self) -> str:
        return shlex.join(self.args)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_key(name: str, option: str) -> str:
    """`keep-ratio`, `keep_ratio` or an alias (`prune_rate`) -> the config key; ConfigError names bad ones."""
    key = ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
    if key in NOT_GIVEN_TO_JOBS:
        raise ConfigError(f"{option}: {name!r} cannot be set for a job: {NOT_GIVEN_TO_JOBS[key]}")
    if key != "config" and key not in FIELDS:
        raise ConfigError(f"{option}: {name!r} is not a config key (see `biprop train --help`)")
    return key


def parse_sweeps(items: list[str]) -> list[tuple[str, list[str]]]:
    """`["config=a.yaml,b*.yaml", "keep_ratio=0.5,0.2"]` -> [(key, values), ...]; config globs expanded."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        name, sep, text = item.partition("=")
        values = [value.strip() for value in text.split(",")]
        if not sep or not name.strip() or not all(values):
            raise ConfigError(f"--sweep {item!r}: write KEY=V1,V2,... (e.g. --sweep keep_ratio=0.8,0.5,0.2)")
        key = config_key(name.strip(), f"--sweep {item!r}")
        if key in (done for done, _ in axes):
            raise ConfigError(f"--sweep {item!r}: {key} is swept twice; give all its values in one --sweep")
        axes.append((key, config_files(values) if key == "config" else values))
    return axes


def config_files(patterns: list[str]) -> list[str]:
    """Absolute paths of config files; glob patterns expand (sorted), and each must match a file."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ConfigError(f"--sweep config: {pattern!r} matches no config file")
        else:
            matches = [pattern]
        files += [str(Path(match).resolve()) for match in matches if str(Path(match).resolve()) not in files]
    return files


def plan_runs(config: str | None, given: dict, axes: list[tuple[str, list[str]]],
              check_data: bool = True) -> list[Run]:
    """One Run per combination of the sweep values, on top of `config` and the `given` config overrides.

    Every run's config is built and validated as `biprop train` builds it, and checked (checks.py: its model,
    and its data path unless not check_data), so a job that would fail at its start is refused here.

    A run's identity is its directory: every result-changing key given here (fixed or swept) that is not
    part of the path <out>/<config_name>/keep=<k>/<name> is appended to the run's name with its value
    (`seed0_lr=0.01`), so two submissions that differ in such a key never share a directory.
    """
    keys = [key for key, _ in axes]
    combinations = [dict(zip(keys, chosen)) for chosen in itertools.product(*(values for _, values in axes))]
    plans = [(_config_path(config, values), {**given, **_swept(values)}) for values in combinations]
    configs = [_build(path, overrides, index, values, len(plans))
               for index, ((path, overrides), values) in enumerate(zip(plans, combinations), start=1)]
    names = [identifying_name(cfg, overrides) for (_, overrides), cfg in zip(plans, configs)]
    plans = [(path, {**overrides, "name": name} if name != cfg.name else overrides)
             for (path, overrides), cfg, name in zip(plans, configs, names)]
    # Not built again: a name made of a checked name, key names and safe values is a safe name itself.
    configs = [dataclasses.replace(cfg, name=name) for cfg, name in zip(configs, names)]
    directories = [cfg.run_dir() for cfg in configs]
    twice = sorted({str(d) for d in directories if directories.count(d) > 1})
    if twice:
        raise ConfigError(f"these runs would share a run directory: {', '.join(twice)}; "
                          "sweep a key that tells them apart (e.g. seed or name)")
    for cfg in configs:
        refuse_a_directory_with_other_settings(cfg)
    check_runs(configs, [str(d) for d in directories], check_data)
    return [Run(index, _train_args(path, cfg, overrides), str(cfg.run_dir()), values)
            for index, ((path, overrides), cfg, values) in enumerate(zip(plans, configs, combinations), start=1)]


def identifying_name(cfg: Config, overrides: dict) -> str:
    """`cfg.name` with `_key=value` for each result-changing key in `overrides` outside the run's path.

    The seed is part of the default name `seed<N>` already. Values are the validated config values (0.10 and
    0.1 give one name); a value that is not a safe name part (a path, say) is named by a digest of it.
    """
    in_path = set(PATH_KEYS) | set(EXECUTION_KEYS) | ({"seed"} if cfg.name == f"seed{cfg.seed}" else set())
    parts = [cfg.name] + [f"{key}={_name_value(getattr(cfg, key))}" for key in overrides if key not in in_path]
    return "_".join(parts)


def refuse_a_directory_with_other_settings(cfg: Config) -> None:
    """ConfigError if cfg's run directory holds a run with other result-changing settings (its config file
    was edited since, say): caught here, before anything waits in a queue, rather than when the job starts."""
    archive = cfg.run_dir() / "archive.h5"
    try:
        stored = read_archive(archive).config if archive.exists() else None
    except (ArchiveError, ValueError):
        return  # unreadable: the run itself says so when it starts
    differences = result_differences(stored, cfg) if stored else []
    if differences:
        raise ConfigError(f"{cfg.run_dir()} holds a run with other settings ({describe_differences(differences)}); "
                          "give this run another --name, or restore those settings")


def _name_value(value) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = ",".join(_name_value(item) for item in value)
    elif isinstance(value, float):
        text = f"{value:g}" if float(f"{value:g}") == value else repr(value)
    else:
        text = str(value)
    if SAFE_NAME.fullmatch(text):
        return text
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _config_path(config: str | None, values: dict) -> str:
    path = values.get("config") or config
    if not path:
        raise ConfigError("give --config FILE (or --sweep config=FILE,...)")
    return str(Path(path).resolve())


def _swept(values: dict) -> dict:
    """Sweep values as build_config takes them (a list key's value is split on spaces: "30 60")."""
    return {key: value.split() if typing.get_origin(_TYPES[key]) is list else value
            for key, value in values.items() if key != "config"}


def _build(path: str, overrides: dict, index: int, values: dict, count: int) -> Config:
    try:
        cfg = build_config(path, overrides)
    except ConfigError as error:
        if count == 1:
            raise
        swept = ", ".join(f"{key}={value}" for key, value in values.items())
        raise ConfigError(f"run {index} of {count} ({swept}): {error}") from None
    return dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()))


def _train_args(path: str, cfg: Config, overrides: dict) -> list[str]:
    """`--config FILE --out DIR` and every given or swept key, with the config's (validated) value."""
    args = ["--config", path, "--out", cfg.out]
    for key in overrides:
        if key != "out":
            args += flag_args(key, getattr(cfg, key))
    return args


def flag_args(key: str, value) -> list[str]:
    """The `biprop train` flag for one config value: `--keep-ratio 0.5`, `--augment`/`--no-augment`, ..."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return [f"--{flag}" if value else f"--no-{flag}"]
    if isinstance(value, list):
        return [f"--{flag}", *map(str, value)]
    return [f"--{flag}", str(value)]
