"""Image trees: the test-tree generator, `check_tree` (good and bad trees), `prepare_fashion_mnist`, the CLI."""
import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biprop_hpc.data import DatasetMissing, load_splits
from biprop_hpc.data import check as check_module
from biprop_hpc.data.check import CheckReport, add_data_commands, check_tree
from biprop_hpc.data.prepare import OutputExists, prepare_fashion_mnist
from biprop_hpc.data.tree import BadImage, file_list_path, load_split, read_file_list, scan_split
from image_tree import class_colour, make_image_tree

PER_CLASS = {"train": 7, "val": 3, "test": 2}
FASHION_CLASSES = ["0_t-shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt",
                   "7_sneaker", "8_bag", "9_ankle_boot"]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    return root, make_image_tree(root, classes=3, per_class=PER_CLASS)


def a_real_jpeg(root: Path) -> Path:
    """The largest JPEG of the tree (so that half of it cuts into the scan data)."""
    return max((p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")), key=lambda p: p.stat().st_size)


# ----- the generator

def test_generator_writes_mixed_real_images_with_the_right_labels(tree):
    root, written = tree
    assert set(written) == set(PER_CLASS)
    kinds, sizes = set(), set()
    for split, count in PER_CLASS.items():
        on_disk = sorted(p for p in (root / split).rglob("*") if p.is_file())
        assert sorted(p for p, _ in written[split]) == on_disk
        assert len(on_disk) == 3 * count
        for path, label in written[split]:
            assert path.parent.name == f"class{label:03d}"
            with Image.open(path) as image:
                image.load()
                kinds.add((image.format, image.mode))
                sizes.add(image.size)
                if image.mode in ("RGB", "RGBA"):   # the class colour dominates the picture
                    mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
                    distances = [np.abs(mean - np.array(class_colour(c, 3))).sum() for c in range(3)]
                    assert int(np.argmin(distances)) == label, path
    assert {("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "RGBA")} <= kinds
    assert {(40, 30), (17, 64), (300, 200)} <= sizes
    assert any(p.suffix == ".JPG" for p, _ in written["train"])


def test_generator_is_deterministic(tmp_path):
    a = make_image_tree(tmp_path / "a", classes=2, per_class={"train": 3, "val": 1})
    b = make_image_tree(tmp_path / "b", classes=2, per_class={"train": 3, "val": 1})
    for split in a:
        assert [p.read_bytes() for p, _ in a[split]] == [p.read_bytes() for p, _ in b[split]]


def test_scan_split_finds_the_generated_tree(tree):
    root, written = tree
    for split in PER_CLASS:
        images = scan_split(root, split)
        assert images.classes == ["class000", "class001", "class002"]
        assert sorted(zip(images.files, images.labels)) == sorted(written[split])
        assert np.bincount(images.labels).tolist() == [PER_CLASS[split]] * 3


# ----- check_tree on a good tree

def test_check_passes_and_writes_file_lists_that_read_back(tree):
    root, written = tree
    report = check_tree(root)
    assert isinstance(report, CheckReport)
    assert report.classes == ["class000", "class001", "class002"]
    assert report.counts == {split: {f"class{c:03d}": n for c in range(3)} for split, n in PER_CLASS.items()}
    assert report.bad == []
    for split in PER_CLASS:
        listed, scanned = read_file_list(root, split), scan_split(root, split)
        assert listed.files == scanned.files and listed.labels == scanned.labels
        assert listed.classes == scanned.classes
        assert file_list_path(root, split) == report.file_lists[split]
        assert load_split(root, split).files == scanned.files
    text = report.format()
    for word in ("train", "val", "test", "class002", str(3 * PER_CLASS["train"])):
        assert word in text


def test_check_without_test_split_and_without_writing(tree):
    root, _ = tree
    check_tree(root)
    shutil.rmtree(root / "test")
    report = check_tree(root)
    assert list(report.counts) == ["train", "val"]
    assert not file_list_path(root, "test").exists()   # a list of a split that is gone would be read
    shutil.rmtree(root / "filelist")
    report = check_tree(root, write_lists=False)
    assert not (root / "filelist").exists() and report.file_lists == {}


# ----- check_tree on bad trees: each error names the offending file or folder

def corrupt_jpeg(root):
    path = root / "train" / "class001" / "zz_corrupt.jpg"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return path


def truncated_jpeg(root):
    data = a_real_jpeg(root).read_bytes()
    path = root / "val" / "class000" / "zz_truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def non_image(root):
    path = root / "test" / "class002" / "notes.txt"
    path.write_text("labelled by hand\n")
    return path


def empty_class_folder(root):
    folder = root / "val" / "class001"
    for path in folder.iterdir():
        path.unlink()
    return folder


BAD_FILES = {"corrupt_jpeg": corrupt_jpeg, "truncated_jpeg": truncated_jpeg, "non_image": non_image}


@pytest.mark.parametrize("make_bad", [corrupt_jpeg, truncated_jpeg, non_image, empty_class_folder])
def test_a_bad_tree_is_an_error_naming_the_file(tree, make_bad):
    root, _ = tree
    culprit = make_bad(root)
    with pytest.raises(BadImage) as error:
        check_tree(root)
    assert str(culprit) in str(error.value)
    assert str(error.value).count(str(root)) >= 2   # the tree, and the culprit; nothing else is blamed
    assert "1 problem(s)" in str(error.value)
    assert not (root / "filelist").exists()


def test_a_missing_split_names_it(tree):
    root, _ = tree
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetMissing, match=str(root / "val")):
        check_tree(root)
    with pytest.raises(DatasetMissing, match=str(root / "absent")):
        check_tree(root / "absent")


def test_class_sets_differing_between_splits_name_the_classes(tree):
    root, written = tree
    shutil.copytree(root / "test" / "class000", root / "test" / "class_extra")
    shutil.rmtree(root / "val" / "class002")
    with pytest.raises(BadImage) as error:
        check_tree(root)
    message = str(error.value)
    assert f"{root / 'test'}: class folders differ" in message and "extra ['class_extra']" in message
    assert f"{root / 'val'}: class folders differ" in message and "missing ['class002']" in message


def test_all_problems_are_reported_together_and_long_lists_are_cut(tree):
    root, _ = tree
    culprits = [corrupt_jpeg(root), truncated_jpeg(root), non_image(root)]
    culprits += [root / "train" / "class000" / f"junk{i:02d}.bin" for i in range(22)]
    for path in culprits[3:]:
        path.write_text("x")
    with pytest.raises(BadImage) as error:
        check_tree(root)
    message = str(error.value)
    assert "25 problem(s)" in message and "... and 5 more" in message and "--skip-bad-images" in message
    shown = [path for path in culprits if str(path) in message]
    assert len(shown) == 20


def test_skip_bad_leaves_bad_files_out_and_counts_them(tree):
    root, written = tree
    culprits = sorted(make(root) for make in BAD_FILES.values())
    report = check_tree(root, skip_bad=True)
    assert len(report.bad) == 3
    assert [problem.split(": ")[0] for problem in report.bad] == [str(p) for p in culprits]
    assert report.counts == {split: {f"class{c:03d}": n for c in range(3)} for split, n in PER_CLASS.items()}
    for split in PER_CLASS:
        listed = read_file_list(root, split)
        assert sorted(zip(listed.files, listed.labels)) == sorted(written[split])
    assert "3 bad file(s)" in report.format()


def test_skip_bad_does_not_excuse_structural_problems(tree):
    root, _ = tree
    folder = empty_class_folder(root)
    with pytest.raises(BadImage, match=str(folder)):
        check_tree(root, skip_bad=True)
    for path in (root / "train" / "class002").iterdir():   # a folder whose only file is bad is as empty
        path.unlink()
    (root / "train" / "class002" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(BadImage, match="class002: no usable image"):
        check_tree(root, skip_bad=True)


def test_decoding_in_a_process_pool_agrees(tree, monkeypatch):
    root, _ = tree
    culprits = [corrupt_jpeg(root), truncated_jpeg(root)]
    inline = check_tree(root, skip_bad=True, write_lists=False, workers=1)
    monkeypatch.setattr(check_module, "_INLINE_BELOW", 0)
    pooled = check_tree(root, skip_bad=True, write_lists=False, workers=2)
    assert pooled.counts == inline.counts and pooled.bad == inline.bad
    assert [problem.split(": ")[0] for problem in pooled.bad] == sorted(str(p) for p in culprits)


# ----- prepare_fashion_mnist

def expected_selection(labels: np.ndarray, limit: int) -> np.ndarray:
    """Positions the tree holds, in the tree's order: the first `limit`, plus the first of any class they
    miss, grouped by label (folders), in IDX order within a label."""
    chosen = set(range(min(limit, len(labels))))
    for label in set(range(10)) - set(labels[:limit].tolist()):
        chosen.add(int(np.flatnonzero(labels == label)[0]))
    return np.array(sorted(chosen, key=lambda i: (labels[i], i)))


def test_prepare_fashion_mnist_matches_load_splits(tmp_path, fashion_mnist):
    out = tmp_path / "fm"
    counts = prepare_fashion_mnist(out, source_dir=str(fashion_mnist), limit_per_split=20)
    splits = load_splits("fashion-mnist", str(fashion_mnist), val_fraction=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm"]   # no temporary directory left beside it
    assert sorted(p.name for p in out.iterdir()) == ["filelist", "test", "train", "val"]
    for split, data in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        labels = data.labels.numpy()
        chosen = expected_selection(labels, 20)
        assert counts[split] == len(chosen) >= 20
        images = read_file_list(out, split)
        assert images.classes == FASHION_CLASSES
        assert images.files == scan_split(out, split).files
        assert images.labels == labels[chosen].tolist()
        for path, index in zip(images.files, chosen):
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "L" and image.size == (28, 28)
                pixels = np.asarray(image, dtype=np.float64)
            expected = data.images[index, 0].numpy().astype(np.float64)
            assert np.abs(pixels - expected).mean() < 3, path


def test_prepare_names_files_by_idx_index_and_keeps_train_and_val_apart(tmp_path, fashion_mnist):
    out = tmp_path / "fm"
    prepare_fashion_mnist(out, source_dir=str(fashion_mnist), val_fraction=0.5, limit_per_split=40)
    train = {p.stem for p in (out / "train").rglob("*.jpg")}
    val = {p.stem for p in (out / "val").rglob("*.jpg")}
    assert train and val and not train & val
    assert all(len(stem) == 5 and stem.isdigit() for stem in train | val)


def test_prepare_refuses_a_non_empty_out_dir_unless_forced(tmp_path, fashion_mnist):
    out = tmp_path / "fm"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists) as error:
        prepare_fashion_mnist(out, source_dir=str(fashion_mnist), limit_per_split=20)
    assert str(out) in str(error.value) and "--force" in str(error.value)
    assert (out / "keep.txt").read_text() == "mine"
    counts = prepare_fashion_mnist(out, source_dir=str(fashion_mnist), limit_per_split=20, force=True)
    assert not (out / "keep.txt").exists()
    assert sum(1 for _ in (out / "val").rglob("*.jpg")) == counts["val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm"]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_fashion_mnist(empty, source_dir=str(fashion_mnist), limit_per_split=10)   # an empty dir is fine
    assert (empty / "filelist" / "train.txt").is_file()


def test_prepare_errors(tmp_path, fashion_mnist):
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "fm", source_dir=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_fashion_mnist(tmp_path / "fm", source_dir=str(fashion_mnist), val_fraction=0)
    assert not (tmp_path / "fm").exists()


# ----- the command line

def parse(argv):
    parser = argparse.ArgumentParser(prog="biprop")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_data_commands(tmp_path, fashion_mnist, capsys):
    out = tmp_path / "fm"
    args = parse(["data", "prepare", "fashion-mnist", "--out", str(out), "--source", str(fashion_mnist),
                  "--limit-per-split", "20", "--val-fraction", "0.2"])
    result = args.handler(args)
    assert result["counts"]["val"] >= 20 and result["classes"] == FASHION_CLASSES
    assert "9_ankle_boot" in capsys.readouterr().out
    shutil.rmtree(out / "filelist")
    args = parse(["data", "check", str(out), "--no-write-lists"])
    result = args.handler(args)
    assert not (out / "filelist").exists()
    assert result["images"]["val"] == sum(1 for _ in (out / "val").rglob("*.jpg"))
    (out / "val" / "4_coat" / "notes.txt").write_text("x")
    args = parse(["data", "check", str(out), "--skip-bad-images"])
    assert args.handler(args)["bad_files"] == 1 and (out / "filelist" / "val.txt").is_file()
    with pytest.raises(SystemExit):
        parse(["data", "prepare", "mnist", "--out", str(out)])
