"""Run by tests/test_distributed.py under a real launcher (mpirun or horovodrun); one mode per check.

usage: dist_worker.py MODE OUT_DIR DATA_DIR [key=value ...]
  grad     one step's score gradients on this rank's half of a fixed global batch -> OUT/grad_<rank>.pt
  shard    the sample indices this rank uses in epoch 0 -> OUT/shard_<rank>.pt; reduced validation metrics
           of the seeded initial model -> OUT/val.json (rank 0)
  train    a short search through Run.fit(); every rank saves its model as it is after the last epoch,
           BEFORE the final broadcast of the best checkpoint -> OUT/model_<rank>.pt; exits 75 when the
           run stops on a stop request (see stop_at)
  scaler   builds (and so resumes) the run, saves its gradient scaler's state -> OUT/scaler_<rank>.pt
  die      `biprop train` in which rank 1 raises during its first epoch; the job must end, non-zero
  dali     DALI (CPU) reads this rank's share of an image tree (DATA_DIR) for two epochs -> OUT/dali_<rank>.pt
key=value pairs are config overrides, and for `train` also:
  force_best=1      validation reports top-1 0 after epoch 1, so epoch 1 is the best one
  stop_at=S:R       rank R records a stop request (as the SIGUSR1 handler would) at global step S
"""
import json
import sys
from pathlib import Path

import torch

from biprop_hpc.config import build_config
from biprop_hpc.data import Batch
from biprop_hpc.dist import init_distributed
from biprop_hpc.train import Run
from biprop_hpc.train.evaluate import evaluate
from biprop_hpc.train.stopping import CHECKPOINTED_EXIT, RunCheckpointed


def config(out_dir, data_dir, **overrides):
    values = {"dataset": "mnist", "data": data_dir, "model": "conv2", "width_mult": 0.25, "epochs": 2,
              "batch_size": 16, "eval_batch_size": 25, "val_fraction": 0.2, "out": out_dir, "lr": 0.05,
              "threads": 1, "name": "run", "lr_schedule": "constant", **overrides}
    return build_config(None, values)


def main(mode, out_dir, data_dir, *extra):
    out = Path(out_dir)
    if mode == "die":
        return die(out_dir, data_dir)
    if mode == "dali":
        return dali(out, data_dir)
    ctx = init_distributed()
    overrides = dict(item.split("=", 1) for item in extra)
    force_best = overrides.pop("force_best", None)
    stop_at = overrides.pop("stop_at", None)
    run = Run(config(out_dir, data_dir, **overrides), ctx)
    if force_best:
        force_best_epoch_1(run)
    if mode == "grad":
        torch.manual_seed(1)  # the same global batch on every rank
        images, labels = torch.randn(24, 1, 8, 8), torch.randint(0, 10, (24,))
        mine = slice(ctx.rank, None, ctx.size)
        batch = Batch(images[mine], labels[mine], global_size=24)
        run.model.train()
        loss = run.criterion(run.model(batch.images), batch.labels) / batch.global_size
        loss.backward()
        if hasattr(run.optimizer, "synchronize"):
            run.optimizer.synchronize()  # the allreduce of the score gradients
        grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
        torch.save(grads, out / f"grad_{ctx.rank}.pt")
    elif mode == "shard":
        torch.save(run.data.train.epoch_indices(0), out / f"shard_{ctx.rank}.pt")
        val = evaluate(run.model, run.data.val, run.device, ctx, run.autocast)
        if ctx.rank == 0:
            (out / "val.json").write_text(json.dumps({**val, "world_size": ctx.size}))
    elif mode == "train":
        finish = run._finish

        def save_then_finish():  # every rank's own model, before the best checkpoint is broadcast
            torch.save(run.model.state_dict(), out / f"model_{ctx.rank}.pt")
            return finish()

        run._finish = save_then_finish
        if stop_at:
            request_stop_at(run, *map(int, stop_at.split(":")))
        try:
            run.fit()
        except RunCheckpointed:
            return CHECKPOINTED_EXIT
    elif mode == "scaler":
        torch.save(run.scaler.state_dict(), out / f"scaler_{ctx.rank}.pt")


def force_best_epoch_1(run):
    """Validation after epochs 2, 3, ... reports top-1 0, so epoch 1 stays the best; test evaluation is real."""
    import biprop_hpc.train.loop as loop
    real = loop.evaluate

    def evaluate(model, batches, *args):
        result = real(model, batches, *args)
        if batches is run.data.val and run.state["epoch"] >= 1:
            result = {**result, "top1": 0.0}
        return result

    loop.evaluate = evaluate


def request_stop_at(run, global_step, rank):
    """Record a stop request on `rank` after `global_step` optimizer steps, as the signal handler does."""
    step_once, steps = run._optimizer_step, []

    def step():
        step_once()
        steps.append(1)
        if len(steps) == global_step and run.ctx.rank == rank:
            run.stop.reason = "SIGUSR1"

    run._optimizer_step = step


def dali(out, tree):
    from biprop_hpc.data.batches import TrainPlan
    from biprop_hpc.data.images import DaliLoader, Preprocess
    from biprop_hpc.data.tree import scan_split
    ctx = init_distributed()
    images = scan_split(tree, "train")
    plan = TrainPlan(len(images), 4, ctx.rank, ctx.size, seed=7)
    loader = DaliLoader(images, plan.steps, True, Preprocess(24, 28, 0.5), torch.device("cpu"), 1, seed=ctx.rank,
                        cpu_only=True)
    epochs = {epoch: [(index, batch.labels, batch.images.shape[0], batch.global_size)
                      for index, batch in zip(plan.epoch_indices(epoch), loader.epoch(epoch))]
              for epoch in (0, 1)}
    torch.save({"epochs": epochs, "labels": images.labels, "steps": len(plan)}, out / f"dali_{ctx.rank}.pt")
    return 0


def die(out_dir, data_dir):
    from biprop_hpc import cli
    from biprop_hpc.dist import detect_launcher
    original = Run._train_epoch

    def failing(self, epoch):
        if self.ctx.rank == 1:
            raise RuntimeError("a simulated fault on this rank")
        return original(self, epoch)

    Run._train_epoch = failing
    assert detect_launcher()[1] > 1
    return cli.main(["train", "--dataset", "mnist", "--data", data_dir, "--model", "conv2", "--width-mult",
                     "0.25", "--out", out_dir, "--epochs", "50", "--batch-size", "16", "--threads", "1"])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
