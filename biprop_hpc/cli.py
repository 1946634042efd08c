"""Command-line entry points: `biprop train`, `biprop evaluate`, `biprop data`. Thin: parse, then call the package."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

log = logging.getLogger("biprop_hpc")
from biprop_hpc.config import ConfigError, add_config_arguments, build_config, unknown_flag_error
from biprop_hpc.data import DatasetMissing
from biprop_hpc.data.check import add_data_commands
from biprop_hpc.dist import init_distributed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biprop", allow_abbrev=False,
                                     description="Find Multi-Prize Tickets (BIPROP) in random networks.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", allow_abbrev=False, help="search a ticket (or train dense) from a config",
                                description="Run a config; any config key can be overridden as --key-name VALUE.")
    train.add_argument("--config", help="YAML config (see configs/)")
    add_config_arguments(train)

    evaluate = commands.add_parser("evaluate", allow_abbrev=False, help="score a checkpoint on a dataset split")
    evaluate.add_argument("--checkpoint", required=True, help="a .pt file from a run's checkpoints/")
    evaluate.add_argument("--split", default="test", choices=("test", "val"))
    evaluate.add_argument("--data", default="", help="dataset directory (default: the one the run used)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    add_data_commands(commands)
    return parser


def _setup_logging(rank: int, size: int) -> None:
    prefix = f"[rank {rank}] " if size > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


def _run(args, ctx) -> dict:
    if args.command == "data":
        return args.handler(args)
    if args.command == "train":
        overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        from biprop_hpc.train import train
        return train(build_config(args.config, overrides), ctx)
    from biprop_hpc.train import evaluate_checkpoint
    return evaluate_checkpoint(args.checkpoint, args.split, ctx, args.data, args.device)


def _interrupt(signum, frame):
    # A scheduler's SIGTERM (time limit, scancel) ends the run like Ctrl-C: the archive says "interrupted"
    # and the last checkpoint stays, so `--resume auto` continues it.
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_flag_error(unknown[0]))
    ctx = init_distributed()
    _setup_logging(ctx.rank, ctx.size)
    rank = f"[rank {ctx.rank}] " if ctx.size > 1 else ""
    try:
        result = _run(args, ctx)
    except (ConfigError, DatasetMissing, FileNotFoundError, ValueError) as error:
        print(f"{rank}biprop: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as reason:
        log.warning("%sinterrupted (%s); continue with --resume auto", rank, reason or "Ctrl-C")
        return 130
    except Exception:
        # Under a launcher a non-zero exit makes it stop every other rank; say which rank failed first.
        log.exception("rank %d of %d failed; the launcher ends the job", ctx.rank, ctx.size)
        return 1
    if ctx.rank == 0:
        print(json.dumps(result, sort_keys=True))
    return 0
