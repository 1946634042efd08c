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


def test_training_crops_depend_on_seed_epoch_and_sample_only(tree):
    """The same sample gets the same crop and flip whatever the loader, its rank's shard or where a resumed
    epoch starts; the two loaders then see the same pixels up to their resampling filters."""
    from biprop_hpc.data.images import crop_window
    images = scan_split(tree, "train")
    one = TrainPlan(len(images), 6, 0, 1, seed=5)
    two = [TrainPlan(len(images), 3, rank, 2, seed=5) for rank in range(2)]
    made = loaders(images, one.steps, True, 6)
    # Each sample's crop from one process equals the one it gets on its rank under two ranks.
    whole = {int(i): image for b, index in zip(made["dali"].epoch(1), one.epoch_indices(1))
             for i, image in zip(index, b.images)}
    for rank, plan in enumerate(two):
        shard = DaliLoader(images, plan.steps, True, PREP, CPU, 1, seed=0, cpu_only=True)
        for batch, index in zip(shard.epoch(1), plan.epoch_indices(1)):
            for i, image in zip(index.tolist(), batch.images):
                assert torch.equal(image, whole[i]), (rank, i)
    # A run resumed at step 2 of epoch 1 gets the rest of the epoch exactly.
    for name in ("dali", "torch"):
        rest = loaders(images, one.steps, True, 6)[name]
        tail = torch.cat([b.images for b in rest.epoch(1, start=2)])
        full = torch.cat([b.images for b in loaders(images, one.steps, True, 6)[name].epoch(1)])
        assert torch.equal(tail, full[-len(tail):]), name
    # Both loaders cut the same window (compared on the largest images, where resampling differs least).
    torch_batches = torch.cat([b.images for b in made["torch"].epoch(1)])
    dali_batches = torch.cat([whole[int(i)][None] for index in one.epoch_indices(1) for i in index])
    from PIL import Image
    order = [int(i) for index in one.epoch_indices(1) for i in index]
    for position, i in enumerate(order):
        with Image.open(images.files[i]) as image:
            if min(image.size) < 150:
                continue
        difference = (dali_batches[position] - torch_batches[position]).abs().mean()
        assert difference < 0.05, (images.files[i], difference)
    windows = {crop_window(0, epoch, 3, 300, 200, 0.3) for epoch in range(6)}
    assert len(windows) > 1  # epochs differ
    assert crop_window(0, 2, 3, 300, 200, 0.3) == crop_window(0, 2, 3, 300, 200, 0.3)


@pytest.mark.parametrize("loader", ["dali-cpu", "torch"])
def test_an_empty_validation_split_trains_through_both_loaders(tmp_path, loader):
    tree = tmp_path / "tree"
    make_image_tree(tree, classes=3, per_class={"train": 6, "val": 2})  # no test/: val/ is the test set
    done = biprop("train", "--dataset", "imagenet", "--data", str(tree), "--loader", loader, "--val-fraction",
                  "0.01", "--crop-size", "16", "--resize-size", "18", "--model", "conv2", "--width-mult", "0.25",
                  "--epochs", "2", "--batch-size", "4", "--out", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    assert "no validation split" in done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "best_val_top1" not in result and result["best_epoch"] == 2
    record = read_archive(next((tmp_path / "runs").rglob("archive.h5")))
    assert record.attrs["status"] == "completed" and "best_val_top1" not in record.final


def test_two_rank_dali_bn_run_stopped_mid_epoch_resumes_exactly(tmp_path):
    """A BN model read through DALI (CPU) by 2 ranks, stopped mid-epoch and resumed: the same final scores,
    BN statistics and metrics as an uninterrupted 2-rank run."""
    tree = tmp_path / "tree"
    make_image_tree(tree, classes=3, per_class={"train": 12, "val": 3, "test": 3})
    worker = Path(__file__).with_name("dist_worker.py")
    common = ["dataset=imagefolder", "loader=dali-cpu", "loader_workers=1", "crop_size=16", "resize_size=18",
              "random_area_min=0.3", "model=conv2_bin", "width_mult=0.25", "batch_size=3", "epochs=2",
              "eval_batch_size=4"]

    def launch(out, *extra):
        return subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable,
                               str(worker), "train", str(out), str(tree), *common, *extra], capture_output=True,
                              text=True, timeout=300, env={**os.environ, **ROOT_MPI, "OMP_NUM_THREADS": "1"})

    done = launch(tmp_path / "whole")
    assert done.returncode == 0, done.stderr
    done = launch(tmp_path / "split", "stop_at=3:1")
    assert done.returncode == 75, done.stderr
    state = torch.load(next((tmp_path / "split").rglob("last.pt")), weights_only=False)["state"]
    assert (state["epoch"], state["step"]) == (0, 4)
    done = launch(tmp_path / "split", "resume=auto")
    assert done.returncode == 0, done.stderr
    for rank in range(2):
        whole = torch.load(tmp_path / f"whole/model_{rank}.pt")
        resumed = torch.load(tmp_path / f"split/model_{rank}.pt")
        assert any("running_var" in name for name in whole)
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), (rank, name)
    a, b = (read_archive(next((tmp_path / run).rglob("archive.h5"))) for run in ("whole", "split"))
    for name in ("train_loss", "train_top1", "val_loss", "val_top1"):
        assert a.metrics[name] == b.metrics[name], name
    assert a.final == b.final and len(b.restarts) == 1
