"""Horovod under real launchers (mpirun with the MPI controller, horovodrun with Gloo), on the CPU."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from biprop_hpc.archive import read_archive

WORKER = str(Path(__file__).with_name("dist_worker.py"))
BIN = Path(sys.executable).parent
# A model with BatchNorm (1-D and 2-D) and binary activations, at a tiny width: for runs compared with runs of the
# same number of ranks (bit for bit).
BN_MODEL = ("model=conv2_bin", "width_mult=0.25")
# A model with BatchNorm and ReLU, for comparisons across rank counts: there rounding differs in the last bits
# (sums in another order), and a sign activation can turn such a difference into a different output.
BN_RELU_MODEL = ("model=resnet18_cifar", "width_mult=0.125")
pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="needs Open MPI (env/install.sh installs it)")


def launch(launcher: str, ranks: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    if launcher == "mpirun":
        command = ["mpirun", "--oversubscribe", "-np", str(ranks)]
        if os.geteuid() == 0:
            command.insert(1, "--allow-run-as-root")
    elif launcher == "horovodrun-gloo":
        command = [str(BIN / "horovodrun"), "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}"]
    else:
        command = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command + [sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def worker(launcher, ranks, mode, out, data, *extra, returncode=0):
    out.mkdir(parents=True, exist_ok=True)
    done = launch(launcher, ranks, WORKER, mode, str(out), str(data), *extra)
    assert done.returncode == returncode, done.stdout + done.stderr
    return done


def biprop(*args):
    done = subprocess.run([sys.executable, "-m", "biprop_hpc", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def models(out: Path, ranks: int) -> list[dict]:
    return [torch.load(out / f"model_{rank}.pt") for rank in range(ranks)]


def assert_same_models(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if tolerance:
            torch.testing.assert_close(a[name], b[name], **tolerance, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name



# With sync_batchnorm the BN statistics come from float64 sums instead of the native kernel: float tolerance.
@pytest.mark.parametrize("launcher,model,atol", [("mpirun", (), 1e-7), ("horovodrun-gloo", (), 1e-7),
                                                 ("mpirun", (*BN_RELU_MODEL, "sync_batchnorm=true"), 1e-5)])
def test_two_rank_gradients_equal_one_process_on_the_union(tmp_path, tiny_idx_dir, launcher, model, atol):
    worker("single", 1, "grad", tmp_path / "one", tiny_idx_dir, *model)
    worker(launcher, 2, "grad", tmp_path / "two", tiny_idx_dir, *model)
    single = torch.load(tmp_path / "one/grad_0.pt")
    for rank in range(2):
        reduced = torch.load(tmp_path / f"two/grad_{rank}.pt")
        assert reduced.keys() == single.keys() and all(name.endswith("scores") for name in single)
        for name in single:
            torch.testing.assert_close(reduced[name], single[name], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_sample_once_and_validation_counted_once(tmp_path, tiny_idx_dir, ranks):
    worker("single", 1, "shard", tmp_path / "one", tiny_idx_dir)
    worker("mpirun", ranks, "shard", tmp_path / "many", tiny_idx_dir)
    seen = torch.cat([i for r in range(ranks) for i in torch.load(tmp_path / f"many/shard_{r}.pt")]).tolist()
    everything = torch.cat(torch.load(tmp_path / "one/shard_0.pt")).tolist()
    assert len(seen) == len(set(seen)) == len(everything) == 320  # 400 images, 80 held out for validation
    assert set(seen) == set(everything)
    one = json.loads((tmp_path / "one/val.json").read_text())
    many = json.loads((tmp_path / "many/val.json").read_text())
    assert many["world_size"] == ranks and one["world_size"] == 1
    assert many["count"] == one["count"] == 80
    assert many["top1"] == pytest.approx(one["top1"], abs=1e-9)
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_two_rank_search_matches_one_process_and_ranks_agree(tmp_path, tiny_idx_dir, launcher):
    worker("single", 1, "train", tmp_path / "one", tiny_idx_dir, "batch_size=32")
    worker(launcher, 2, "train", tmp_path / "two", tiny_idx_dir, "batch_size=16")
    (rank0, rank1), single = models(tmp_path / "two", 2), models(tmp_path / "one", 1)[0]
    assert_same_models(rank0, rank1)  # saved before the final broadcast: the ranks agree by themselves
    assert_same_models(rank0, single, rtol=1e-3, atol=1e-4)  # summation order
    archives = list((tmp_path / "two").rglob("archive.h5"))
    assert len(archives) == 1
    record = read_archive(archives[0])
    assert record.attrs["world_size"] == 2 and record.attrs["status"] == "completed"
    assert record.attrs["controller"] == ("mpi" if launcher == "mpirun" else "gloo")
    assert record.attrs["horovod_version"]
    one = read_archive(next((tmp_path / "one").rglob("archive.h5")))
    assert record.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-4)
    assert record.final["test_top1"] == pytest.approx(one.final["test_top1"], abs=1.01)  # at most one image


def test_two_rank_bn_run_reports_what_its_saved_best_model_scores(tmp_path, tiny_idx_dir):
    """BN statistics differ per rank after training; they are averaged before validation and checkpoints,
    and W_eff is never stale on ranks >= 1 after the best checkpoint is broadcast: the archive's numbers are
    the numbers of best.pt, evaluated on its own by one process."""
    worker("mpirun", 2, "train", tmp_path, tiny_idx_dir, *BN_RELU_MODEL, "epochs=3", "force_best=1")
    ranks = models(tmp_path, 2)
    assert_same_models(ranks[0], ranks[1])  # saved before the final broadcast: the ranks agree by themselves
    archive = next(tmp_path.rglob("archive.h5"))
    record = read_archive(archive)
    assert record.final["best_epoch"] == 1
    best = str(archive.parent / "checkpoints/best.pt")
    test = biprop("evaluate", "--checkpoint", best, "--split", "test")
    val = biprop("evaluate", "--checkpoint", best, "--split", "val")
    assert record.final["test_top1"] == test["top1"] and record.final["test_top5"] == test["top5"]
    assert record.final["test_loss"] == pytest.approx(test["loss"], rel=1e-6)
    assert record.metrics["val_top1"][0] == record.final["best_val_top1"] == val["top1"]
    assert record.metrics["val_loss"][0] == pytest.approx(val["loss"], rel=1e-6)
    last = torch.load(archive.parent / "checkpoints/last.pt", weights_only=False)["model"]
    assert_same_models(last, ranks[0])  # what every rank held after the last epoch is what last.pt holds


def test_sync_batchnorm_two_ranks_equal_one_process_on_the_union(tmp_path, tiny_idx_dir):
    """With sync_batchnorm, BN normalises with the global batch's statistics: a training step of two ranks with
    batch b computes what one process with batch 2b does. Compared on a run of ONE step (32 training images,
    128 held out): scores, BN running statistics and validation metrics equal to float tolerance. (Over many steps
    BIPROP's top-k, a discontinuous function, turns a last-bit difference in a score at a layer's threshold into a
    swapped mask bit, and such swaps grow; so longer runs are not compared this way.)"""
    one_step = (*BN_RELU_MODEL, "sync_batchnorm=true", "epochs=1", "train_subset=160", "val_fraction=0.8")
    worker("single", 1, "train", tmp_path / "one", tiny_idx_dir, *one_step, "batch_size=32")
    worker("mpirun", 2, "train", tmp_path / "two", tiny_idx_dir, *one_step, "batch_size=16")
    single, (rank0, rank1) = models(tmp_path / "one", 1)[0], models(tmp_path / "two", 2)
    assert_same_models(rank0, rank1)
    assert any("running_mean" in name for name in single)
    assert_same_models(rank0, single, rtol=1e-4, atol=1e-6)
    one = read_archive(next((tmp_path / "one").rglob("archive.h5")))
    two = read_archive(next((tmp_path / "two").rglob("archive.h5")))
    for name in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
        assert two.metrics[name] == pytest.approx(one.metrics[name], rel=1e-5, abs=1e-6), name
    assert two.final["test_top1"] == one.final["test_top1"]


def test_without_sync_batchnorm_two_ranks_differ_from_one_process(tmp_path, tiny_idx_dir):
    """The documented limit: plain BN normalises each rank's half batch with its own statistics, so a BN model
    on two ranks is not the single process's computation (this is why sync_batchnorm exists)."""
    worker("single", 1, "train", tmp_path / "one", tiny_idx_dir, *BN_MODEL, "batch_size=32", "epochs=1")
    worker("mpirun", 2, "train", tmp_path / "two", tiny_idx_dir, *BN_MODEL, "batch_size=16", "epochs=1")
    single, rank0 = models(tmp_path / "one", 1)[0], models(tmp_path / "two", 2)[0]
    differs = [name for name in single if not torch.allclose(single[name].float(), rank0[name].float(),
                                                            rtol=1e-4, atol=1e-5)]
    assert any(name.endswith("scores") for name in differs)


def test_two_rank_resume_from_an_epoch_boundary_is_exact(tmp_path, tiny_idx_dir):
    worker("mpirun", 2, "train", tmp_path / "whole", tiny_idx_dir, *BN_MODEL, "epochs=3")
    # A stop request at global step 10, the last of epoch 1 (320 samples / (16 x 2)): an end-of-epoch checkpoint.
    worker("mpirun", 2, "train", tmp_path / "split", tiny_idx_dir, *BN_MODEL, "epochs=3", "stop_at=10:0",
           returncode=75)
    archive = next((tmp_path / "split").rglob("archive.h5"))
    assert read_archive(archive).attrs["status"] == "checkpointed"
    refused = launch("mpirun", 2, WORKER, "train", str(tmp_path / "split"), str(tiny_idx_dir), *BN_MODEL, "epochs=5",
                     "resume=auto")
    assert refused.returncode != 0 and "with other settings: epochs 3 -> 5" in refused.stderr  # never extended
    last = archive.parent / "checkpoints/last.pt"
    checkpoint = torch.load(last, weights_only=False)
    archive.unlink()  # as if the first job had been killed right after writing its last checkpoint
    worker("mpirun", 2, "train", tmp_path / "split", tiny_idx_dir, *BN_MODEL, "epochs=3", "resume=auto")
    whole, resumed = models(tmp_path / "whole", 2), models(tmp_path / "split", 2)
    assert_same_models(resumed[0], resumed[1])
    assert_same_models(resumed[0], whole[0])
    assert (checkpoint["state"]["epoch"], checkpoint["state"]["step"]) == (1, 0)


@pytest.mark.parametrize("stopping_rank", [0, 1])
def test_two_rank_mid_epoch_stop_and_resume_equal_an_uninterrupted_run(tmp_path, tiny_idx_dir, stopping_rank):
    """One rank receives the stop request (as from SIGUSR1) at step 7 of 20 per epoch; the ranks agree to stop
    at the next step, checkpoint mid-epoch and exit 75; the resumed run ends exactly like an uninterrupted one,
    gradient accumulation and per-rank BN statistics included."""
    common = (*BN_MODEL, "epochs=2", "batch_size=8", "backward_passes_per_step=2")
    worker("mpirun", 2, "train", tmp_path / "whole", tiny_idx_dir, *common)
    worker("mpirun", 2, "train", tmp_path / "split", tiny_idx_dir, *common, f"stop_at=7:{stopping_rank}",
           returncode=75)
    archive = next((tmp_path / "split").rglob("archive.h5"))
    assert read_archive(archive).attrs["status"] == "checkpointed"
    state = torch.load(archive.parent / "checkpoints/last.pt", weights_only=False)["state"]
    assert (state["epoch"], state["step"]) == (0, 16)  # the vote started at step 7's boundary decides at step 8's
    worker("mpirun", 2, "train", tmp_path / "split", tiny_idx_dir, *common, "resume=auto")
    whole, resumed = models(tmp_path / "whole", 2), models(tmp_path / "split", 2)
    assert_same_models(resumed[0], resumed[1])
    assert_same_models(resumed[0], whole[0])
    a = read_archive(next((tmp_path / "whole").rglob("archive.h5")))
    b = read_archive(archive)
    for name in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
        assert a.metrics[name] == b.metrics[name], name
    assert a.final == b.final
    assert [(r["epoch"], r["step"], r["reason"]) for r in b.restarts] == [(0, 16, "SIGUSR1")]


def test_resume_gives_every_rank_the_saved_gradient_scaler_state(tmp_path, tiny_idx_dir):
    common = ("amp=fp16", "epochs=2")
    worker("mpirun", 2, "train", tmp_path, tiny_idx_dir, *common, "stop_at=3:0", returncode=75)
    last = next(tmp_path.rglob("last.pt"))
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["scaler"]["scale"] > 0
    checkpoint["scaler"].update(scale=1024.0, _growth_tracker=3)  # a state no fresh scaler has
    torch.save(checkpoint, last)
    worker("mpirun", 2, "scaler", tmp_path, tiny_idx_dir, *common, "resume=auto")
    for rank in range(2):
        state = torch.load(tmp_path / f"scaler_{rank}.pt")
        assert (state["scale"], state["_growth_tracker"]) == (1024.0, 3), rank


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_a_failing_rank_stops_the_job(tmp_path, tiny_idx_dir, launcher):
    start = time.monotonic()
    done = launch(launcher, 2, WORKER, "die", str(tmp_path), str(tiny_idx_dir), timeout=240)
    assert done.returncode != 0
    assert time.monotonic() - start < 180
    assert "rank 1 of 2 failed" in done.stdout + done.stderr
    last = next(tmp_path.rglob("initial.pt"))  # what was written stays loadable
    from biprop_hpc.train.checkpoint import load_checkpoint
    assert load_checkpoint(last)["state"]["epoch"] == 0


def test_gradient_accumulation_and_fp16_compression(tmp_path, tiny_idx_dir):
    """2 ranks x batch 8 x 3 accumulated passes is one process's batch 48, also for the epoch's last, shorter
    group (320 samples: 6 groups of 48 and one of 32); fp16 compression stays close to fp32."""
    worker("single", 1, "train", tmp_path / "one48", tiny_idx_dir, "batch_size=48")
    worker("mpirun", 2, "train", tmp_path / "acc", tiny_idx_dir, "batch_size=8", "backward_passes_per_step=3")
    worker("single", 1, "train", tmp_path / "one32", tiny_idx_dir, "batch_size=32")
    worker("mpirun", 2, "train", tmp_path / "fp16", tiny_idx_dir, "batch_size=16", "fp16_allreduce=true")
    for run, single in (("acc", "one48"), ("fp16", "one32")):
        (rank0, rank1), reference = models(tmp_path / run, 2), models(tmp_path / single, 1)[0]
        assert_same_models(rank0, rank1)
        for name in reference:
            if run == "acc":
                torch.testing.assert_close(rank0[name], reference[name], rtol=1e-3, atol=1e-4)
            elif name.endswith("scores"):
                # fp16 gradients round (tiny ones to zero), and a few scores near a layer's threshold then take
                # another path; the bulk must stay where fp32 puts it.
                difference = (rank0[name] - reference[name]).abs()
                assert difference.median() < 1e-3 and difference.max() < 0.05, (name, difference.max())
