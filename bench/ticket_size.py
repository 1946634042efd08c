"""How small a ticket is: bits per BIPROP weight, and ratios to the run's checkpoint and to fp32 weights.

    python bench/ticket_size.py RUN/checkpoints/best.pt [...]     # tickets of real runs' checkpoints
    python bench/ticket_size.py --wrn                              # a randomly initialised WRN-50-2 at keep 0.2

For --wrn the script builds wide_resnet50_2 (ImageNet geometry: 3 x 224 x 224, 1000 classes) at keep ratio 0.2
with random W and scores, writes it as a run's best.pt would be written (model, config and the SGD momentum
of the scores, as after a training step), exports the ticket with the same code as `biprop export`, and
compares the measured size with the size the schema gives: (1 + k) bits per BIPROP weight (mask bits, sign bits
of the kept weights) plus the BN statistics in float32 plus HDF5 headers. Files go to a temporary directory.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from biprop_hpc.config import build_config
from biprop_hpc.ticket import export_ticket, read
from biprop_hpc.train.checkpoint import save_checkpoint
from biprop_hpc.train.loop import make_optimizer, model_from_config


def random_checkpoint(directory: Path, model: str, keep_ratio: float, geometry: tuple) -> Path:
    """A best.pt of a randomly initialised model, as a run writes it (with SGD momentum of the scores)."""
    cfg = build_config(None, {"model": model, "keep_ratio": keep_ratio, "dataset": "imagenet",
                              "weight_init": "sc", "name": "random"})
    torch.manual_seed(0)
    net = model_from_config(cfg, *geometry)
    optimizer = make_optimizer(cfg, net)
    for param in net.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()                       # allocates the momentum buffers; lr 0 leaves the scores as they are
    path = directory / "best.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "state": {"epoch": 1, "step": 0}, "ranks": None, "scaler": None})
    return path


def schema_bytes(path: Path) -> dict:
    """The size the schema gives for a ticket's contents (without HDF5 headers)."""
    ticket = read(path)
    bits = sum(math.ceil(layer.numel / 8) + math.ceil(layer.kept / 8) for layer in ticket.layers)
    floats = sum(v.numel() * v.element_size() for v in ticket.tensors.values())
    return {"bits_bytes": bits, "float_bytes": floats, "headers": path.stat().st_size - bits - floats}


def report(checkpoint: Path, out: Path) -> dict:
    start = time.perf_counter()
    size = export_ticket(checkpoint, out)
    size["export_seconds"] = time.perf_counter() - start
    ticket = read(out)
    size.update(schema_bytes(out), model=ticket.config["model"], keep_ratio=ticket.config["keep_ratio"],
                width_mult=ticket.config["width_mult"])
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--wrn", action="store_true", help="also a random WRN-50-2 at keep 0.2 (about 1 GB of files)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for index, checkpoint in enumerate(args.checkpoints):
            rows.append((str(checkpoint), report(checkpoint, tmp / f"ticket{index}.h5")))
        if args.wrn:
            start = time.perf_counter()
            checkpoint = random_checkpoint(tmp, "wide_resnet50_2", 0.2, (3, 1000, 224))
            print(f"built and saved a random WRN-50-2 checkpoint in {time.perf_counter() - start:.1f} s")
            rows.append(("wide_resnet50_2, random init, keep 0.2", report(checkpoint, tmp / "wrn.h5")))
    print("| checkpoint | model | keep | BIPROP weights | ticket bytes | bits/weight (file) | bits/weight (mask+sign) "
          "| checkpoint bytes | checkpoint / ticket | fp32 weights bytes | fp32 / ticket | HDF5 headers | export s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['model']} (x{r['width_mult']:g}) | {r['keep_ratio']:g} | {r['biprop_weights']:,} | "
              f"{r['ticket_bytes']:,} | {r['bits_per_weight']:.3f} | {r['bits_per_weight_masks_and_signs']:.3f} | "
              f"{r['source_bytes']:,} | {r['ratio_to_source']:.1f} | {r['fp32_weight_bytes']:,} | "
              f"{r['ratio_to_fp32_weights']:.1f} | {r['headers']:,} | {r['export_seconds']:.1f} |")


if __name__ == "__main__":
    main()
