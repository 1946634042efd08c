"""`biprop jobs render | submit | status`: batch jobs for SLURM, LSF and Flux, from a config and resources.

    biprop jobs submit --scheduler slurm --config configs/cifar10/conv4_mpt1-32_kn.yaml --data DIR \\
        --nodes 1 --gpus-per-node 4 --cpus-per-task 10 --time 4:00:00 --queue pbatch --account BANK
    biprop jobs submit ... --sweep config='configs/cifar10/conv?_mpt1-*_kn.yaml' --sweep keep_ratio=0.8,0.5
    biprop jobs status [runs/sweeps/NAME]

Resources are data (resources.py), runs are combinations of sweep values (sweep.py), the script comes from a
template in jobs/ (job.py), and what differs between schedulers outside the templates is in schedulers.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from biprop_hpc.config import ALIASES, FIELDS, ConfigError, add_config_arguments
from biprop_hpc.jobs.job import SITE_ENV, TEMPLATES, Job, default_job_name, read_manifest, write_manifest
from biprop_hpc.jobs.resources import TIME_FORMATS, Resources, parse_time
from biprop_hpc.jobs.schedulers import SCHEDULERS, scheduler_named
from biprop_hpc.jobs.status import format_states, run_states
from biprop_hpc.jobs.sweep import config_key, parse_sweeps, plan_runs
from biprop_hpc.package_data import config_file

DEFAULT_SWEEPS = Path("runs") / "sweeps"


def add_jobs_commands(subparsers) -> None:
    """Register `jobs render`, `jobs submit` and `jobs status` on an argparse subparsers object."""
    jobs = subparsers.add_parser("jobs", allow_abbrev=False,
                                 help="write, submit and follow batch jobs (SLURM, LSF, Flux)",
                                 description="Batch jobs from a config and resources: one script per job (a job "
                                             "array for a sweep), a manifest, and the state of every run.")
    commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="{render,submit,status}")
    render = commands.add_parser("render", allow_abbrev=False, help="write the job script and manifest, do not submit",
                                 description="Write <out>/sweeps/<job name>/job.sh and manifest.json.")
    submit = commands.add_parser("submit", allow_abbrev=False, help="write the job script and submit it",
                                 description="Write the script and submit it (sbatch, bsub, flux batch). Submitting "
                                             "the same job again submits only its runs that are not completed, "
                                             "queued or running; they continue from their checkpoints.")
    for parser in (render, submit):
        _job_arguments(parser)
    status = commands.add_parser("status", allow_abbrev=False, help="show the state of every run of a job",
                                 description="Each run's state from its archive and, when it can be asked, the "
                                             "scheduler: queued, running (epoch x/y), completed (test top-1), "
                                             "checkpointed, failed (last log lines); restarts from the archive.")
    status.add_argument("manifests", nargs="*", metavar="MANIFEST",
                        help=f"a manifest.json or its directory (default: every job under {DEFAULT_SWEEPS}/)")
    status.add_argument("--json", action="store_true", help="print the states as JSON instead of a table")
    jobs.set_defaults(handler=run_jobs_command)


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", required=True, metavar="{" + ",".join(SCHEDULERS) + "}")
    parser.add_argument("--config", help="YAML config of the run(s) (or --sweep config=...)")
    resources = parser.add_argument_group("resources (of every run; a sweep is one job array, one run per index)")
    resources.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1)")
    resources.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one rank each (default 1)")
    resources.add_argument("--tasks-per-node", type=int, default=0, metavar="N",
                           help="ranks per node of a CPU-only job (with --gpus-per-node 0)")
    resources.add_argument("--cpus-per-task", type=int, default=1, metavar="N",
                           help="cores per rank (default 1; e.g. 10 on Lassen: 40 cores for 4 GPUs)")
    resources.add_argument("--time", required=True, help=f"time limit per job: {TIME_FORMATS}")
    resources.add_argument("--queue", "--partition", dest="queue", default="", help="queue or partition")
    resources.add_argument("--account", "--bank", dest="account", default="", help="account, LSF group or Flux bank")
    resources.add_argument("--signal-before", default="5m", metavar="TIME",
                           help="the warning signal (USR1: checkpoint, requeue) comes this long before the limit "
                                "(default 5m)")
    resources.add_argument("--max-restarts", type=int, default=3, metavar="N",
                           help="requeues/continuations after a checkpointed stop, per job (default 3)")
    resources.add_argument("--max-running", type=int, default=0, metavar="N",
                           help="at most N runs of a sweep at once (SLURM/LSF array throttle; default: no limit)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="one run per combination of values; repeatable; KEY is any config key or `config` "
                             "(glob patterns allowed: --sweep config='configs/cifar10/conv?_mpt1-*_kn.yaml')")
    parser.add_argument("--job-name", default="", help="job and sweep directory name (default: the config's "
                                                       "name, or sweep-<digest of the runs>)")
    parser.add_argument("--template", default="", metavar="FILE",
                        help="job template (default: the packaged <scheduler>.sh.j2; jobs/ in a clone)")
    parser.add_argument("--site-env", default=str(SITE_ENV), metavar="FILE",
                        help="sourced by the job before training (default: the packaged site.sh; env/site.sh "
                             "in a clone)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script, the manifest and the submit command; write nothing")
    parser.add_argument("--no-check-data", dest="check_data", action="store_false",
                        help="do not check each run's data path before writing or submitting (for a path that "
                             "only the compute nodes see)")
    add_config_arguments(parser)


def run_jobs_command(args) -> dict | None:
    """Run a parsed `jobs ...` command; print what it did. `status --json` returns the states."""
    if args.jobs_command == "status":
        return show_status(args.manifests, args.json)
    job = job_from_args(args)
    (render_job if args.jobs_command == "render" else submit_job)(job, args.dry_run)
    return None


def job_from_args(args) -> Job:
    scheduler = scheduler_named(args.scheduler)
    resources = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                          cpus_per_task=args.cpus_per_task, time_seconds=parse_time(args.time),
                          queue=args.queue, account=args.account,
                          warn_seconds=parse_time(args.signal_before, "--signal-before"),
                          max_restarts=args.max_restarts, max_running=args.max_running)
    given = {config_key(name, "--" + name.replace("_", "-")): getattr(args, name)
             for name in [*FIELDS, *ALIASES] if getattr(args, name, None) is not None}
    runs = plan_runs(args.config and config_file(args.config), given, parse_sweeps(args.sweep),
                     check_data=args.check_data)
    template = Path(args.template) if args.template else TEMPLATES / f"{scheduler.name}.sh.j2"
    return Job(scheduler, args.job_name or default_job_name(runs), resources, runs, template.resolve(),
               Path(args.site_env).resolve(), Path.cwd())


def render_job(job: Job, dry_run: bool) -> None:
    manifest = job.existing_manifest() or job.new_manifest()
    script = job.render()
    everything = [run.index for run in job.runs]
    if dry_run:
        _print_dry_run(job, script, manifest)
        print(f"would submit: {job.command_line(everything)}")
        return
    job.write(script, manifest)
    print(f"{job.name}: {len(job.runs)} run(s)\n  script   {job.script}\n  manifest {job.manifest}\n"
          f"  submit:  {job.command_line(everything)}")


def submit_job(job: Job, dry_run: bool) -> None:
    manifest = job.existing_manifest()
    if manifest is None:
        manifest = job.new_manifest()
        todo = [run.index for run in job.runs]
    else:
        states = run_states(manifest, job.directory, job.scheduler)
        todo = [state.index for state in states if state.state not in ("completed", "queued", "running")]
        if not todo:
            print(f"{job.name}: nothing to submit; its {len(states)} run(s) are completed, queued or running "
                  f"(biprop jobs status {job.directory})")
            return
    script = job.render()
    if dry_run:
        _print_dry_run(job, script, manifest)
        print(f"would submit: {job.command_line(todo)}")
        return
    job.write(script, manifest)
    job_ids = job.submit(todo)
    manifest["submissions"].append(job.submission(todo, job_ids))
    write_manifest(job.manifest, manifest)
    print(f"{job.name}: submitted {len(todo)} of {len(job.runs)} run(s) with {job.command_line(todo)}\n"
          f"  job ids  {' '.join(job_ids.values())}\n  manifest {job.manifest}\n"
          f"  status:  biprop jobs status {job.directory}")


def _print_dry_run(job: Job, script: str, manifest: dict) -> None:
    print(f"==> {job.script} <==\n{script}\n==> {job.manifest} <==\n{json.dumps(manifest, indent=1)}\n")


def show_status(paths: list[str], as_json: bool) -> dict | None:
    manifests = [Path(p) / "manifest.json" if Path(p).is_dir() else Path(p) for p in paths]
    manifests = manifests or sorted(DEFAULT_SWEEPS.glob("*/manifest.json"))
    if not manifests:
        raise ConfigError(f"no job manifest under {DEFAULT_SWEEPS}/; name one: biprop jobs status DIR")
    jobs = []
    for path in manifests:
        manifest = read_manifest(path)
        states = run_states(manifest, path.parent, scheduler_named(manifest["scheduler"]))
        if as_json:
            jobs.append({"manifest": str(path), "name": manifest["name"], "scheduler": manifest["scheduler"],
                         "runs": [state.to_dict() for state in states]})
        else:
            print(format_states(manifest, path, states))
    return {"jobs": jobs} if as_json else None
