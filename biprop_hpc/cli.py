"""Command-line entry points: `biprop train | evaluate | data | jobs | results`. Thin: parse, then call the package.

Exit codes: see biprop_hpc/train/stopping.py (0 done, 1 failed, 2 bad input, 75 checkpointed, 130 Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from biprop_hpc.archive.results import add_results_commands
from biprop_hpc.config import ConfigError, add_config_arguments, build_config, unknown_flag_error
from biprop_hpc.data import DatasetMissing
from biprop_hpc.data.check import add_data_commands
from biprop_hpc.dist import init_distributed
from biprop_hpc.jobs import add_jobs_commands
from biprop_hpc.packed.infer import add_infer_command
from biprop_hpc.ticket.commands import add_evaluate_ticket_option, add_ticket_commands, evaluate_command
from biprop_hpc.train.stopping import CHECKPOINTED_EXIT, RunCheckpointed, StopRequests

log = logging.getLogger("biprop_hpc")


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
    # First of all: a scheduler's warning (SIGUSR1) or SIGTERM arriving during start-up must not kill us.
    stop = StopRequests().install()
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_flag_error(unknown[0]))
    ctx = init_distributed()
    _setup_logging(ctx.rank, ctx.size)
    rank = f"[rank {ctx.rank}] " if ctx.size > 1 else ""
    try:
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
        log.exception("rank %d of %d failed; the launcher ends the job", ctx.rank, ctx.size)
        return 1
    if ctx.rank == 0 and result is not None:  # the result as one JSON line, for scripts
        print(json.dumps(result, sort_keys=True))
    return 0
