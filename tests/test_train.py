import json
import math
import os
import signal
import subprocess
import sys

import h5py
import pytest
import torch

from conftest import epochs_done, file_hashes
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
    from biprop_hpc.nn import biprop_layers
    from biprop_hpc.train.loop import model_from_config
    torch.manual_seed(cfg.seed)  # the same seed builds the same layers
    layers = biprop_layers(model_from_config(cfg, in_channels=1, num_classes=10, image_size=8))
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


def run_cli_until_the_first_epoch(tmp_path, tiny_idx_dir, name, epochs):
    """`biprop train` as a subprocess, returned once its archive records the first epoch."""
    import time
    args = ["train", "--dataset", "mnist", "--data", str(tiny_idx_dir), "--model", "conv2_bin", "--width-mult", "0.25",
            "--batch-size", "4", "--threads", "1", "--out", str(tmp_path), "--name", name, "--lr-schedule", "constant"]
    # SIGINT at its default in the child: a shell starts background commands (a CI script run with `&`) with SIGINT
    # ignored, which the child would inherit, and Python then never raises KeyboardInterrupt
    process = subprocess.Popen([sys.executable, "-m", "biprop_hpc", *args, "--epochs", str(epochs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    archive = tmp_path / f"default/keep=0.5/{name}/archive.h5"
    deadline = time.monotonic() + 120
    while not epochs_done(archive) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    return process, args, archive


def test_sigusr1_checkpoints_mid_run_and_the_continuation_ends_like_an_uninterrupted_run(tmp_path, tiny_idx_dir):
    """The scheduler's warning signal, for real: exit 75, a checkpoint at the step where it arrived, and
    `--resume auto` finishing with the metrics and scores of an uninterrupted run."""
    epochs = 12  # about 0.3 s each on an idle machine: the signal, sent after the first, must come before the last
    process, args, archive = run_cli_until_the_first_epoch(tmp_path, tiny_idx_dir, "split", epochs)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    assert "SIGUSR1: checkpointed at epoch" in stderr and "Traceback" not in stderr
    assert read_archive(archive).attrs["status"] == "checkpointed"
    stopped = load_checkpoint(archive.parent / "checkpoints/last.pt")["state"]
    assert stopped["stop_reason"] == "SIGUSR1" and 1 <= stopped["epoch"] < epochs
    resumed = biprop(*args, "--epochs", str(epochs), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    whole = biprop(*[a if a != "split" else "whole" for a in args], "--epochs", str(epochs))
    assert whole.returncode == 0, whole.stderr
    a, b = read_archive(archive), read_archive(archive.parent.parent / "whole/archive.h5")
    for name in ("epoch", "train_loss", "train_top1", "val_loss", "val_top1"):
        assert a.metrics[name] == b.metrics[name], name
    assert a.final == b.final
    restarts = [(r["epoch"], r["step"], r["reason"]) for r in a.restarts]
    assert restarts == [(stopped["epoch"], stopped["step"], "SIGUSR1")]
    final_a = load_checkpoint(archive.parent / "checkpoints/last.pt")["model"]
    final_b = load_checkpoint(archive.parent.parent / "whole/checkpoints/last.pt")["model"]
    assert all(torch.equal(final_a[name], final_b[name]) for name in final_a)


def test_ctrl_c_leaves_an_interrupted_archive_and_a_resumable_run(tmp_path, tiny_idx_dir):
    epochs = 30  # about 0.3 s each on an idle machine: Ctrl-C, sent after the first, must come before the last
    process, args, archive = run_cli_until_the_first_epoch(tmp_path, tiny_idx_dir, "long", epochs)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "--resume auto" in stderr and "Traceback" not in stderr
    record = read_archive(archive)
    assert record.attrs["status"] == "interrupted" and record.attrs["end_time"]
    done_epochs = load_checkpoint(archive.parent / "checkpoints/last.pt")["state"]["epoch"]
    assert done_epochs >= 1 and record.metrics["epoch"][-1] >= done_epochs
    assert done_epochs < epochs, "the run ended before Ctrl-C came"
    resumed = biprop(*args, "--epochs", str(epochs), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    record = read_archive(archive)
    assert record.metrics["epoch"] == list(range(1, epochs + 1))
    assert [r["reason"] for r in record.restarts] == ["interrupted (SIGINT)"]


def test_a_completed_run_is_never_overwritten(tmp_path, tiny_idx_dir):
    args = ["train", "--dataset", "mnist", "--data", str(tiny_idx_dir), "--model", "conv2", "--width-mult", "0.25",
            "--epochs", "1", "--threads", "1", "--out", str(tmp_path)]
    assert biprop(*args).returncode == 0
    run_dir = tmp_path / "default/keep=0.5/seed0"
    before = file_hashes(run_dir)
    again = biprop(*args)
    assert again.returncode == 2
    assert str(run_dir) in again.stderr and "--resume auto" in again.stderr and "--name" in again.stderr
    requeued = biprop(*args, "--resume", "auto")  # a requeued job of a run that has finished: nothing to do
    assert requeued.returncode == 0 and "completed already" in requeued.stderr
    longer = biprop(*args[:-4], "--epochs", "2", "--threads", "1", "--out", str(tmp_path), "--resume", "auto")
    assert longer.returncode == 2 and "completed run with other settings: epochs 1 -> 2" in longer.stderr
    assert file_hashes(run_dir) == before
    other = biprop(*args, "--new-name")
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["run_dir"] == str(tmp_path / "default/keep=0.5/seed0_2")
    assert file_hashes(run_dir) == before


def test_without_a_validation_split_best_val_is_absent_not_nan(tmp_path, tiny_idx_dir, caplog):
    result = train(tiny_config(tmp_path, tiny_idx_dir, epochs=2, val_fraction=0.0), Local())
    assert "best_val_top1" not in result and result["best_epoch"] == 2
    record = read_archive(tmp_path / "runs/default/keep=0.5/seed0/archive.h5")
    assert "best_val_top1" not in record.final and record.final["best_epoch"] == 2
    assert "no validation split" in caplog.text
    assert not any(math.isnan(v) for v in record.final.values())


def test_archive_is_written_where_file_locking_is_unavailable(tmp_path):
    """Lustre/GPFS/NFS mounts without flock: simulated with a preloaded flock() that fails with ENOLCK, as
    such mounts do. A default h5py.File(..., "w") fails there (checked, so the simulation is real); ours
    does not, and a reader gets the archive back."""
    import shutil
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("needs a C compiler to build the flock shim (apt-get install gcc)")
    source = tmp_path / "noflock.c"
    source.write_text("#include <errno.h>\n"
                      "int flock(int fd, int op) { (void)fd; (void)op; errno = ENOLCK; return -1; }\n")
    shim = tmp_path / "libnoflock.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim), str(source)], check=True)
    script = f"""
import sys, h5py
from biprop_hpc.archive import RunRecord, read_archive, write_archive
try:
    h5py.File({str(tmp_path / 'default.h5')!r}, "w").close()
    print("default locking: wrote")
except OSError as error:
    print("default locking: failed", error)
record = RunRecord({{"status": "running", "config": "{{}}"}})
write_archive({str(tmp_path / 'archive.h5')!r}, record)
print("ours:", read_archive({str(tmp_path / 'archive.h5')!r}).attrs["status"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "LD_PRELOAD": str(shim), "HDF5_USE_FILE_LOCKING": ""})
    assert done.returncode == 0, done.stderr
    assert "default locking: failed" in done.stdout, done.stdout
    assert "ours: running" in done.stdout
