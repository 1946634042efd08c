"""Robustness evaluation: the corruptions (biprop_hpc/data/corruptions.py), `biprop evaluate --corruptions`
(biprop_hpc/train/robustness.py), the archive's /robustness group and `biprop results`' column.

The corruption parameters are those of Hendrycks & Dietterich's CIFAR-10-C generator
(github.com/hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py); each is checked here against a
computation written independently of the module (statistics of the noise, a direct 2-D convolution, the standard
library's colorsys for HSV, block means for the box resampling).
"""
import argparse
import colorsys
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from biprop_hpc.archive.results import run_id_of
from biprop_hpc.archive.run_archive import read_archive, write_archive
from biprop_hpc.cli import main
from biprop_hpc.config import build_config
from biprop_hpc.data.corruptions import (CORRUPTIONS, corrupt, corrupt_samples, gaussian_blur, pixelate,
                                         sample_generator)
from biprop_hpc.data.datasets import load_splits
from biprop_hpc.dist import Local
from biprop_hpc.train import train
from biprop_hpc.train.robustness import robustness_command
from conftest import write_tiny_dataset

ROOT = Path(__file__).parent.parent
FEW = "gaussian_noise,contrast,pixelate"   # a few corruptions, where all nine are not needed


def grey(value: int, shape=(3, 64, 64)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def smooth_images(count: int, channels: int, seed: int = 1) -> np.ndarray:
    """Natural-looking test images: per-pixel noise smoothed by a 3x3 mean (so blur and pixelation change them
    gradually, as they change photographs)."""
    noise = np.random.default_rng(seed).integers(0, 256, (count, channels, 34, 34)).astype(np.float64)
    smooth = sum(noise[:, :, dy:dy + 32, dx:dx + 32] for dy in range(3) for dx in range(3)) / 9
    return np.rint(smooth).astype(np.uint8)


def corrupted(image: np.ndarray, name: str, severity: int, seed: int = 0, index: int = 0) -> np.ndarray:
    return corrupt(image, name, severity, sample_generator(seed, name, severity, index)).astype(np.float64)


# ------------------------------------------------------------------------------------ each corruption

@pytest.mark.parametrize("severity,std", [(1, 0.04), (5, 0.10)])
def test_gaussian_noise_has_the_cifar10c_standard_deviation(severity, std):
    noise = (corrupted(grey(128), "gaussian_noise", severity) - 128) / 255   # mid grey: no clipping at 4 std
    assert abs(noise.mean()) < 0.005 and noise.std() == pytest.approx(std, rel=0.05)


def test_speckle_and_shot_noise_scale_with_the_pixel_value():
    x = 128 / 255
    speckle = (corrupted(grey(128), "speckle_noise", 5) - 128) / 255
    assert speckle.std() == pytest.approx(0.20 * x, rel=0.05)                # x * N(0, 0.2^2)
    shot = corrupted(grey(128), "shot_noise", 5) / 255                       # Poisson(50 x) / 50
    assert shot.mean() == pytest.approx(x, abs=0.005) and shot.std() == pytest.approx(np.sqrt(x / 50), rel=0.05)


def test_impulse_noise_sets_the_cifar10c_fraction_to_black_or_white():
    out = corrupted(grey(128), "impulse_noise", 5)
    changed = out != 128
    assert changed.mean() == pytest.approx(0.07, rel=0.1)
    assert set(np.unique(out[changed])) == {0.0, 255.0} and (out[changed] == 255).mean() == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("severity,sigma", [(1, 0.4), (5, 1.0)])
def test_gaussian_blur_equals_a_direct_convolution_with_nearest_borders(channels, severity, sigma):
    image = smooth_images(1, channels)[0][:, :12, :12].copy()
    radius = int(4 * sigma + 0.5)  # scipy.ndimage.gaussian_filter's kernel radius at truncate=4 (skimage's call)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    x = image.astype(np.float64) / 255
    expected = np.zeros_like(x)
    for c in range(channels):
        for i in range(12):
            for j in range(12):
                for a, dy in enumerate(offsets):
                    for b, dx in enumerate(offsets):  # mode "nearest": the edge pixel repeats
                        expected[c, i, j] += weights[a, b] * x[c, min(max(i + dy, 0), 11), min(max(j + dx, 0), 11)]
    np.testing.assert_allclose(gaussian_blur(x, sigma, None), expected, rtol=0, atol=1e-12)
    got = corrupted(image, "gaussian_blur", severity)          # the severity's sigma, clipped and rounded
    assert np.abs(got - np.rint(expected * 255)).max() <= 1   # (up to the rounding of a last bit)


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_keeps_each_channels_mean_and_scales_its_spread(channels):
    image = smooth_images(1, channels)[0].astype(np.float64)
    for severity, factor in enumerate((0.75, 0.5, 0.4, 0.3, 0.15), start=1):
        got = corrupted(image.astype(np.uint8), "contrast", severity)
        np.testing.assert_allclose(got.mean(axis=(1, 2)), image.mean(axis=(1, 2)), atol=0.3)   # rounding only
        np.testing.assert_allclose(got.std(axis=(1, 2)), factor * image.std(axis=(1, 2)), atol=0.3)


@pytest.mark.parametrize("channels", [1, 3])
def test_brightness_equals_adding_to_the_hsv_value(channels):
    image = smooth_images(1, channels)[0][:, :8, :8].copy()
    image[:, 0, 0] = 0                                        # a black pixel: hue undefined, it turns grey
    for severity, shift in enumerate((0.05, 0.1, 0.15, 0.2, 0.3), start=1):
        got = corrupted(image, "brightness", severity)
        for i in range(8):
            for j in range(8):
                rgb = image[:, i, j] / 255 if channels == 3 else np.repeat(image[0, i, j] / 255, 3)
                h, s, v = colorsys.rgb_to_hsv(*rgb)
                expected = np.rint(np.array(colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))) * 255)
                assert np.abs(got[:, i, j] - expected[:channels]).max() <= 1, (severity, i, j)


@pytest.mark.parametrize("channels", [1, 3])
def test_pixelate_is_box_down_then_box_up(channels):
    image = smooth_images(1, channels)[0][:, :8, :8].copy()
    got = pixelate(image, 0.5, None).astype(np.float64)   # 8 -> 4 -> 8: each 2x2 block becomes its mean
    blocks = image.astype(np.float64).reshape(channels, 4, 2, 4, 2).mean(axis=(2, 4))
    assert np.abs(got - blocks.repeat(2, axis=1).repeat(2, axis=2)).max() <= 1
    assert corrupt(image, "pixelate", 1, None).shape == image.shape   # int(8 * 0.95) = 7 px, back to 8


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_distance_from_clean_grows_with_severity(name, channels):
    images = smooth_images(24, channels)
    distance = [np.abs(corrupt_samples(images, range(24), name, severity, 0).astype(np.float64) - images).mean()
                for severity in range(1, 6)]
    assert all(np.diff(distance) > 0), distance


def test_corruption_is_deterministic_per_seed_corruption_severity_and_sample():
    images = smooth_images(6, 3)
    whole = corrupt_samples(images, range(6), "gaussian_noise", 3, seed=7)
    assert np.array_equal(whole, corrupt_samples(images, range(6), "gaussian_noise", 3, seed=7))
    # a sample corrupts the same alone, in another batch, at another position: what makes ranks agree
    odd = corrupt_samples(images[1::2], [1, 3, 5], "gaussian_noise", 3, seed=7)
    assert np.array_equal(odd, whole[1::2])
    assert not np.array_equal(whole, corrupt_samples(images, range(6), "gaussian_noise", 3, seed=8))
    assert not np.array_equal(whole, corrupt_samples(images, range(6), "gaussian_noise", 4, seed=7))
    twins = corrupt_samples(np.stack([images[0], images[0]]), [0, 1], "gaussian_noise", 3, seed=7)
    assert not np.array_equal(twins[0], twins[1])                               # each sample its own draws


# ------------------------------------------------------------------------------------ evaluate --corruptions

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch search on the tiny dataset (conftest): its run directory and data."""
    root = tmp_path_factory.mktemp("robust")
    data = write_tiny_dataset(root)
    cfg = build_config(None, {"dataset": "mnist", "data": str(data), "model": "conv2", "width_mult": 0.25,
                              "epochs": 1, "batch_size": 32, "eval_batch_size": 32, "val_fraction": 0.2,
                              "out": str(root / "runs"), "threads": 1, "name": "r"})
    train(cfg, Local())
    return {"dir": cfg.run_dir(), "best": cfg.run_dir() / "checkpoints" / "best.pt", "data": data}


def evaluate_args(checkpoint="", corruptions="generate", **extra) -> argparse.Namespace:
    values = {"checkpoint": str(checkpoint), "ticket": "", "split": "test", "data": "", "device": "cpu",
              "corruptions": str(corruptions), "corruption_names": "", "corruption_seed": 0, "archive": "", **extra}
    return argparse.Namespace(**values)


def cli(*args, ranks: int = 0):
    command = [sys.executable, "-m", "biprop_hpc", *map(str, args)]
    if ranks:
        command = ["mpirun", "--oversubscribe", "-np", str(ranks)] + command
        if os.geteuid() == 0:
            command.insert(1, "--allow-run-as-root")
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def write_cifar_c(directory: Path, images: np.ndarray, labels: np.ndarray, names: list[str], grey_2d: bool,
                  labels_per_image: bool) -> None:
    """Our generated corruptions saved in the CIFAR-10-C layout: 5N x H x W x C (or 5N x H x W), severities
    in order; labels 5N (as the release has them) or N."""
    directory.mkdir()
    for name in names:
        stack = np.concatenate([corrupt_samples(images, range(len(images)), name, s, 0) for s in range(1, 6)])
        stack = stack.transpose(0, 2, 3, 1)
        np.save(directory / f"{name}.npy", stack[..., 0] if grey_2d else stack)
    np.save(directory / "labels.npy", np.tile(labels, 5).astype(np.uint8) if labels_per_image else labels)


def test_generate_scores_every_corruption_and_severity_and_stores_them_in_the_archive(run, tmp_path, capsys):
    before = read_archive(run["dir"] / "archive.h5")
    result = robustness_command(evaluate_args(run["best"]), Local())
    rows = result["rows"]
    assert [(r["corruption"], r["severity"]) for r in rows] == [(n, s) for n in CORRUPTIONS for s in range(1, 6)]
    assert all(row["count"] == 100 for row in rows)                     # the whole test split, each time
    assert result["mean_top1"] == pytest.approx(np.mean([row["top1"] for row in rows]))
    assert result["clean_top1"] == before.final["test_top1"]            # best.pt on the clean test split
    assert result["archive"] == str(run["dir"] / "archive.h5")

    after = read_archive(run["dir"] / "archive.h5")                     # stored; nothing else changed
    assert after.robustness["rows"] == rows and after.robustness["mean_top1"] == result["mean_top1"]
    assert {k: after.robustness[k] for k in ("source", "seed", "clean_top1")} == {
        "source": "generate", "seed": 0, "clean_top1": result["clean_top1"]}
    assert (after.attrs, after.metrics, after.final, after.layers) == (before.attrs, before.metrics, before.final,
                                                                      before.layers)
    copy = tmp_path / "copy.h5"                                         # the record round-trips whole
    write_archive(copy, after)
    assert read_archive(copy).robustness == after.robustness

    assert main(["results", str(run["dir"]), "--format", "json"]) == 0  # the column, and the details in json
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["corruption_top1"] == result["mean_top1"]
    assert shown["robustness"]["corruptions"] == result["corruptions"]
    assert shown["robustness"]["rows"] == rows
    assert main(["results", str(run["dir"]), "--out", str(tmp_path / "summary.h5")]) == 0
    header, _, line = capsys.readouterr().out.splitlines()[:3]
    assert "corrupt top-1" in header and f"{result['mean_top1']:.2f}" in line.split()
    with h5py.File(tmp_path / "summary.h5", "r") as h5:                 # the summary: column and copy
        assert h5["table"]["corruption_top1"][0] == result["mean_top1"]
        copied = h5[f"runs/{run_id_of(run['dir'] / 'archive.h5')}/robustness"]
        assert copied.attrs["mean_top1"] == result["mean_top1"] and len(copied["table"]) == 45
    # grouped (the study's table): the group's mean corruption top-1, in the table and in /groups
    assert main(["results", str(run["dir"]), "--group-by", "keep_ratio", "--format", "md",
                 "--out", str(tmp_path / "grouped.h5")]) == 0
    header, _, line = capsys.readouterr().out.splitlines()[:3]
    column = [cell.strip() for cell in header.split("|")].index("corrupt top-1")
    assert [cell.strip() for cell in line.split("|")][column] == f"{result['mean_top1']:.2f} +- -"
    with h5py.File(tmp_path / "grouped.h5", "r") as h5:
        assert h5["groups"]["corruption_top1"][0] == result["mean_top1"]


@pytest.mark.parametrize("grey_2d,labels_per_image", [(False, True), (True, False)])
def test_a_cifar10c_directory_reads_back_as_the_generated_sets(run, tmp_path, grey_2d, labels_per_image):
    test = load_splits("mnist", str(run["data"])).test
    names = FEW.split(",")
    write_cifar_c(tmp_path / "c", test.images.numpy(), test.labels.numpy(), names, grey_2d, labels_per_image)
    read = robustness_command(evaluate_args(run["best"], tmp_path / "c", archive=""), Local())
    generated = robustness_command(evaluate_args(run["best"], corruption_names=FEW), Local())
    assert [row["corruption"] for row in read["rows"]] == sorted(names * 5)   # every .npy in DIR, by name
    key = lambda row: (row["corruption"], row["severity"])                    # noqa: E731
    assert sorted(read["rows"], key=key) == sorted(generated["rows"], key=key)
    assert read["source"] == str((tmp_path / "c").resolve())


def test_missing_directory_files_are_clear_errors(run, tmp_path):
    test = load_splits("mnist", str(run["data"])).test
    write_cifar_c(tmp_path / "c", test.images.numpy(), test.labels.numpy(), ["contrast"], False, True)
    (tmp_path / "c/labels.npy").unlink()
    done = cli("evaluate", "--checkpoint", run["best"], "--device", "cpu", "--corruptions", tmp_path / "c")
    assert done.returncode == 2 and f"{tmp_path / 'c/labels.npy'} is missing" in done.stderr
    assert "CIFAR-10-C layout" in done.stderr
    np.save(tmp_path / "c/labels.npy", np.tile(test.labels.numpy(), 5))
    done = cli("evaluate", "--checkpoint", run["best"], "--device", "cpu", "--corruptions", tmp_path / "c",
               "--corruption-names", "contrast,fog")
    assert done.returncode == 2 and f"{tmp_path / 'c/fog.npy'} is missing" in done.stderr
    done = cli("evaluate", "--checkpoint", run["best"], "--device", "cpu", "--corruptions", "generate",
               "--corruption-names", "fog")
    assert done.returncode == 2 and "corruption 'fog': unknown; choose from gaussian_noise" in done.stderr


@pytest.mark.parametrize("status", ["running", "checkpointed"])
def test_an_archive_of_a_run_not_ended_is_refused(run, tmp_path, status):
    record = read_archive(run["dir"] / "archive.h5")
    record.attrs["status"], record.robustness = status, {}
    write_archive(tmp_path / "archive.h5", record)
    done = cli("evaluate", "--checkpoint", run["best"], "--device", "cpu", "--corruptions", "generate",
               "--archive", tmp_path / "archive.h5")
    assert done.returncode == 2 and f"the run is {status}" in done.stderr
    with h5py.File(tmp_path / "archive.h5", "r") as h5:
        assert "robustness" not in h5


def test_a_ticket_scores_as_its_checkpoint_and_stores_where_archive_says(run, tmp_path):
    from biprop_hpc.ticket import export_ticket
    ticket = export_ticket(run["best"], tmp_path / "best.ticket.h5")["ticket"]
    record = read_archive(run["dir"] / "archive.h5")
    record.robustness = {}
    write_archive(tmp_path / "archive.h5", record)
    ours = robustness_command(evaluate_args(ticket=str(ticket), corruption_names=FEW,
                                            archive=str(tmp_path / "archive.h5")), Local())
    theirs = robustness_command(evaluate_args(run["best"], corruption_names=FEW), Local())
    assert ours["rows"] == theirs["rows"] and ours["evaluated"] == str(ticket)
    assert read_archive(tmp_path / "archive.h5").robustness["rows"] == ours["rows"]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (env/install.sh installs it)")
def test_two_ranks_count_every_sample_once_and_equal_one_process(run, tmp_path):
    single = robustness_command(evaluate_args(run["best"], corruption_names=FEW, archive=""), Local())
    done = cli("evaluate", "--checkpoint", run["best"], "--device", "cpu", "--corruptions", "generate",
               "--corruption-names", FEW, ranks=2)
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = done.stdout.strip().splitlines()            # rank 0 alone prints the result
    two = json.loads(line)
    assert [row["count"] for row in two["rows"]] == [100] * 15      # N per corruption and severity, not 2N or N/2
    for ours, theirs in zip(two["rows"], single["rows"]):
        assert (ours["corruption"], ours["severity"], ours["top1"], ours["top5"]) == (
            theirs["corruption"], theirs["severity"], theirs["top1"], theirs["top5"])
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert two["mean_top1"] == pytest.approx(single["mean_top1"]) and two["clean_top1"] == single["clean_top1"]
    stored = read_archive(run["dir"] / "archive.h5").robustness            # rank 0 stored the two-rank results
    assert stored["rows"] == two["rows"]


def test_a_colour_directory_reads_back_channel_first_in_severity_order(tmp_path):
    from biprop_hpc.train.robustness import read_severity
    images = smooth_images(4, 3)                          # N x C x H x W
    stack = np.concatenate([images + s for s in range(5)])   # severity s: the images + s - 1
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c/contrast.npy", stack.transpose(0, 2, 3, 1))   # the release's N x H x W x C
    np.save(tmp_path / "c/labels.npy", np.arange(20))
    for severity in range(1, 6):
        split = read_severity(tmp_path / "c", "contrast", severity, in_channels=3, image_size=32)
        assert np.array_equal(split.images.numpy(), images + severity - 1)
        assert split.labels.tolist() == list(range(4 * (severity - 1), 4 * severity))
    with pytest.raises(ValueError, match="the network takes 28x28 with 1"):
        read_severity(tmp_path / "c", "contrast", 1, in_channels=1, image_size=28)


def test_only_in_memory_test_splits_are_corrupted():
    from biprop_hpc.config import ConfigError
    from biprop_hpc.data.build import Data
    from biprop_hpc.train.robustness import check_in_memory
    tree = Data(train=None, val=None, test=object(), in_channels=3, num_classes=2, image_size=8, loader="torch")
    with pytest.raises(ConfigError, match="dataset imagenet is read from an image tree; only the in-memory"):
        check_in_memory(tree, "imagenet")
