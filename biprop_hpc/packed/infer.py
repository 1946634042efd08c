"""`biprop infer`: evaluate a ticket's MPT-1/1 network with the packed binary engine (or the float one).

    biprop infer --ticket best.ticket.h5 [--data DIR] [--split test] [--engine packed|float] [--threads N]
                 [--batch-size B] [--predictions preds.npy]

The ticket is read with biprop_hpc.ticket (its network: plain layers holding W_eff) and its config gives the
dataset, read through the same pipeline as `biprop evaluate` (build_data) and scored by the same function
(train.evaluate: loss, top-1, top-5 reduced over ranks). `--engine packed` converts the network with
biprop_hpc.packed.pack_model (checked on a probe input: every packed layer sees only +-1 values in the float
network); `--engine float` runs the float network as it is. `--checkpoint` takes a training checkpoint instead
of a ticket. The result line adds the time spent in the network's forward passes, images per second, the
packed and float layers, the bytes of weights each engine holds and the CPU path.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def add_infer_command(commands) -> argparse.ArgumentParser:
    infer = commands.add_parser("infer", allow_abbrev=False,
                                help="evaluate a ticket with the packed binary (bit-popcount) CPU engine",
                                description="Score a ticket's network on its dataset with the packed binary engine "
                                            "(MPT-1/1 layers as XOR/AND-popcount integer arithmetic) or the float "
                                            "network, through the same data pipeline and metrics as biprop evaluate.")
    source = infer.add_mutually_exclusive_group(required=True)
    source.add_argument("--ticket", help="a ticket file (biprop export)")
    source.add_argument("--checkpoint", help="a training checkpoint (.pt) instead of a ticket")
    infer.add_argument("--data", default="", help="dataset directory (default: the one the ticket's run used)")
    infer.add_argument("--split", default="test", choices=("test", "val"))
    infer.add_argument("--engine", default="packed", choices=("packed", "float"))
    infer.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    infer.add_argument("--batch-size", type=int, default=0,
                       help="images per batch (default: the config's eval_batch_size)")
    infer.add_argument("--cpu-path", default="auto", choices=("auto", "avx512", "avx2", "scalar"),
                       help="force a kernel path of the packed engine (default: the best this CPU has)")
    infer.add_argument("--predictions", default="", metavar="FILE",
                       help="write the predicted class of every sample, in the split's order (.npy, one process)")
    infer.set_defaults(handler=run_infer)
    return infer


def _recorder(network: nn.Module) -> nn.Module:
    """`network` in a module that times its forward passes and keeps the predicted classes (a class defined
    here: this module is imported for the command line, which starts without torch)."""
    import torch
    from torch import nn

    class Recorder(nn.Module):
        def __init__(self, network: nn.Module):
            super().__init__()
            self.network = network
            self.seconds = 0.0
            self.predictions: list[torch.Tensor] = []

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            logits = self.network(images)
            self.seconds += time.perf_counter() - start
            self.predictions.append(logits.argmax(dim=1))
            return logits

    return Recorder(network)


def _load(args, ctx):
    """(config, data, float network) of a ticket or a checkpoint, on the CPU."""
    import torch

    from biprop_hpc.config import Config
    from biprop_hpc.data.build import build_data
    device = torch.device("cpu")
    overrides = {"data": args.data} if args.data else {}
    if args.batch_size:
        overrides["eval_batch_size"] = args.batch_size
    if args.ticket:
        from biprop_hpc import ticket as tickets
        record = tickets.read(args.ticket)
        cfg = Config.from_dict({**record.config, **overrides}, origin=str(args.ticket))
        data = build_data(cfg, ctx.rank, ctx.size, device)
        if (data.in_channels, data.num_classes) != (record.in_channels, record.num_classes):
            raise ValueError(f"{args.ticket} is a network for {record.in_channels}-channel inputs and "
                             f"{record.num_classes} classes; the dataset has {data.in_channels} channels and "
                             f"{data.num_classes} classes (--data points at another dataset?)")
        model = tickets.module_from_ticket(record, "cpu")   # the ticket read (and verified) once
    else:
        from pathlib import Path

        from biprop_hpc.packed.convert import dense_ternary
        from biprop_hpc.train.checkpoint import load_checkpoint
        from biprop_hpc.train.loop import model_from_config
        checkpoint = load_checkpoint(Path(args.checkpoint))
        cfg = Config.from_dict({**checkpoint["config"], **overrides}, origin=str(args.checkpoint))
        data = build_data(cfg, ctx.rank, ctx.size, device)
        model = model_from_config(cfg, data.in_channels, data.num_classes, data.image_size)
        model.load_state_dict(checkpoint["model"])
        from biprop_hpc.nn.global_prune import set_run_pruning, trained_epoch
        set_run_pruning(model, cfg, trained_epoch(checkpoint["state"]))  # global pruning: each layer's own count
        model = dense_ternary(model)
    return cfg, data, model.eval().requires_grad_(False)


def weight_bytes(network: nn.Module) -> int:
    from biprop_hpc.packed.convert import model_bytes
    return model_bytes(network)


def run_infer(args) -> dict:
    import torch

    from biprop_hpc.dist import init_distributed
    from biprop_hpc.train.evaluate import evaluate
    ctx = init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    _cfg, data, model = _load(args, ctx)
    result = {"engine": args.engine, "split": args.split, "float_bytes": weight_bytes(model)}
    if args.engine == "packed":
        from biprop_hpc.packed import cpu_path, pack_model, set_cpu_path
        set_cpu_path(args.cpu_path)
        probe = torch.randn(2, data.in_channels, data.image_size, data.image_size,
                            generator=torch.Generator().manual_seed(0))
        network = pack_model(model, example_input=probe)
        del model
        result.update(packed_layers=len(network.packed_layers), float_layers=len(network.float_layers),
                      cpu_path=cpu_path())
    else:
        network = model
    recorder = _recorder(network)
    metrics = evaluate(recorder, getattr(data, args.split), torch.device("cpu"), ctx, contextlib.nullcontext)
    result.update(metrics)
    result.update(weights_bytes=weight_bytes(network), forward_seconds=round(recorder.seconds, 4),
                  images_per_second=round(metrics["count"] / recorder.seconds, 1) if recorder.seconds else None,
                  threads=torch.get_num_threads())
    if args.predictions:
        if ctx.size > 1:
            raise ValueError("--predictions is for one process (each rank sees only its share of the split)")
        import numpy as np
        predictions = torch.cat(recorder.predictions).numpy() if recorder.predictions else np.zeros(0, np.int64)
        np.save(args.predictions, predictions)
        result["predictions"] = args.predictions
    return result
