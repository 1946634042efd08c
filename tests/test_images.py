"""Image trees through the DALI (CPU mode) and torch loaders, and training runs that read them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biprop_hpc.archive import read_archive
from biprop_hpc.data.batches import TrainPlan, eval_steps
from biprop_hpc.data.images import IMAGENET_MEAN, IMAGENET_STD, DaliLoader, Preprocess, TorchLoader, dali_available
from biprop_hpc.data.tree import BadImage, scan_split
from image_tree import make_image_tree

PREP = Preprocess(crop_size=24, resize_size=28, random_area_min=0.3)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def require_dali():
    if not dali_available():
        pytest.fail("NVIDIA DALI is not installed: bash env/install.sh installs it (pip install nvidia-dali-cuda130)")


@pytest.fixture
def tree(tmp_path):
    make_image_tree(tmp_path, classes=3, per_class={"train": 9, "val": 4, "test": 3})
    return tmp_path


def loaders(images, steps_of_epoch, training, batch):
    return {"dali": DaliLoader(images, steps_of_epoch, training, PREP, CPU, 2, seed=0, cpu_only=True),
            "torch": TorchLoader(images, steps_of_epoch, training, PREP, workers=0, seed=0)}


@pytest.mark.parametrize("training", [True, False])
def test_batches_have_the_right_shape_dtype_range_and_labels(tree, training):
    images = scan_split(tree, "train")
    plan = TrainPlan(len(images), 5, 0, 1, seed=0)
    steps_of_epoch = plan.steps if training else (lambda epoch: eval_steps(len(images), 5, 0, 1))
    lowest = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    highest = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    for name, loader in loaders(images, steps_of_epoch, training, 5).items():
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader) == len(steps_of_epoch(0)), name
        for batch, (index, global_size) in zip(batches, steps_of_epoch(0)):
            assert batch.images.shape == (len(index), 3, 24, 24) and batch.images.dtype == torch.float32, name
            assert lowest - 1e-3 <= batch.images.min() and batch.images.max() <= highest + 1e-3, name
            assert batch.labels.tolist() == [images.labels[i] for i in index], name
            assert batch.global_size == global_size


def test_both_loaders_agree_on_evaluation_preprocessing(tree):
    images = scan_split(tree, "train")
    steps = eval_steps(len(images), 4, 0, 1)
    dali, torch_ = (torch.cat([b.images for b in loader]) for loader in loaders(images, lambda e: steps, False, 4).values())
    per_image = (dali - torch_).abs().mean(dim=(1, 2, 3))
    from PIL import Image
    for path, difference in zip(images.files, per_image):
        # Images of ImageNet-like size (shorter side >= 150, RGB and CMYK JPEGs here) match to decoder
        # rounding; tiny ones (17 to 47 pixels) see the two libraries' resampling filters differ by a few grey
        # levels (0.15 in normalised units is about 9 of 255).
        with Image.open(path) as image:
            limit = 0.01 if min(image.size) >= 150 else 0.15
        assert difference < limit, (path, difference)


def test_dali_follows_the_plan_epoch_after_epoch(tree):
    images = scan_split(tree, "train")
    plan = TrainPlan(len(images), 4, 0, 1, seed=3)
    loader = DaliLoader(images, plan.steps, True, PREP, CPU, 2, seed=0, cpu_only=True)
    for epoch in (2, 3):  # a resumed run starts at a later epoch
        labels = torch.cat([b.labels for b in loader.epoch(epoch)]).tolist()
        assert labels == [images.labels[i] for index in plan.epoch_indices(epoch) for i in index]


@pytest.mark.parametrize("loader", ["dali-cpu", "torch"])
def test_a_corrupt_jpeg_is_named(tree, loader, tmp_path):
    bad = tree / "train" / "class001" / "zz_corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))
    images = scan_split(tree, "train")
    plan = TrainPlan(len(images), 30, 0, 1, seed=0)
    made = loaders(images, plan.steps, True, 30)["dali" if loader == "dali-cpu" else "torch"]
    with pytest.raises(BadImage, match="zz_corrupt.jpg"):
        list(made.epoch(0))


@pytest.mark.parametrize("ranks", [2, 3])
def test_dali_under_mpirun_reads_every_file_once_per_epoch(tmp_path, ranks):
    tree = tmp_path / "tree"
    make_image_tree(tree, classes=3, per_class={"train": 9, "val": 1})  # 27 files: uneven shards, short last step
    worker = Path(__file__).with_name("dist_worker.py")
    done = subprocess.run(["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none", sys.executable,
                           str(worker), "dali", str(tmp_path), str(tree)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **ROOT_MPI})
    assert done.returncode == 0, done.stdout + done.stderr
    results = [torch.load(tmp_path / f"dali_{r}.pt") for r in range(ranks)]
    assert len({r["steps"] for r in results}) == 1
    for epoch in (0, 1):
        seen = []
        for result in results:
            steps = result["epochs"][epoch]
            assert len(steps) == result["steps"]
            for index, labels, size, global_size in steps:
                assert size == len(index) and labels.tolist() == [result["labels"][i] for i in index]
                seen += index.tolist()
        assert sorted(seen) == list(range(27))  # every file once, nothing padded or repeated


ROOT_MPI = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}


def biprop(*args, launcher=(), timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **ROOT_MPI}
    return subprocess.run([*launcher, sys.executable, "-m", "biprop_hpc", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_skipped_files_are_counted_in_the_archive(tree, tmp_path):
    (tree / "val" / "class000" / "notes.txt").write_text("not an image")
    (tree / "train" / "class002" / "truncated.jpg").write_bytes(
        (next((tree / "train" / "class002").glob("*.jpg"))).read_bytes()[:200])
    done = biprop("data", "check", str(tree))
    assert done.returncode == 2 and "truncated.jpg" in done.stderr and "notes.txt" in done.stderr
    assert biprop("data", "check", str(tree), "--skip-bad-images").returncode == 0
    done = biprop("train", "--dataset", "imagefolder", "--data", str(tree), "--loader", "dali-cpu",
                  "--crop-size", "24", "--resize-size", "28", "--model", "conv2", "--width-mult", "0.25",
                  "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    assert "truncated.jpg" in done.stderr  # reported in the log
    record = read_archive(next((tmp_path / "runs").rglob("archive.h5")))
    assert record.attrs["skipped_files"] == 2 and record.attrs["loader"] == "dali-cpu"


def test_two_rank_dali_search_on_the_fashion_mnist_tree(tmp_path, fashion_mnist):
    tree = tmp_path / "fm"
    assert biprop("data", "prepare", "fashion-mnist", "--out", str(tree), "--limit-per-split", "3000").returncode == 0
    mpirun = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"]
    done = biprop("train", "--config", "configs/fashion-mnist/default.yaml", "--data", str(tree), "--loader",
                  "dali-cpu", "--epochs", "2", "--out", str(tmp_path / "runs"), launcher=mpirun)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["test_top1"] >= 60.0, result  # chance is 10%
    archives = list((tmp_path / "runs").rglob("archive.h5"))
    assert len(archives) == 1
    record = read_archive(archives[0])
    assert record.attrs["world_size"] == 2 and record.attrs["loader"] == "dali-cpu"
    assert record.attrs["dali_version"]
