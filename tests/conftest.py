import argparse
import contextlib
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def file_hashes(directory: Path) -> dict:
    """Relative path -> SHA-256 of every file under `directory`: to show that a command changed nothing."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def epochs_done(archive: Path) -> int:
    """Epochs an archive records (0 while there is none yet; it is written when the run starts)."""
    from biprop_hpc.archive import ArchiveError, read_archive
    try:
        return len(read_archive(archive).metrics["epoch"]) if archive.exists() else 0
    except ArchiveError:
        return 0


def call_command(add_commands, argv: list, cwd: Path):
    """Run one `biprop` command in-process (no signal handlers, no distributed init) in directory `cwd`:
    `add_commands` registers it (e.g. jobs.add_jobs_commands), `argv` is its command line without `biprop`."""
    parser = argparse.ArgumentParser(prog="biprop")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(map(str, argv)))
    with contextlib.chdir(cwd):
        return args.handler(args)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def write_tiny_dataset(directory: Path) -> Path:
    """A generated 10-class IDX dataset (MNIST layout) of 8x8 images whose class is visible in the pixels."""
    rng = np.random.default_rng(0)

    def make(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 8, 8))
        for i, label in enumerate(labels):  # a bright bar at a class-specific row
            images[i, label % 8, :] = 250 if label < 8 else 120
            images[i, :, label % 8] += 100 if label >= 8 else 0
        return images.clip(0, 255), labels

    train_images, train_labels = make(400)
    test_images, test_labels = make(100)
    write_idx(directory / "train-images-idx3-ubyte", train_images, compress=True)
    write_idx(directory / "train-labels-idx1-ubyte", train_labels, compress=False)
    write_idx(directory / "t10k-images-idx3-ubyte", test_images, compress=False)
    write_idx(directory / "t10k-labels-idx1-ubyte", test_labels, compress=True)
    return directory


@pytest.fixture
def tiny_idx_dir(tmp_path):
    return write_tiny_dataset(tmp_path)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real one-node Slurm cluster (slurm_cluster.py) for the tests of one module."""
    from slurm_cluster import SlurmUnavailable, slurm_cluster
    try:
        with slurm_cluster(tmp_path_factory.mktemp("slurm"), cpus=4) as cluster:
            yield cluster
    except SlurmUnavailable as missing:
        pytest.fail(str(missing))


@pytest.fixture
def fashion_mnist():
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (env/install.sh does it)")
    return FASHION_MNIST
