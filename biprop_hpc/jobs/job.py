"""A job: runs + resources + a scheduler, rendered from a template into one script, recorded in a manifest.

Everything of one job lives in its sweep directory `<out>/sweeps/<job name>/`:
  job.sh            the rendered script (re-rendered at every submission)
  manifest.json     runs (index, biprop train arguments, run directory relative to the manifest's
                    directory, swept values) and submissions
                    (time, command, resources, job id of every run submitted)
  logs/             the scheduler's output files, run<index>_job<id>.out
  restarts/         LSF only: how often each job was requeued
  continuations.txt Flux only: "<index> <job id> <ISO time>" of each continuation job
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from biprop_hpc.config import ConfigError
from biprop_hpc.files import replace_atomically
from biprop_hpc.jobs.resources import Resources
from biprop_hpc.jobs.schedulers import Scheduler, index_ranges
from biprop_hpc.jobs.sweep import Run
from biprop_hpc.package_data import packaged_path

# Package data (a wheel holds only biprop_hpc/**); in a clone jobs/*.sh.j2 and env/site.sh link to these files.
TEMPLATES = packaged_path("biprop_hpc.jobs", "templates")
SITE_ENV = packaged_path("biprop_hpc.jobs", "site.sh")
# Version 2 records run directories relative to the manifest's directory, so a sweep moved with its out
# directory (`mv runs /p/runs`) still finds them; version 1 recorded absolute ones, which are read as they are.
MANIFEST_VERSION = 2
READABLE_MANIFEST_VERSIONS = (1, 2)
# Directive values that every directive parser reads as one word without quotes.
BARE_DIRECTIVE = re.compile(r"[A-Za-z0-9_@%+=:,./{}\[\]-]+")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_job_name(runs: list[Run]) -> str:
    """The config's name for one run; for a sweep, `sweep-` and a digest of its runs (the same command, the
    same name, so submitting it again finds its manifest)."""
    if len(runs) == 1:
        return Path(runs[0].args[runs[0].args.index("--config") + 1]).stem
    digest = hashlib.sha1(json.dumps([run.args for run in runs]).encode()).hexdigest()[:8]
    return f"sweep-{digest}"


@dataclass(frozen=True)
class Job:
    scheduler: Scheduler
    name: str
    resources: Resources
    runs: list[Run]
    template: Path
    site_env: Path
    workdir: Path

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"--job-name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if not self.template.is_file():
            raise ConfigError(f"job template {self.template} does not exist")
        if not self.site_env.is_file():
            raise ConfigError(f"site environment {self.site_env} does not exist (--site-env FILE)")

    @property
    def directory(self) -> Path:
        # run_dir is <out>/<config_name>/keep=<k>/<name>: the sweep lives in <out>/sweeps/<job name>.
        return Path(self.runs[0].run_dir).parents[2] / "sweeps" / self.name

    @property
    def script(self) -> Path:
        return self.directory / "job.sh"

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    @property
    def array(self) -> bool:
        return len(self.runs) > 1

    def render(self) -> str:
        environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(self.template.parent)),
                                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                         keep_trailing_newline=True)
        environment.filters["q"] = shell_word
        environment.filters["directive"] = directive_word
        r = self.resources
        try:
            return environment.get_template(self.template.name).render(
                job_name=self.name, created=now(), manifest=self.manifest, script=self.script,
                sweep_dir=self.directory, log_dir=self.directory / "logs", workdir=self.workdir,
                site_env=self.site_env, biprop=shlex.join([sys.executable, "-m", "biprop_hpc"]), r=r,
                time=self.scheduler.time(r.time_seconds), warning=self.scheduler.warning(r.warn_seconds),
                array=self.array, array_spec=index_ranges([run.index for run in self.runs]),
                throttle=f"%{r.max_running}" if r.max_running else "", runs=self.runs)
        except jinja2.TemplateError as error:
            raise ConfigError(f"job template {self.template}: {error}") from None

    def new_manifest(self) -> dict:
        return {"manifest_version": MANIFEST_VERSION, "name": self.name, "scheduler": self.scheduler.name,
                "created": now(), "script": str(self.script), "workdir": str(self.workdir),
                "runs": [{**run.to_dict(), "run_dir": os.path.relpath(run.run_dir, self.directory)}
                         for run in self.runs],
                "submissions": []}

    def existing_manifest(self) -> dict | None:
        """The manifest of an earlier render/submit of this job; ConfigError if it describes another job."""
        if not self.manifest.exists():
            return None
        manifest = read_manifest(self.manifest)
        if manifest["scheduler"] != self.scheduler.name:
            raise ConfigError(f"job {self.name!r} ({self.manifest}) is a {manifest['scheduler']} job; "
                              "give this one another --job-name")
        recorded = [(run["args"], str(recorded_run_dir(run, self.directory))) for run in manifest["runs"]]
        if recorded != [(run.args, run.run_dir) for run in self.runs]:
            raise ConfigError(f"job {self.name!r} ({self.manifest}) has other runs than these; "
                              "give this one another --job-name")
        return manifest

    def write(self, script: str, manifest: dict) -> None:
        (self.directory / "logs").mkdir(parents=True, exist_ok=True)
        replace_atomically(self.script, lambda tmp: tmp.write_text(script))
        self.script.chmod(0o755)
        write_manifest(self.manifest, manifest)

    def submission(self, indices: list[int], job_ids: dict[int, str]) -> dict:
        return {"time": now(), "command": self.command_line(indices), "resources": self.resources.to_dict(),
                "job_ids": {str(index): job_id for index, job_id in job_ids.items()}}

    def command_line(self, indices: list[int]) -> str:
        return self.scheduler.command_line(self.script, self.name, indices if self.array else None,
                                           self.resources.max_running)

    def submit(self, indices: list[int]) -> dict[int, str]:
        return self.scheduler.submit(self.script, self.name, indices if self.array else None,
                                     self.resources.max_running)


def shell_word(value) -> str:
    """`value` quoted for bash (the `q` filter of the templates)."""
    return shlex.quote(_one_line(value))


def directive_word(value) -> str:
    """`value` as one word of an #SBATCH, #BSUB or `# flux:` line (the `directive` filter): bare when it is
    plainly one word, else in double quotes, which all three read alike (sbatch: src/sbatch/opt.c
    _get_argument; flux batch: shlex in flux/job/directives.py; bsub: as in `#BSUB -R "span[hosts=1]"`).
    Quotes and backslashes inside a value are read differently by them, so they are refused."""
    text = _one_line(value)
    if BARE_DIRECTIVE.fullmatch(text):
        return text
    if '"' in text or "\\" in text:
        raise ConfigError(f"{text!r}: a job directive cannot hold a double quote or a backslash; "
                          "use a path (--out) without them")
    return f'"{text}"'


def _one_line(value) -> str:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{text!r}: a line break cannot be written into a job script; use a path (--out) "
                          "and names without one")
    return text


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable job manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") not in READABLE_MANIFEST_VERSIONS:
        raise ConfigError(f"{path}: not a biprop-hpc job manifest (version "
                          f"{' or '.join(map(str, READABLE_MANIFEST_VERSIONS))})")
    return manifest


def recorded_run_dir(run: dict, directory: Path) -> Path:
    """A manifest run's directory: absolute as recorded (version 1), or relative to `directory`, the
    manifest's directory wherever it is now (resolved first, so that `..` climbs out of a symlink's target)."""
    recorded = Path(run["run_dir"])
    if recorded.is_absolute():
        return recorded
    return Path(os.path.normpath(Path(directory).resolve() / recorded))


def write_manifest(path: Path, manifest: dict) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
