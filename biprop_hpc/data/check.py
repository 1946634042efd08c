"""`biprop data check`: validate an image tree (<root>/<split>/<class>/<image>) and write its file lists;
`biprop data prepare`: render a dataset as such a tree.

The check decodes every file fully (Pillow: open + load), so corrupt and truncated images are found
before a run rather than hours into one. Problems are collected and reported together, each naming the
file or folder. With skip_bad, unusable files (not an image, does not decode) are left out of the file
lists and listed in the report instead; structural problems (a missing split, class folders that differ
between splits, a class folder without images) are always errors.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile

from biprop_hpc.data.readers import DatasetMissing
from biprop_hpc.data.tree import (IMAGE_EXTENSIONS, SPLITS, BadImage, ImageList, class_names, file_list_path,
                                  write_file_list)

log = logging.getLogger("biprop_hpc")

REQUIRED_SPLITS = ("train", "val")
DECODABLE_FORMATS = ("JPEG", "PNG")
MAX_SHOWN = 20            # problems shown in an error message; the rest are counted
_INLINE_BELOW = 512       # decode fewer files than this in-process (a pool costs more than it saves)


@dataclass
class CheckReport:
    root: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]            # split -> class -> usable images
    bad: list[str] = field(default_factory=list)  # "path: reason" of files left out (skip_bad)
    file_lists: dict[str, Path] = field(default_factory=dict)   # split -> list written
    seconds: float = 0.0

    def total(self, split: str) -> int:
        return sum(self.counts[split].values())

    def format(self) -> str:
        splits = list(self.counts)
        lines = [f"image tree {self.root}: {len(self.classes)} classes, "
                 + ", ".join(f"{split} {self.total(split)}" for split in splits)
                 + f" images (checked in {self.seconds:.1f}s)"]
        lines.append(f"  {'split':<8}{'images':>10}{'min/class':>11}{'max/class':>11}")
        for split in splits:
            per_class = self.counts[split].values()
            lines.append(f"  {split:<8}{self.total(split):>10}{min(per_class):>11}{max(per_class):>11}")
        if len(self.classes) <= MAX_SHOWN:
            width = max(len("class"), *(len(name) for name in self.classes))
            lines.append(f"  {'class':<{width}}" + "".join(f"{split:>9}" for split in splits))
            for name in self.classes:
                lines.append(f"  {name:<{width}}" + "".join(f"{self.counts[split][name]:>9}" for split in splits))
        if self.bad:
            lines.append(f"  {len(self.bad)} bad file(s) left out:")
            lines.extend(f"    {problem}" for problem in self.bad[:MAX_SHOWN])
            if len(self.bad) > MAX_SHOWN:
                lines.append(f"    ... and {len(self.bad) - MAX_SHOWN} more")
        if self.file_lists:
            lines.append("  file lists: " + ", ".join(str(path) for path in self.file_lists.values()))
        else:
            lines.append("  file lists: not written")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"root": str(self.root), "classes": len(self.classes),
                "images": {split: self.total(split) for split in self.counts},
                "bad_files": len(self.bad), "bad_files_shown": self.bad[:MAX_SHOWN],
                "file_lists": {split: str(path) for split, path in self.file_lists.items()},
                "seconds": round(self.seconds, 2)}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def _strict_truncation() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_problem(path: str) -> str | None:
    """None when `path` decodes fully as a JPEG or PNG, else why not."""
    try:
        with Image.open(path) as image:
            kind = image.format
            image.load()
    except Exception as error:   # UnidentifiedImageError, OSError (truncated), SyntaxError, bombs, ...
        return f"does not decode ({type(error).__name__}: {error})"
    if kind not in DECODABLE_FORMATS:
        return f"is a {kind} image; expected {' or '.join(DECODABLE_FORMATS)}"
    return None


def _decode_all(paths: list[str], workers: int) -> list[str | None]:
    if workers <= 1 or len(paths) < _INLINE_BELOW:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        _strict_truncation()
        try:
            return [decode_problem(path) for path in paths]
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before
    results, last_log, start = [], time.monotonic(), time.monotonic()
    chunksize = max(1, min(1024, len(paths) // (workers * 16)))
    with ProcessPoolExecutor(workers, initializer=_strict_truncation) as pool:
        for result in pool.map(decode_problem, paths, chunksize=chunksize):
            results.append(result)
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                log.info("decoded %d of %d images (%.0f/s)", len(results), len(paths),
                         len(results) / (last_log - start))
    return results


def _raise_problems(root: Path, problems: list[str], hint: str) -> None:
    shown = "\n  ".join(problems[:MAX_SHOWN])
    more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    raise BadImage(f"image tree {root}: {len(problems)} problem(s):\n  {shown}{more}" + (f"\n{hint}" if hint else ""))


def check_tree(root, skip_bad: bool = False, write_lists: bool = True, workers: int = 0) -> CheckReport:
    """Validate the image tree at `root`; write <root>/filelist/<split>.txt of its usable images.

    Raises DatasetMissing when root, train/ or val/ is missing, BadImage listing every problem otherwise.
    workers: decoding processes (0: one per available CPU).
    """
    start = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise DatasetMissing(f"image tree {root} is not a directory (an image tree has train/ and val/, "
                             "optionally test/, each with one folder per class)")
    for split in REQUIRED_SPLITS:
        class_names(root, split)   # DatasetMissing naming the path
    splits = [split for split in SPLITS if (root / split).is_dir()]
    classes = class_names(root, "train")
    structural, file_problems = [], []
    if not classes:
        structural.append(f"{root / 'train'}: no class folders")
    if write_lists:
        structural.extend(f"{root / 'train' / name}: class folder name contains whitespace, which a file list "
                          "cannot hold; rename it in every split" for name in classes if len(name.split()) != 1)
    candidates = {split: [] for split in splits}   # split -> [(path, label)] with an image extension
    entries = {}                                   # (split, class) -> number of entries in the folder
    for split in splits:
        found = class_names(root, split)
        if split != "train" and found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            structural.append(f"{root / split}: class folders differ from {root / 'train'}'s: "
                              f"missing {missing}, extra {extra}")
        for label, name in enumerate(classes):
            folder = root / split / name
            if not folder.is_dir():
                continue
            children = sorted(folder.iterdir())
            entries[split, name] = len(children)
            for path in children:
                if not path.is_file():
                    file_problems.append(f"{path}: not a file (class folders hold images only, no subfolders)")
                elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                    file_problems.append(f"{path}: not an image file (expected "
                                         f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
                else:
                    candidates[split].append((path, label))

    paths = [str(path) for split in splits for path, _ in candidates[split]]
    workers = workers or min(_cpu_count(), 32)
    problems = iter(_decode_all(paths, workers))
    good = {}
    for split in splits:
        good[split] = []
        for path, label in candidates[split]:
            problem = next(problems)
            if problem is None:
                good[split].append((path, label))
            else:
                file_problems.append(f"{path}: {problem}")
    counts = {split: {name: 0 for name in classes} for split in splits}
    for split in splits:
        for _, label in good[split]:
            counts[split][classes[label]] += 1
        for name in classes:
            if (split, name) not in entries or counts[split][name]:
                continue
            folder = root / split / name
            if entries[split, name] == 0:
                structural.append(f"{folder}: empty class folder; add images, or remove the class from every split")
            else:
                structural.append(f"{folder}: no usable image (its {entries[split, name]} file(s) are bad)")

    file_problems.sort()
    if structural or (file_problems and not skip_bad):
        problems_shown = structural + ([] if skip_bad else file_problems)
        hint = "" if skip_bad or not file_problems else \
            "Fix or remove the bad files, or pass --skip-bad-images to leave them out of the file lists."
        _raise_problems(root, problems_shown, hint)

    report = CheckReport(root, classes, counts, file_problems if skip_bad else [])
    if write_lists:
        for split in splits:
            images = ImageList([p for p, _ in good[split]], [label for _, label in good[split]], classes,
                               [problem for problem in report.bad if problem.startswith(f"{root / split}/")])
            report.file_lists[split] = write_file_list(root, split, images)
        for split in SPLITS:   # a list left from a split that is gone would be read by load_split
            if split not in splits:
                file_list_path(root, split).unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register `data prepare fashion-mnist ...` and `data check DIR ...` on an argparse subparsers object."""
    data = subparsers.add_parser("data", allow_abbrev=False, help="prepare and check image-tree datasets",
                                 description="Image trees: <root>/{train,val[,test]}/<class>/<image>.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="{prepare,check}")
    prepare = commands.add_parser("prepare", allow_abbrev=False, help="render a dataset as a JPEG image tree",
                                  description="Render Fashion-MNIST's IDX files as <out>/{train,val,test}/<class>/"
                                              "<index>.jpg, val held out from train as `biprop train` holds it "
                                              "out; then check it and write its file lists.")
    prepare.add_argument("dataset", choices=("fashion-mnist",))
    prepare.add_argument("--out", required=True, metavar="DIR", help="the tree to write (must not exist, or be empty)")
    prepare.add_argument("--source", default="", metavar="DIR",
                         help="directory of the IDX files (default: the dataset's standard directory)")
    prepare.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                         help="fraction of the IDX training set held out as val/ (default: 0.1)")
    prepare.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default: 95)")
    prepare.add_argument("--limit-per-split", type=int, default=0, metavar="N",
                         help="keep the first N images of each split, for quick tests (default: 0, all)")
    prepare.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")

    check = commands.add_parser("check", allow_abbrev=False, help="validate an image tree, write its file lists",
                                description="Decode every image of the tree, report counts per class and split, "
                                            "and write <DIR>/filelist/<split>.txt, which runs read instead of "
                                            "walking the tree.")
    check.add_argument("tree", metavar="DIR", help="the tree's root (holding train/ and val/, optionally test/)")
    check.add_argument("--skip-bad-images", action="store_true",
                       help="leave files that are not images or do not decode out of the file lists, and count them")
    check.add_argument("--no-write-lists", dest="write_lists", action="store_false",
                       help="only check; do not write file lists")
    data.set_defaults(handler=run_data_command)
    return data


def run_data_command(args) -> dict:
    """Run a parsed `data ...` command; print its report; return a JSON-able summary."""
    if args.data_command == "prepare":
        from biprop_hpc.data.prepare import prepare_fashion_mnist_tree
        start = time.perf_counter()
        counts, report = prepare_fashion_mnist_tree(args.out, args.source, args.val_fraction, args.quality,
                                                    args.limit_per_split, args.force)
        print(report.format(), flush=True)
        return {"command": "data prepare", "dataset": args.dataset, "out": str(report.root), "counts": counts,
                "classes": report.classes, "seconds": round(time.perf_counter() - start, 2)}
    if args.data_command == "check":
        report = check_tree(args.tree, skip_bad=args.skip_bad_images, write_lists=args.write_lists)
        print(report.format(), flush=True)
        return {"command": "data check", **report.to_dict()}
    raise ValueError(f"data: unknown command {args.data_command!r}")
