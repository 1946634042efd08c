"""ImageNet-style image trees: <root>/<split>/<class>/<image>, and file lists of them.

A tree has train/ and val/ (ImageNet) and may have test/. When test/ exists it is the test set and val/
chooses checkpoints; otherwise val/ is the test set (as ImageNet's public validation set is used) and a
validation split is held out from train/. A file list (`<root>/filelist/<split>.txt`, lines
"relative/path label", the format DALI's file reader takes) is written by `biprop data check` and, when
present, read instead of walking the tree, which saves minutes per start on a parallel file system.
Files that `biprop data check --skip-bad-images` left out are listed in `<root>/filelist/<split>.skipped.txt`;
a run reports their number in its log and archive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from biprop_hpc.data.readers import DatasetMissing

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "val", "test")


class BadImage(ValueError):
    """An image file that cannot be used; the message names the file."""


@dataclass
class ImageList:
    files: list[Path]
    labels: list[int]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)   # "path: reason" of files skipped on request

    def __len__(self):
        return len(self.files)

    def subset(self, indices) -> "ImageList":
        return ImageList([self.files[i] for i in indices], [self.labels[i] for i in indices], self.classes)


def class_names(root: Path, split: str) -> list[str]:
    directory = Path(root) / split
    if not directory.is_dir():
        raise DatasetMissing(f"split {split!r} missing: {directory} is not a directory (an image tree has "
                             "train/ and val/, optionally test/, each with one folder per class)")
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


def scan_split(root: Path, split: str, classes: list[str] | None = None, skip_bad: bool = False) -> ImageList:
    """Walk <root>/<split>; every class folder must hold images; `classes` fixes the label order."""
    root = Path(root)
    found = class_names(root, split)
    classes = classes or found
    if found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise BadImage(f"{root / split}: class folders differ from train/'s (missing {missing}, extra {extra})")
    if not classes:
        raise BadImage(f"{root / split} has no class folders")
    files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        count = 0
        for path in sorted((root / split / name).iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                problem = f"{path}: not an image file (expected {', '.join(sorted(IMAGE_EXTENSIONS))})"
                if not skip_bad:
                    raise BadImage(problem + "; remove it, or pass --skip-bad-images to skip such files")
                skipped.append(problem)
                continue
            files.append(path)
            labels.append(label)
            count += 1
        if count == 0:
            raise BadImage(f"{root / split / name}: empty class folder; remove it from every split or add images")
    return ImageList(files, labels, classes, skipped)


def file_list_path(root: Path, split: str) -> Path:
    return Path(root) / "filelist" / f"{split}.txt"


def skipped_path(root: Path, split: str) -> Path:
    return Path(root) / "filelist" / f"{split}.skipped.txt"


def write_file_list(root: Path, split: str, images: ImageList) -> Path:
    """The split's file list, its classes, and the files left out of it (one "path: reason" a line)."""
    path = file_list_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "classes.txt").write_text("".join(f"{name}\n" for name in images.classes))
    skipped_path(root, split).write_text("".join(f"{problem}\n" for problem in images.skipped))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{f.relative_to(root / split)} {label}\n" for f, label in zip(images.files, images.labels)))
    tmp.replace(path)
    return path


def read_file_list(root: Path, split: str) -> ImageList:
    path = file_list_path(root, split)
    classes = (path.parent / "classes.txt").read_text().split()
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        relative, _, label = line.rpartition(" ")
        if not relative or not label.isdigit() or int(label) >= len(classes):
            raise BadImage(f"{path}:{number}: expected 'relative/path label', got {line!r}")
        files.append(Path(root) / split / relative)
        labels.append(int(label))
    skipped = skipped_path(root, split)
    return ImageList(files, labels, classes, skipped.read_text().splitlines() if skipped.is_file() else [])


def load_split(root: Path, split: str, classes: list[str] | None = None, skip_bad: bool = False) -> ImageList:
    """The file list when `biprop data check` wrote one, else a walk of the tree."""
    if file_list_path(root, split).is_file():
        return read_file_list(root, split)
    return scan_split(root, split, classes, skip_bad)
