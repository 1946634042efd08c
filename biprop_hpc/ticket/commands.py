"""The ticket commands: `biprop export`, `biprop ticket info`, `biprop import-original`, and the work behind
`biprop evaluate --ticket`.

    biprop export --checkpoint RUN/checkpoints/best.pt --out best.ticket.h5           # a ticket (HDF5)
    biprop export --ticket best.ticket.h5 --out best.ternary.pt --format torch        # plain state_dict
    biprop export --checkpoint RUN/checkpoints/best.pt --out best.onnx --format onnx  # ONNX, checked
    biprop ticket info best.ticket.h5
    biprop import-original model_best.pth --model conv4 --out conv4.ticket.h5 [--keep-ratio K]
        [--in-channels C --image-size S --num-classes N] [--width-mult W] [--dataset cifar10 --data DIR]
    biprop evaluate --ticket best.ticket.h5 [--data DIR] [--split test|val] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from biprop_hpc.choices import TICKET_FORMATS
from biprop_hpc.config import Config, ConfigError

# The commands import torch and h5py when they run (below): the command line is built without them.
if TYPE_CHECKING:
    from biprop_hpc.ticket.file import Ticket

log = logging.getLogger("biprop_hpc")


def add_ticket_commands(commands) -> None:
    export = commands.add_parser("export", allow_abbrev=False, help="a run's found ticket as a small file",
                                 description="Write a checkpoint's (or a ticket's) network as a ticket (HDF5: mask "
                                 "bits, sign bits of the kept weights, alpha per layer, BN statistics), a plain "
                                 "PyTorch state_dict of ternary weights, or ONNX.")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run's checkpoint (e.g. RUN/checkpoints/best.pt)")
    source.add_argument("--ticket", help="a ticket file (for --format torch or onnx)")
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument("--format", default="ticket", choices=TICKET_FORMATS)
    export.set_defaults(handler=export_command)

    ticket = commands.add_parser("ticket", allow_abbrev=False, help="inspect a ticket file")
    actions = ticket.add_subparsers(dest="ticket_command", required=True)
    info = actions.add_parser("info", allow_abbrev=False, help="what a ticket holds: model, keep ratio, layers, size")
    info.add_argument("path", metavar="TICKET")
    info.set_defaults(handler=info_command)

    original = commands.add_parser("import-original", allow_abbrev=False,
                                   help="a checkpoint of the original biprop code as a ticket",
                                   description="Read a checkpoint written by the original BIPROP code (LLNL biprop) "
                                   "and write a ticket that computes the same function as the original model.")
    original.add_argument("checkpoint", metavar="CKPT")
    original.add_argument("--model", help="our model name or the original's arch name (default: the checkpoint's "
                          "arch)")
    original.add_argument("--out", required=True, help="the ticket file to write")
    original.add_argument("--keep-ratio", "--prune-rate", dest="keep_ratio", type=float,
                          help="fraction of weights KEPT (the original's prune_rate; default: the checkpoint's)")
    original.add_argument("--in-channels", type=int, help="input channels (default: from the first layer's shape)")
    original.add_argument("--image-size", type=int, help="input size (default: from the first FC layer's shape "
                          "where the network flattens a map; 32 for CIFAR nets, 224 for ImageNet ResNets)")
    original.add_argument("--num-classes", type=int, help="classes (default: from the last layer's shape)")
    original.add_argument("--width-mult", type=float, help="width multiplier (default: from the first layer)")
    original.add_argument("--dataset", help="dataset recorded in the ticket (default: cifar10 or imagenet)")
    original.add_argument("--data", default="", help="dataset directory recorded in the ticket")
    original.set_defaults(handler=import_command)


def export_command(args) -> dict:
    from biprop_hpc.ticket.export import module_from_ticket, sizes, ticket_from_checkpoint
    from biprop_hpc.ticket.file import read, write_ticket
    from biprop_hpc.ticket.formats import export_onnx, export_torch
    fmt = args.format
    if args.checkpoint:
        ticket, _ = ticket_from_checkpoint(args.checkpoint)
    else:
        ticket = read(args.ticket)
    if fmt == "ticket":
        if args.ticket:
            raise ConfigError("--format ticket needs --checkpoint (the input is a ticket already)")
        write_ticket(args.out, ticket)
        result = sizes(args.out, ticket)
        log.info("%s: %s, %d BIPROP weights (%d kept), %.0f bytes: %.3f bits per weight; %.1fx smaller than %s, "
                 "%.1fx smaller than fp32 weights", args.out, ticket.config["model"], result["biprop_weights"],
                 result["kept_weights"], result["ticket_bytes"], result["bits_per_weight"],
                 result.get("ratio_to_source", float("nan")), args.checkpoint, result["ratio_to_fp32_weights"])
        return result
    module = module_from_ticket(ticket)
    result = (export_torch if fmt == "torch" else export_onnx)(module, args.out, ticket)
    log.info("%s: %s network with ternary weights, checked against the ticket's network on a batch of %s: max "
             "difference %.3g", args.out, fmt, "x".join(map(str, result["checked_on"])), result["max_abs_diff"])
    return result


def import_command(args) -> dict:
    from biprop_hpc.ticket.export import module_from_ticket, sizes
    from biprop_hpc.ticket.file import write_ticket
    from biprop_hpc.ticket.original import import_original
    ticket = import_original(args.checkpoint, args.model, keep_ratio=args.keep_ratio, in_channels=args.in_channels,
                             image_size=args.image_size, num_classes=args.num_classes, width_mult=args.width_mult,
                             dataset=args.dataset, data=args.data)
    module_from_ticket(ticket)  # the ticket builds into its network before anything is written
    write_ticket(args.out, ticket)
    result = sizes(args.out, ticket)
    log.info("%s: the original's %s as our %s (keep ratio %g, %d x %dx%d inputs, %d classes), %d BIPROP layers",
             args.out, ticket.attrs.get("original_arch") or "model", ticket.config["model"],
             ticket.config["keep_ratio"], ticket.in_channels, ticket.image_size, ticket.image_size,
             ticket.num_classes, len(ticket.layers))
    return result


def describe(ticket: Ticket, path: str | Path | None = None) -> str:
    """The text `biprop ticket info` prints."""
    from biprop_hpc.nn import BinaryActivation
    from biprop_hpc.ticket.export import build, sizes
    cfg = ticket.config
    net = build(cfg, ticket.in_channels, ticket.num_classes, ticket.image_size, "meta")
    binary = any(isinstance(m, BinaryActivation) for m in net.modules())
    kind = "MPT-1/1 (binary weights and activations)" if binary else "MPT-1/32 (binary weights)"
    bn = "learned affine" if cfg["learn_batchnorm"] else "non-affine"
    data = f" ({cfg['data']})" if cfg["data"] else ""
    lines = [f"ticket      {path}" if path else "ticket",
             f"model       {cfg['model']} (width_mult {cfg['width_mult']:g}), {kind}",
             (f"keep ratio  {cfg['keep_ratio']:g}   first layer {cfg['first_layer']}, last layer "
              f"{cfg['last_layer']}, BN {bn}"),
             (f"input       {ticket.in_channels} x {ticket.image_size} x {ticket.image_size}, "
              f"{ticket.num_classes} classes; dataset {cfg['dataset']}{data}"),
             (f"source      {ticket.attrs.get('source', '?')} {ticket.attrs.get('source_file', '')} (created "
              f"{ticket.attrs.get('created', '?')}, schema version {ticket.attrs.get('schema_version')}, "
              f"{'verified whole (SHA-256)' if ticket.verified else 'UNVERIFIED: no digests, export it again'})"),
             "",
             f"{'layer':<22} {'kind':<7} {'shape':<20} {'weights':>11} {'kept':>11} {'kept %':>7} {'alpha':>12}"]
    for layer in ticket.layers:
        shape = "x".join(map(str, layer.shape))
        lines.append(f"{layer.name:<22} {layer.kind:<7} {shape:<20} {layer.numel:>11,} {layer.kept:>11,} "
                     f"{100 * layer.kept / layer.numel:>6.2f}% {float(layer.alpha):>12.6g}")
    weights, kept = ticket.biprop_weights, ticket.kept_weights
    lines.append(f"{'total':<51} {weights:>11,} {kept:>11,} {100 * kept / max(weights, 1):>6.2f}%")
    others = sum(value.numel() for value in ticket.tensors.values())
    lines.append(f"other state {len(ticket.tensors)} tensors, {others:,} values (BN statistics, affine parameters, "
                 "dense layers)")
    if path is not None:
        size = sizes(path, ticket)
        line = (f"size        {size['ticket_bytes']:,} bytes: {size['bits_per_weight']:.3f} bits per BIPROP weight "
                f"({size['bits_per_weight_masks_and_signs']:.3f} in mask and sign bits); fp32 weights "
                f"{size['fp32_weight_bytes']:,} bytes ({size['ratio_to_fp32_weights']:.1f}x)")
        if "source_bytes" in size:
            line += f"; source {size['source_bytes']:,} bytes ({size['ratio_to_source']:.1f}x)"
        lines.append(line)
    return "\n".join(lines)


def info_command(args) -> None:
    from biprop_hpc.ticket.file import read
    print(describe(read(args.path), args.path))


def evaluate_ticket(path: str, split: str, ctx, data_dir: str = "", device: str = "auto", scorer=None) -> dict:
    """Score a ticket's network (rebuilt from the ticket alone) on its dataset's `split`, metrics reduced over
    ranks: the same numbers as `biprop evaluate --checkpoint` gives for the checkpoint it was exported from.
    Given `scorer`, return scorer(model, data, cfg, device) instead (train/robustness.py)."""
    from biprop_hpc.data.build import build_data
    from biprop_hpc.train.evaluate import evaluate
    from biprop_hpc.ticket.export import first_linear_in, module_from_ticket
    from biprop_hpc.ticket.file import TicketError, read
    from biprop_hpc.train.loop import autocast_for
    ticket = read(path)
    values = {**ticket.config, **({"data": data_dir} if data_dir else {})}
    cfg = Config.from_dict(values, origin=str(path))
    target = ctx.device(device)
    data = build_data(cfg, ctx.rank, ctx.size, target)
    if (data.in_channels, data.num_classes) != (ticket.in_channels, ticket.num_classes):
        raise TicketError(f"{path} is a network for {ticket.in_channels}-channel inputs and {ticket.num_classes} "
                          f"classes; dataset {cfg.dataset} has {data.in_channels} channels and {data.num_classes} "
                          "classes (--data points at another dataset?)")
    # networks that flatten a feature map take one input size; those with global pooling take any
    takes = first_linear_in(cfg, data.in_channels, data.num_classes, data.image_size)
    if data.image_size != ticket.image_size and takes != first_linear_in(cfg, *ticket_geometry(ticket)):
        raise TicketError(f"{path} is a network for {ticket.image_size}x{ticket.image_size} inputs; dataset "
                          f"{cfg.dataset} gives {data.image_size}x{data.image_size} (--data points at another "
                          "dataset?)")
    model = module_from_ticket(ticket, target)
    if scorer is not None:
        return scorer(model, data, cfg, target)
    return evaluate(model, getattr(data, split), target, ctx, autocast_for(cfg, target))


def ticket_geometry(ticket: Ticket) -> tuple[int, int, int]:
    return ticket.in_channels, ticket.num_classes, ticket.image_size


def evaluate_command(args, ctx) -> dict:
    """`biprop evaluate`: --ticket here, --checkpoint as before; exactly one of them."""
    if bool(args.ticket) == bool(args.checkpoint):
        raise ConfigError("evaluate: give either --checkpoint PATH or --ticket PATH")
    if getattr(args, "corruptions", ""):  # the corrupted test sets (README: Robustness to corruptions)
        from biprop_hpc.train.robustness import robustness_command
        return robustness_command(args, ctx)
    if args.ticket:
        return evaluate_ticket(args.ticket, args.split, ctx, args.data, args.device)
    from biprop_hpc.train import evaluate_checkpoint
    return evaluate_checkpoint(args.checkpoint, args.split, ctx, args.data, args.device)


def add_evaluate_ticket_option(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("--ticket", help="a ticket file (biprop export / import-original): evaluate its network")
