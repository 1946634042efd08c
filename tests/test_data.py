import numpy as np
import pytest
import torch

from biprop_hpc.data import DatasetMissing, EvalBatches, TrainBatches, load_splits
from biprop_hpc.data.batches import crop_and_flip, global_batch_bounds
from biprop_hpc.data.datasets import DATASETS
from biprop_hpc.data.readers import read_idx
from conftest import write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trip(tmp_path, compress):
    array = np.random.default_rng(1).integers(0, 256, (5, 3, 4))
    write_idx(tmp_path / "x", array, compress)
    path = tmp_path / ("x.gz" if compress else "x")
    np.testing.assert_array_equal(read_idx(path), array)


def test_truncated_idx_is_an_error(tmp_path):
    write_idx(tmp_path / "x", np.zeros((5, 4, 4)), compress=False)
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "x")


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        load_splits("fashion-mnist", str(tmp_path / "absent"))
    with pytest.raises(DatasetMissing, match=r"t10k-images-idx3-ubyte\[\.gz\] not found"):
        (tmp_path / "partial").mkdir()
        write_idx(tmp_path / "partial" / "train-images-idx3-ubyte", np.zeros((4, 2, 2)), True)
        write_idx(tmp_path / "partial" / "train-labels-idx1-ubyte", np.zeros(4), True)
        load_splits("mnist", str(tmp_path / "partial"))
    with pytest.raises(DatasetMissing, match="cifar-10-batches-py"):
        load_splits("cifar10", str(tmp_path / "absent"))
    # no --data and no standard directory: said as such, not "data_batch_1 not found in ." (Path("") is cwd)
    with pytest.raises(DatasetMissing, match="no --data given, and it has no standard directory"):
        load_splits("cifar10", "")


def test_cifar10_reader(tmp_path):
    import pickle
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        expected.append((data, labels))
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)
    splits = load_splits("cifar10", str(tmp_path), val_fraction=0.0)
    assert splits.train.images.shape == (20, 3, 32, 32) and splits.test.images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(splits.test.images.numpy().reshape(4, -1), expected[-1][0])
    assert splits.test.labels.tolist() == expected[-1][1]


def test_validation_split_is_held_out_from_training(tiny_idx_dir):
    splits = load_splits("mnist", str(tiny_idx_dir), val_fraction=0.25)
    full = load_splits("mnist", str(tiny_idx_dir), val_fraction=0.0)
    assert len(splits.val) == 100 and len(splits.train) == 300
    rows = lambda split: {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(split.images, split.labels)}
    assert rows(splits.train).isdisjoint(rows(splits.val))
    assert rows(splits.train) | rows(splits.val) == rows(full.train)
    # the same split whatever the run's seed (it does not depend on torch's global RNG)
    torch.manual_seed(123)
    again = load_splits("mnist", str(tiny_idx_dir), val_fraction=0.25)
    assert torch.equal(again.val.labels, splits.val.labels)


def test_real_fashion_mnist_sizes(fashion_mnist):
    splits = load_splits("fashion-mnist", str(fashion_mnist))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.in_channels == 1 and splits.image_size == 28
    assert sorted(splits.test.labels.unique().tolist()) == list(range(10))


@pytest.mark.parametrize("n,batch,world", [(100, 8, 1), (100, 8, 2), (100, 8, 3), (17, 4, 3), (9, 16, 2),
                                           (64, 8, 4), (6, 4, 3)])
def test_global_batches_cover_every_sample_once(n, batch, world):
    bounds = global_batch_bounds(n, batch, world)
    covered = [i for start, end in bounds for i in range(start, end)]
    assert covered == list(range(n))
    assert all(end - start >= 2 * world for start, end in bounds)


def test_too_few_samples_for_the_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="ranks"):
        global_batch_bounds(5, 4, 3)


@pytest.mark.parametrize("world", [2, 3])
def test_each_epoch_uses_every_sample_exactly_once_across_ranks(tiny_idx_dir, world):
    splits = load_splits("mnist", str(tiny_idx_dir), val_fraction=0.0)
    ranks = [TrainBatches(splits.train, splits.info, 7, r, world, seed=3, augment=False) for r in range(world)]
    for epoch in (0, 1):
        per_rank = [b.epoch_indices(epoch) for b in ranks]
        assert len({len(steps) for steps in per_rank}) == 1  # same number of steps on every rank
        seen = torch.cat([index for steps in per_rank for index in steps]).tolist()
        assert sorted(seen) == list(range(len(splits.train)))
    # the epochs are shuffled differently, identically on every rank
    assert not torch.equal(torch.cat(ranks[0].epoch_indices(0)), torch.cat(ranks[0].epoch_indices(1)))


def test_batches_deliver_the_indexed_samples_with_global_size(tiny_idx_dir):
    splits = load_splits("mnist", str(tiny_idx_dir), val_fraction=0.0)
    loader = TrainBatches(splits.train, splits.info, 16, 1, 2, seed=0, augment=False)
    sizes = []
    for index, batch in zip(loader.epoch_indices(2), loader.epoch(2)):
        assert torch.equal(batch.labels, splits.train.labels[index])
        expected = (splits.train.images[index].float() / 255 - splits.info.mean[0]) / splits.info.std[0]
        torch.testing.assert_close(batch.images, expected)
        sizes.append(batch.global_size)
    assert sizes == [32] * 12 + [16]  # 400 = 12 * 32 + 16, and 16 samples give both ranks >= 2


def test_crop_and_flip_matches_a_per_sample_loop():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    dy, dx = torch.randint(0, 9, (6,)), torch.randint(0, 9, (6,))
    flip = torch.rand(6) < 0.5
    out = crop_and_flip(images, dy, dx, flip, 4)
    for i in range(6):
        padded = torch.zeros(3, 16, 16, dtype=torch.uint8)
        padded[:, 4:12, 4:12] = images[i]
        crop = padded[:, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_augmentation_does_not_depend_on_the_number_of_ranks(tmp_path):
    from biprop_hpc.data.datasets import Split
    split = Split(torch.randint(0, 255, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 10)
    info = DATASETS["cifar10"]
    one = TrainBatches(split, info, 8, 0, 1, seed=5, augment=True)
    two = [TrainBatches(split, info, 4, r, 2, seed=5, augment=True) for r in range(2)]
    by_sample = {}
    for index, batch in zip(one.epoch_indices(0), one.epoch(0)):
        by_sample.update({int(i): img for i, img in zip(index, batch.images)})
    for loader in two:
        for index, batch in zip(loader.epoch_indices(0), loader.epoch(0)):
            for i, img in zip(index, batch.images):
                assert torch.equal(by_sample[int(i)], img)


def test_eval_shards_are_disjoint_and_complete(tiny_idx_dir):
    splits = load_splits("mnist", str(tiny_idx_dir), val_fraction=0.0)
    labels = [torch.cat([b.labels for b in EvalBatches(splits.test, splits.info, 9, r, 3)]) for r in range(3)]
    assert sum(len(x) for x in labels) == len(splits.test)
    merged = torch.empty(len(splits.test), dtype=torch.long)
    for r, part in enumerate(labels):
        merged[r::3] = part
    assert torch.equal(merged, splits.test.labels)
