# PYTHON_ARGCOMPLETE_OK  (argcomplete completes `biprop` in a shell only if this marker is near the top)
"""Command-line entry points: `biprop train | evaluate | data | jobs | results`. Thin: parse, then call the package.

Exit codes: see biprop_hpc/train/stopping.py (0 done, 1 failed, 2 bad input, 75 checkpointed, 124 hung,
130 Ctrl-C).
Every other command ends on SIGTERM or SIGUSR1 at once, with its worker processes, killed by the signal (exit
status 128 + the signal's number: 143 for SIGTERM); see `_stop_command`.

Building the parser imports no torch: `biprop --help` and shell completion start at once. Each command imports
what it needs when it runs.

Under a launcher (mpirun, srun) an error common to all ranks (a command-line error; a bad config, which rank 0
builds and broadcasts; an error rank 0 broadcast: config.CommonError) is printed by rank 0 alone; any other
error by the rank that has it, with "[rank R]" in front.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import biprop_hpc
from biprop_hpc.archive.results import add_results_commands
from biprop_hpc.config import (CommonError, Config, ConfigError, add_config_arguments, build_config, config_yaml,
                               unknown_flag_error)
from biprop_hpc.configs_command import add_configs_commands
from biprop_hpc.data.check import add_data_commands
from biprop_hpc.jobs import add_jobs_commands
from biprop_hpc.packed.infer import add_infer_command
from biprop_hpc.ticket.commands import add_evaluate_ticket_option, add_ticket_commands, evaluate_command
from biprop_hpc.train.stopping import CHECKPOINTED_EXIT, STOP_SIGNALS, RunCheckpointed, StopRequests

log = logging.getLogger("biprop_hpc")

# Launchers' variables holding a process's rank (the launchers of dist.LAUNCHER_SIZE_VARS), known before Horovod
# starts: a command-line error is the same on every rank, and only rank 0 prints it.
LAUNCHER_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "JSM_NAMESPACE_RANK", "SLURM_PROCID", "PMI_RANK",
                      "PMIX_RANK")


def _launcher_rank(environ=os.environ) -> int:
    """This process's rank as its launcher says (0 without a launcher)."""
    return next((int(environ[v]) for v in LAUNCHER_RANK_VARS if environ.get(v, "").isdigit()), 0)


def _child_processes() -> list[int]:
    """This process's children: on Linux all of them (/proc/self/task/TID/children, proc(5)), elsewhere
    those that multiprocessing started."""
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return [child.pid for child in multiprocessing.active_children()]
    children = []
    for thread in threads:
        with contextlib.suppress(OSError):
            children += map(int, Path(f"/proc/self/task/{thread}/children").read_text().split())
    return children


def _stop_command(owner_pid: int, signum: int, frame) -> None:
    """SIGTERM/SIGUSR1 handler of every command but train: end the command's child processes, then the command
    by the signal's default action (killed by the signal: exit status 128 + signum, 143 for SIGTERM).

    The default action alone would leave children behind: `data prepare`'s and `data check`'s process-pool
    workers would wait forever for work from a parent that is gone, and `jobs status`'s scheduler query would
    run on. Forked workers inherit this handler and end the same way. The command is not unwound by an
    exception: raised from a signal handler it can land anywhere (a weakref callback swallows it, an h5py
    callback turns it into a SystemError), and shutting down an interpreter that has torch loaded takes
    seconds. So a temporary file (files.replace_atomically's, `data prepare`'s partial tree) may stay, hidden
    beside the output; the outputs themselves are renamed into place whole, never partial.
    """
    if os.getpid() == owner_pid:
        os.write(2, f"biprop: stopped by {signal.Signals(signum).name}\n".encode())
    for child in _child_processes():
        with contextlib.suppress(OSError):
            os.kill(child, signum)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biprop", allow_abbrev=False,
                                     description="Find Multi-Prize Tickets (BIPROP) in random networks.")
    parser.add_argument("--version", action="version", version=f"biprop-hpc {biprop_hpc.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", allow_abbrev=False, help="search a ticket (or train dense) from a config",
                                description="Run a config; any config key can be overridden as --key-name VALUE.")
    train.add_argument("--config", help="YAML config (see configs/)")
    train.add_argument("--print-config", action="store_true",
                       help="print the merged config (defaults < base files < --config < flags) as YAML and exit; "
                            "the printed file, given as --config, runs the same config")
    add_config_arguments(train)

    evaluate = commands.add_parser("evaluate", allow_abbrev=False, help="score a checkpoint on a dataset split")
    evaluate.add_argument("--checkpoint", help="a .pt file from a run's checkpoints/")
    add_evaluate_ticket_option(evaluate)
    evaluate.add_argument("--split", default="test", choices=("test", "val"))
    evaluate.add_argument("--data", default="", help="dataset directory (default: the one the run used)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    # robustness (biprop_hpc/train/robustness.py)
    evaluate.add_argument("--corruptions", default="", metavar="generate|DIR",
                          help="score corrupted copies of the test split: `generate` them (9 corruptions x 5 "
                               "severities), or read DIR in the CIFAR-10-C layout (<corruption>.npy, labels.npy)")
    evaluate.add_argument("--corruption-names", default="", metavar="NAME[,NAME...]",
                          help="only these corruptions (default: all generated, or every .npy in DIR)")
    evaluate.add_argument("--corruption-seed", type=int, default=0, help="seed of the generated corruptions")
    evaluate.add_argument("--archive", default="", help="run archive to store the corruption results in (default: "
                          "the run's archive.h5 beside --checkpoint's checkpoints/)")

    add_data_commands(commands)
    add_jobs_commands(commands)
    add_results_commands(commands)
    add_infer_command(commands)
    add_ticket_commands(commands)
    models = commands.add_parser("models", allow_abbrev=False, help="list the model zoo with parameter counts",
                                 description="Every model --model accepts, the input it is made for, and its "
                                             "parameter counts at width_mult 1 (BIPROP layers: one score per weight).")
    models.set_defaults(handler=_models_command)
    add_configs_commands(commands)
    return parser


def _models_command(args) -> None:
    from biprop_hpc.models.registry import describe_models
    print(describe_models())


def _setup_logging(rank: int, size: int) -> None:
    prefix = f"[rank {rank}] " if size > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


def _run(args, config, ctx, stop: StopRequests) -> dict:
    if hasattr(args, "handler"):  # data, jobs, results: commands that register their own handler
        return args.handler(args)
    if args.command == "train":
        from biprop_hpc.train import train
        from biprop_hpc.train.loop import _on_root
        # Every rank runs rank 0's config; rank 0's error is raised on every rank and reported once.
        return train(_on_root(ctx, "config", lambda: _built(config)), ctx, stop)
    return evaluate_command(args, ctx)  # --checkpoint or --ticket


def _overrides(args) -> dict:
    """`train`'s config flags: {key: value or None}."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "print_config")}


def _train_config(args) -> Config | Exception | None:
    """`train`'s config as this rank builds it, or the error building it (None for other commands). Built before
    Horovod starts, which needs its hang_timeout (dist.horovod_stall_environment); an error is reported after,
    by rank 0 alone (_run)."""
    if args.command != "train":
        return None
    try:
        return build_config(args.config, _overrides(args))
    except (ValueError, OSError) as error:  # ConfigError is a ValueError
        return error


def _built(config: Config | Exception) -> Config:
    if isinstance(config, Exception):
        raise config
    return config


def _hang_timeout(config: Config | Exception | None) -> float:
    """0 (no watchdog) for commands other than train; a config error gives the default, as the run then stops
    on that error anyway."""
    if config is None:
        return 0.0
    return Config.hang_timeout if isinstance(config, Exception) else config.hang_timeout


def main(argv: list[str] | None = None) -> int:
    # First of all: a scheduler's warning (SIGUSR1) or SIGTERM arriving during start-up must not kill `train`
    # (it checkpoints on them); every other command is switched to stopping on them once it is known.
    try:
        stop = StopRequests().install()
    except ValueError as error:  # a malformed BIPROP_STOP_AT
        print(f"biprop: error: {error}", file=sys.stderr)
        return 2
    parser = _parser()
    if "_ARGCOMPLETE" in os.environ:  # a shell asks for completions (README: The command line); answers, exits
        import argcomplete
        argcomplete.autocomplete(parser)
    # Every rank parses the same command line: only rank 0 prints its error.
    with contextlib.redirect_stderr(io.StringIO()) if _launcher_rank() > 0 else contextlib.nullcontext():
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.error(unknown_flag_error(unknown[0]))
    config = _train_config(args)
    if args.command == "train" and args.print_config:
        if isinstance(config, Exception):
            print(f"biprop: error: {config}", file=sys.stderr)
            return 2
        print(config_yaml(config, args.config), end="")
        return 0
    if args.command != "train":
        for signum in STOP_SIGNALS:
            signal.signal(signum, functools.partial(_stop_command, os.getpid()))
        early = stop.reason  # a signal that came during start-up (or train's deadline, which is not ours)
        if early in [signum.name for signum in STOP_SIGNALS]:
            print(f"biprop: stopped by {early}", file=sys.stderr)
            return 128 + signal.Signals[early]
    ctx, rank = None, ""
    try:
        from biprop_hpc.dist import init_distributed
        ctx = init_distributed(_hang_timeout(config))
        _setup_logging(ctx.rank, ctx.size)
        rank = f"[rank {ctx.rank}] " if ctx.size > 1 else ""
        result = _run(args, config, ctx, stop)
    except CommonError as error:  # every rank has it: rank 0 says it, once
        if ctx.rank == 0:
            print(f"biprop: error: {error}", file=sys.stderr, flush=True)
        # the others wait until it is said: their exit makes the launcher end rank 0, maybe before it printed
        ctx.broadcast_object(None, name="common_error_reported")
        return 2
    except (ConfigError, FileNotFoundError, ValueError) as error:  # DatasetMissing is a FileNotFoundError
        print(f"{rank}biprop: error: {error}", file=sys.stderr)
        return 2
    except RunCheckpointed:
        return CHECKPOINTED_EXIT
    except KeyboardInterrupt:
        log.warning("%sinterrupted (Ctrl-C); continue with --resume auto", rank)
        return 130
    except Exception:
        # Under a launcher a non-zero exit makes it stop every other rank; say which rank failed first.
        where = f"rank {ctx.rank} of {ctx.size}" if ctx is not None else "start-up (init_distributed)"
        log.exception("%s failed; the launcher ends the job", where)
        return 1
    if ctx.rank == 0 and result is not None:  # the result as one JSON line, for scripts
        print(json.dumps(result, sort_keys=True))
    return 0
