"""Command-line entry points: `biprop train | evaluate | data | jobs | results`. Thin: parse, then call the package.

Exit codes: see biprop_hpc/train/stopping.py (0 done, 1 failed, 2 bad input, 75 checkpointed, 130 Ctrl-C).
Every other command ends on SIGTERM or SIGUSR1 at once, with its worker processes, killed by the signal (exit
status 128 + the signal's number: 143 for SIGTERM); see `_stop_command`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from biprop_hpc.archive.results import add_results_commands
from biprop_hpc.config import ConfigError, add_config_arguments, build_config, unknown_flag_error
from biprop_hpc.data import DatasetMissing
from biprop_hpc.data.check import add_data_commands
from biprop_hpc.dist import init_distributed
from biprop_hpc.jobs import add_jobs_commands
from biprop_hpc.packed.infer import add_infer_command
from biprop_hpc.ticket.commands import add_evaluate_ticket_option, add_ticket_commands, evaluate_command
from biprop_hpc.train.stopping import CHECKPOINTED_EXIT, STOP_SIGNALS, RunCheckpointed, StopRequests

log = logging.getLogger("biprop_hpc")


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
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", allow_abbrev=False, help="search a ticket (or train dense) from a config",
                                description="Run a config; any config key can be overridden as --key-name VALUE.")
    train.add_argument("--config", help="YAML config (see configs/)")
    add_config_arguments(train)

    evaluate = commands.add_parser("evaluate", allow_abbrev=False, help="score a checkpoint on a dataset split")
    evaluate.add_argument("--checkpoint", help="a .pt file from a run's checkpoints/")
    add_evaluate_ticket_option(evaluate)
    evaluate.add_argument("--split", default="test", choices=("test", "val"))
    evaluate.add_argument("--data", default="", help="dataset directory (default: the one the run used)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    add_data_commands(commands)
    add_jobs_commands(commands)
    add_results_commands(commands)
    add_infer_command(commands)
    add_ticket_commands(commands)
    return parser


def _setup_logging(rank: int, size: int) -> None:
    prefix = f"[rank {rank}] " if size > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


def _run(args, ctx, stop: StopRequests) -> dict:
    if hasattr(args, "handler"):  # data, jobs, results: commands that register their own handler
        return args.handler(args)
    if args.command == "train":
        overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        from biprop_hpc.train import train
        return train(build_config(args.config, overrides), ctx, stop)
    return evaluate_command(args, ctx)  # --checkpoint or --ticket


def main(argv: list[str] | None = None) -> int:
    # First of all: a scheduler's warning (SIGUSR1) or SIGTERM arriving during start-up must not kill `train`
    # (it checkpoints on them); every other command is switched to stopping on them once it is known.
    try:
        stop = StopRequests().install()
    except ValueError as error:  # a malformed BIPROP_STOP_AT
        print(f"biprop: error: {error}", file=sys.stderr)
        return 2
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_flag_error(unknown[0]))
    if args.command != "train":
        for signum in STOP_SIGNALS:
            signal.signal(signum, functools.partial(_stop_command, os.getpid()))
        early = stop.reason  # a signal that came during start-up (or train's deadline, which is not ours)
        if early in [signum.name for signum in STOP_SIGNALS]:
            print(f"biprop: stopped by {early}", file=sys.stderr)
            return 128 + signal.Signals[early]
    ctx, rank = None, ""
    try:
        ctx = init_distributed()
        _setup_logging(ctx.rank, ctx.size)
        rank = f"[rank {ctx.rank}] " if ctx.size > 1 else ""
        result = _run(args, ctx, stop)
    except (ConfigError, DatasetMissing, FileNotFoundError, ValueError) as error:
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
