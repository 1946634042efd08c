"""`biprop evaluate --corruptions generate|DIR`: a checkpoint's or ticket's accuracy on corrupted test sets.

    biprop evaluate --checkpoint RUN/checkpoints/best.pt --corruptions generate [--corruption-names a,b]
                    [--corruption-seed N] [--archive FILE]
    biprop evaluate --ticket best.ticket.h5 --corruptions CIFAR-10-C/ --archive RUN/archive.h5

`generate` corrupts the dataset's test split on the fly (biprop_hpc/data/corruptions.py: nine corruptions x five
severities, each sample's draws keyed by (seed, corruption, severity, sample), so the ranks and every run see the
same images). DIR reads a prepared directory in the CIFAR-10-C layout (Hendrycks & Dietterich's release):

    DIR/<corruption>.npy   uint8, 5N x H x W x C (C = 1 or 3) or 5N x H x W (grey): the N test images
                           corrupted at severity 1, then the same N at severity 2, ... 5
    DIR/labels.npy         integer labels: 5N (one per image, as CIFAR-10-C has them) or N (the same for
                           every severity)

Every `<corruption>.npy` in DIR is scored (or those --corruption-names lists); the test split's normalisation
is applied as for clean images. Only the in-memory datasets (mnist, fashion-mnist, cifar10) can be corrupted.

Each rank scores its share of each (corruption, severity) set (samples r, r + world, ...) and the sums are
reduced over ranks (train/evaluate.py), so every sample counts once; `count` in the result says how many.
Rank 0 stores the results as the run archive's /robustness group (archive/run_archive.py): the archive beside
checkpoints/ for --checkpoint, the one --archive names otherwise; rewritten atomically (a copy with the group
replaced, renamed over the archive), so nothing else in the archive changes.
"""
from __future__ import annotations

import logging
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch

from biprop_hpc.archive.run_archive import corruption_means, read_archive, write_robustness
from biprop_hpc.config import ConfigError
from biprop_hpc.data.batches import Batch, EvalBatches, eval_steps, normalise
from biprop_hpc.data.corruptions import CORRUPTIONS, SEVERITIES, check_names, corrupt_samples
from biprop_hpc.data.datasets import DatasetInfo, Split
from biprop_hpc.files import replace_atomically
from biprop_hpc.train.evaluate import evaluate

log = logging.getLogger("biprop_hpc")

GENERATE = "generate"
LABELS_FILE = "labels.npy"
LAYOUT = ("the CIFAR-10-C layout: DIR/<corruption>.npy (uint8, 5N x H x W x C or 5N x H x W, severities 1..5 "
          "in order) and DIR/labels.npy (5N or N labels)")
ENDED = ("completed", "failed", "interrupted")   # a run in another state still rewrites its archive


class CorruptedBatches:
    """This rank's share of the test split with one corruption at one severity, corrupted batch by batch."""

    def __init__(self, split: Split, info: DatasetInfo, batch_size: int, rank: int, world_size: int, name: str,
                 severity: int, seed: int):
        self.split, self.info, self.name, self.severity, self.seed = split, info, name, severity, seed
        self.steps = eval_steps(len(split), batch_size, rank, world_size)

    def __iter__(self):
        for index, total in self.steps:
            images = corrupt_samples(self.split.images[index].numpy(), index.tolist(), self.name, self.severity,
                                     self.seed)
            yield Batch(normalise(torch.from_numpy(images), self.info), self.split.labels[index], total)


def names_in(directory: Path, requested: list[str] | None) -> list[str]:
    """The corruptions DIR holds (or `requested`); FileNotFoundError naming the first missing file."""
    if not directory.is_dir():
        raise FileNotFoundError(f"--corruptions {directory}: no such directory; give `generate` or a directory in "
                                f"{LAYOUT}")
    if not (directory / LABELS_FILE).is_file():
        raise FileNotFoundError(f"--corruptions {directory}: {directory / LABELS_FILE} is missing; the directory "
                                f"must be in {LAYOUT}")
    names = requested or sorted(p.stem for p in directory.glob("*.npy") if p.name != LABELS_FILE)
    if not names:
        raise FileNotFoundError(f"--corruptions {directory}: no <corruption>.npy beside labels.npy; the directory "
                                f"must be in {LAYOUT}")
    for name in names:
        if not (directory / f"{name}.npy").is_file():
            raise FileNotFoundError(f"--corruptions {directory}: {directory / (name + '.npy')} is missing (named "
                                    f"by --corruption-names); leave it out, or add the file in {LAYOUT}")
    return names


def read_severity(directory: Path, name: str, severity: int, in_channels: int, image_size: int) -> Split:
    """One severity's N images (N x C x H x W uint8) and labels from a CIFAR-10-C style directory."""
    path = directory / f"{name}.npy"
    images = np.load(path, mmap_mode="r")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] % SEVERITIES:
        raise ValueError(f"{path}: {images.dtype} {tuple(images.shape)} is not uint8 5N x H x W [x C] images "
                         f"(N per severity, {SEVERITIES} severities); expected {LAYOUT}")
    if images.shape[1:] != (image_size, image_size, in_channels):
        raise ValueError(f"{path}: images of {images.shape[1]}x{images.shape[2]} with {images.shape[3]} channels; "
                         f"the network takes {image_size}x{image_size} with {in_channels} (another dataset's "
                         "corruptions?)")
    count = images.shape[0] // SEVERITIES
    labels = np.load(directory / LABELS_FILE, mmap_mode="r")
    if labels.ndim != 1 or len(labels) not in (count, SEVERITIES * count):
        raise ValueError(f"{directory / LABELS_FILE}: {len(labels)} labels for {name}.npy's {count} images per "
                         f"severity; expected {SEVERITIES * count} (one per image) or {count}")
    rows = slice((severity - 1) * count, severity * count)
    block = labels[rows] if len(labels) > count else labels
    return Split(torch.from_numpy(np.ascontiguousarray(images[rows]).transpose(0, 3, 1, 2).copy()),
                 torch.from_numpy(np.array(block, dtype=np.int64)))


def check_in_memory(data, dataset: str) -> None:
    """Only a test split held in memory (EvalBatches) is corrupted: an image tree is decoded by its loader."""
    if not isinstance(data.test, EvalBatches):
        raise ConfigError(f"--corruptions: dataset {dataset} is read from an image tree; only the in-memory "
                          "datasets (mnist, fashion-mnist, cifar10) can be corrupted")


def run_archive_of(args) -> Path | None:
    """The archive to store the results in: --archive, else RUN/archive.h5 beside --checkpoint's
    checkpoints/ (None when there is none: the results are printed only)."""
    if getattr(args, "archive", ""):
        return Path(args.archive)
    if args.checkpoint:
        checkpoint = Path(args.checkpoint).resolve()
        beside = checkpoint.parent.parent / "archive.h5"
        if checkpoint.parent.name == "checkpoints" and beside.is_file():
            return beside
    return None


def check_archive(path: Path) -> None:
    """A run archive this evaluation may add to: one that exists, reads, and whose run has ended."""
    if not path.is_file():
        raise FileNotFoundError(f"--archive {path}: no such file; give a run's archive.h5, or leave --archive out "
                                "to print the results only")
    status = read_archive(path).attrs.get("status")
    if status not in ENDED:
        raise ValueError(f"{path}: the run is {status}, and its next write of the archive would drop these "
                         "results; evaluate after it has ended, or leave --archive out (print only)")


def store_robustness(path: Path, robustness: dict) -> None:
    """The archive with its /robustness group replaced, everything else as it was; atomically."""
    def write(tmp: Path) -> None:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a", locking=False) as h5:
            write_robustness(h5, robustness)
    replace_atomically(path, write)


def corrupted_sets(source: str, names: list[str], data, cfg, seed: int, rank: int, size: int):
    """(name, severity, this rank's batches) for every corruption and severity."""
    if source == GENERATE:
        test = data.test
        for name in names:
            for severity in range(1, SEVERITIES + 1):
                yield name, severity, CorruptedBatches(test.split, test.info, cfg.eval_batch_size, rank, size, name,
                                                       severity, seed)
        return
    for name in names:
        for severity in range(1, SEVERITIES + 1):
            split = read_severity(Path(source), name, severity, data.in_channels, data.image_size)
            yield name, severity, EvalBatches(split, data.test.info, cfg.eval_batch_size, rank, size)


def robustness_command(args, ctx) -> dict:
    """`biprop evaluate --corruptions ...`: score, store (rank 0), return the results."""
    from biprop_hpc.ticket.commands import evaluate_ticket
    from biprop_hpc.train.loop import _on_root, autocast_for, evaluate_checkpoint
    if args.split != "test":
        raise ConfigError("--corruptions scores corrupted copies of the test split; leave out --split")
    source = args.corruptions
    requested = [name.strip() for name in (args.corruption_names or "").split(",") if name.strip()] or None
    evaluated = args.ticket or args.checkpoint

    def plan(data, cfg) -> tuple[list[str], str]:
        """Rank 0's check of every input: the names to score and the archive to store in ("" for none)."""
        check_in_memory(data, cfg.dataset)
        if args.corruption_seed < 0:
            raise ConfigError(f"--corruption-seed {args.corruption_seed}: must be 0 or more")
        if source == GENERATE:
            names = check_names(requested or list(CORRUPTIONS))
        else:
            names = names_in(Path(source), requested)
            for name in names:  # every file's layout, before the first is scored
                read_severity(Path(source), name, 1, data.in_channels, data.image_size)
        archive = run_archive_of(args)
        if archive is not None:
            check_archive(archive)
        return names, str(archive or "")

    def scorer(model, data, cfg, target) -> dict:
        names, archive = _on_root(ctx, "corruption_plan", lambda: plan(data, cfg))
        autocast = autocast_for(cfg, target)
        clean = evaluate(model, data.test, target, ctx, autocast)
        rows = []
        for name, severity, batches in corrupted_sets(source, names, data, cfg, args.corruption_seed, ctx.rank,
                                                      ctx.size):
            metrics = evaluate(model, batches, target, ctx, autocast)
            rows.append({"corruption": name, "severity": severity, "top1": metrics["top1"], "top5": metrics["top5"],
                         "loss": metrics["loss"], "count": metrics["count"]})
            if severity == SEVERITIES and ctx.rank == 0:
                log.info("%-18s top-1 by severity: %s", name, " ".join(f"{row['top1']:6.2f}" for row in rows[-5:]))
        robustness = {"source": source if source == GENERATE else str(Path(source).resolve()),
                      "seed": args.corruption_seed, "evaluated": str(evaluated),
                      "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "clean_top1": clean["top1"],
                      "mean_top1": math.fsum(row["top1"] for row in rows) / len(rows), "rows": rows}
        if ctx.rank == 0:
            log.info("clean top-1 %.2f, mean corruption top-1 %.2f", clean["top1"], robustness["mean_top1"])
            if archive:
                store_robustness(Path(archive), robustness)
                log.info("stored in %s (/robustness)", archive)
            else:
                log.warning("no run archive to store the results in (--archive FILE names one): printed only")
        return {**robustness, "corruptions": corruption_means(rows), "archive": archive or None}

    if args.ticket:
        return evaluate_ticket(args.ticket, "test", ctx, args.data, args.device, scorer=scorer)
    return evaluate_checkpoint(args.checkpoint, "test", ctx, args.data, args.device, scorer=scorer)
