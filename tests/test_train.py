import json
import math
import subprocess
import sys

import h5py
import pytest
import torch

from biprop_hpc.archive import METRICS, read_archive
from biprop_hpc.config import build_config
from biprop_hpc.dist import Local
from biprop_hpc.nn import kept_count
from biprop_hpc.train import Run, evaluate_checkpoint, train
from biprop_hpc.train.checkpoint import load_checkpoint, save_checkpoint
from biprop_hpc.train.schedule import lr_at_epoch


def tiny_config(tmp_path, data_dir, **overrides):
    values = {"dataset": "mnist", "data": str(data_dir), "model": "conv2", "width_mult": 0.25,
              "epochs": 3, "batch_size": 32, "eval_batch_size": 64, "val_fraction": 0.2,
              "out": str(tmp_path / "runs"), "lr": 0.05, "threads": 1, **overrides}
    return build_config(None, values)


@pytest.mark.parametrize("epoch", range(10))
def test_schedules_follow_their_formulas(epoch):
    assert lr_at_epoch("constant", 0.1, epoch, 10) == 0.1
    assert lr_at_epoch("cosine", 0.1, epoch, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi * epoch / 10)))
    warm = lr_at_epoch("warmup_cosine", 0.2, epoch, 10, warmup_epochs=4)
    expected = 0.2 * (epoch + 1) / 4 if epoch < 4 else 0.1 * (1 + math.cos(math.pi * (epoch - 4) / 6))
    assert warm == pytest.approx(expected)
    step = lr_at_epoch("multistep", 1.0, epoch, 10, milestones=[3, 7], gamma=0.5)
    assert step == (1.0 if epoch < 3 else 0.5 if epoch < 7 else 0.25)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def torn_save(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 1


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(Exception, match="x.pt"):
        load_checkpoint(tmp_path / "x.pt")


def scores_of(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, tiny_idx_dir, monkeypatch):
    whole = Run(tiny_config(tmp_path, tiny_idx_dir, name="whole", save_every=1), Local())
    whole_result = whole.fit()

    original_epoch = Run._epoch

    def stop_at_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # as if the job were killed after epoch 2 finished
        original_epoch(self, epoch)

    monkeypatch.setattr(Run, "_epoch", stop_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        Run(tiny_config(tmp_path, tiny_idx_dir, name="split"), Local()).fit()
    interrupted = read_archive(tmp_path / "runs/default/keep=0.5/split/archive.h5")
    assert interrupted.attrs["status"] == "interrupted"
    assert interrupted.metrics["epoch"] == [1, 2]
    monkeypatch.setattr(Run, "_epoch", original_epoch)

    resumed = Run(tiny_config(tmp_path, tiny_idx_dir, name="split", resume="auto"), Local())
    assert resumed.state["epoch"] == 2
    resumed_result = resumed.fit()

    for key in ("test_top1", "test_loss", "best_val_top1", "best_epoch"):
        assert resumed_result[key] == whole_result[key]
    a = read_archive(tmp_path / "runs/default/keep=0.5/whole/archive.h5")
    b = read_archive(tmp_path / "runs/default/keep=0.5/split/archive.h5")
    for name in ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
        assert a.metrics[name] == b.metrics[name], name
    final_whole = load_checkpoint(tmp_path / "runs/default/keep=0.5/whole/checkpoints/last.pt")["model"]
    final_split = load_checkpoint(tmp_path / "runs/default/keep=0.5/split/checkpoints/last.pt")["model"]
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_split[name]), name
    # the "every epoch" checkpoints were written, and the initial one
    names = sorted(p.name for p in (tmp_path / "runs/default/keep=0.5/whole/checkpoints").iterdir())
    assert names == ["best.pt", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "initial.pt", "last.pt"]


def test_archive_contents(tmp_path, tiny_idx_dir):
    cfg = tiny_config(tmp_path, tiny_idx_dir, epochs=2, keep_ratio=0.3)
    result = train(cfg, Local())
    path = tmp_path / "runs/default/keep=0.3/seed0/archive.h5"
    with h5py.File(path, "r") as h5:
        for key in ("schema_version", "status", "config", "keep_ratio", "model", "dataset", "seed", "world_size",
                    "start_time", "end_time", "python_version", "torch_version", "biprop_hpc_version",
                    "horovod_version", "dali_version", "launcher", "controller"):
            assert key in h5.attrs, key
        assert sorted(h5["metrics"]) == sorted(METRICS)
        assert all(len(h5["metrics"][name]) == 2 for name in METRICS)
    record = read_archive(path)
    assert record.attrs["status"] == "completed" and record.attrs["world_size"] == 1
    assert record.attrs["keep_ratio"] == 0.3 and record.config["keep_ratio"] == 0.3
    assert record.metrics["epoch"] == [1, 2]
    assert record.final["test_top1"] == result["test_top1"]
    assert record.final["best_val_top1"] == max(record.metrics["val_top1"])
    assert record.metrics["val_top1"][record.final["best_epoch"] - 1] == record.final["best_val_top1"]
    run = Run(cfg, Local())  # the same seed builds the same layers
    from biprop_hpc.nn import biprop_layers
    layers = biprop_layers(run.model)
    assert [row["name"] for row in record.layers] == [name for name, _ in layers]
    for row, (_, layer) in zip(record.layers, layers):
        assert row["weights"] == layer.weight.numel()
        assert row["kept"] == kept_count(layer.weight.numel(), 0.3)
        assert row["alpha"] > 0


def test_test_set_is_scored_with_the_best_checkpoint(tmp_path, tiny_idx_dir):
    result = train(tiny_config(tmp_path, tiny_idx_dir, epochs=3), Local())
    run_dir = tmp_path / "runs/default/keep=0.5/seed0"
    best = evaluate_checkpoint(str(run_dir / "checkpoints/best.pt"), "test", Local())
    assert best["top1"] == result["test_top1"]
    assert load_checkpoint(run_dir / "checkpoints/best.pt")["state"]["epoch"] == result["best_epoch"]


def test_only_scores_are_trained(tmp_path, tiny_idx_dir):
    run = Run(tiny_config(tmp_path, tiny_idx_dir, epochs=1), Local())
    before = scores_of(run.model)
    run.fit()
    after = scores_of(run.model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.endswith("scores") or "running" in name or "num_batches" in name:
            continue
        assert not changed, f"{name} changed but only scores (and BN statistics) may"
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith("scores"))


def biprop(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "biprop_hpc", *args], capture_output=True, text=True, **kwargs)


def test_cli_reports_a_missing_dataset_clearly(tmp_path):
    done = biprop("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert done.returncode == 2
    assert "nowhere" in done.stderr and "apt-get install dataset-fashion-mnist" in done.stderr
    assert "Traceback" not in done.stderr


def test_end_to_end_search_on_fashion_mnist(tmp_path, fashion_mnist):
    """A short real search: a Conv2 ticket (half the weights kept, binary values) reaches >= 80% test accuracy."""
    done = biprop("train", "--config", "configs/fashion-mnist/conv2_mpt1-32.yaml", "--train-subset", "8000",
                  "--test-subset", "2000", "--epochs", "2", "--width-mult", "0.5", "--out", str(tmp_path),
                  "--name", "e2e", timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["test_top1"] >= 80.0, result
    record = read_archive(tmp_path / "conv2_mpt1-32/keep=0.5/e2e/archive.h5")
    assert record.attrs["status"] == "completed"
    assert record.final["test_top1"] == result["test_top1"]
    ckpt = tmp_path / "conv2_mpt1-32/keep=0.5/e2e/checkpoints/best.pt"
    evaluated = biprop("evaluate", "--checkpoint", str(ckpt), "--split", "test")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["top1"] == result["test_top1"]


def test_sigterm_leaves_an_interrupted_archive_and_a_resumable_run(tmp_path, tiny_idx_dir):
    import signal
    import time
    args = ["train", "--dataset", "mnist", "--data", str(tiny_idx_dir), "--model", "conv2", "--width-mult", "0.25",
            "--batch-size", "16", "--threads", "1", "--out", str(tmp_path), "--name", "long"]
    process = subprocess.Popen([sys.executable, "-m", "biprop_hpc", *args, "--epochs", "200"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    archive = tmp_path / "default/keep=0.5/long/archive.h5"
    deadline = time.monotonic() + 120
    while not archive.exists() and time.monotonic() < deadline:  # the first epoch has finished
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "--resume auto" in stderr and "Traceback" not in stderr
    record = read_archive(archive)
    assert record.attrs["status"] == "interrupted" and record.attrs["end_time"]
    done_epochs = load_checkpoint(archive.parent / "checkpoints/last.pt")["state"]["epoch"]
    assert done_epochs >= 1 and record.metrics["epoch"][-1] >= done_epochs
    resumed = biprop(*args, "--epochs", str(done_epochs + 1), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert read_archive(archive).metrics["epoch"] == list(range(1, done_epochs + 2))
