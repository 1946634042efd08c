"""The training loop: one loop for one process and for N Horovod ranks.

Data flows one way: config -> data splits -> model -> optimizer -> epochs (train, validate, checkpoint,
archive) -> test of the best checkpoint, once. Rank 0 does all file I/O; metrics are reduced over ranks.
"""
from __future__ import annotations

import contextlib
import logging
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import biprop_hpc
from biprop_hpc.archive import METRICS, RunRecord, write_archive
from biprop_hpc.config import Config
from biprop_hpc.data.build import build_data
from biprop_hpc.models import LayerBuilder, build_model
from biprop_hpc.nn import biprop_layers
from biprop_hpc.train.checkpoint import load_checkpoint, resume_path, save_checkpoint
from biprop_hpc.train.evaluate import evaluate
from biprop_hpc.train.schedule import lr_at_epoch

log = logging.getLogger("biprop_hpc")


def run_directory(cfg: Config) -> Path:
    return Path(cfg.out) / cfg.config_name / f"keep={cfg.keep_ratio:g}" / cfg.name


def model_from_config(cfg: Config, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    builder = LayerBuilder(keep_ratio=cfg.keep_ratio, weight_init=cfg.weight_init, layer_type=cfg.layer_type,
                           learn_batchnorm=cfg.learn_batchnorm, first_layer=cfg.first_layer,
                           last_layer=cfg.last_layer)
    return build_model(cfg.model, builder, in_channels=in_channels, num_classes=num_classes,
                       image_size=image_size, width_mult=cfg.width_mult)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Scores and learned dense weights get weight decay; learned BN affine parameters do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))


def autocast_for(cfg: Config, device: torch.device):
    if cfg.amp == "none" or device.type != "cuda":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def layer_table(model: nn.Module) -> list[dict]:
    return [{"name": name, "weights": layer.weight.numel(), "kept": layer.n_keep,
             "alpha": float(layer.alpha())} for name, layer in biprop_layers(model)]


def versions(ctx) -> dict:
    try:
        import nvidia.dali
        dali = nvidia.dali.__version__
    except ImportError:
        dali = ""
    return {"python_version": platform.python_version(), "torch_version": torch.__version__,
            "biprop_hpc_version": biprop_hpc.__version__, "horovod_version": ctx.horovod_version(),
            "dali_version": dali}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Run:
    """One search (or dense training) run: built from a config, then `fit()`."""

    def __init__(self, cfg: Config, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.is_root = ctx.rank == 0
        self.dir = run_directory(cfg)
        self.checkpoints = self.dir / "checkpoints"
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = ctx.device(cfg.device)
        self.data = build_data(cfg, ctx.rank, ctx.size, self.device)
        torch.manual_seed(cfg.seed)  # the frozen weights and initial scores are a function of the seed
        self.model = model_from_config(cfg, self.data.in_channels, self.data.num_classes,
                                       self.data.image_size).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Wrapped before any state is loaded: Horovod's wrapper is a new optimizer with empty state.
        self.optimizer = ctx.distributed_optimizer(make_optimizer(cfg, self.model), self.model,
                                                   cfg.fp16_allreduce, cfg.backward_passes_per_step)
        self.autocast = autocast_for(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" and self.device.type == "cuda" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
        global_batch = cfg.batch_size * ctx.size * cfg.backward_passes_per_step
        self.lr_scale = global_batch / cfg.lr_reference_batch if cfg.lr_reference_batch else 1.0
        self.state = {"epoch": 0, "history": {name: [] for name in METRICS}, "best_val_top1": -math.inf,
                      "best_epoch": -1, "start_time": now()}
        self._resume()
        ctx.broadcast_model(self.model)
        ctx.broadcast_optimizer(self.optimizer)
        self.record = RunRecord(self._attrs())
        self.writer = None
        if self.is_root:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.dir / "logs"))

    # --- set-up -----------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Rank 0 finds and reads the checkpoint; every rank gets its epoch and history."""
        path = resume_path(self.cfg.resume, self.checkpoints) if self.is_root else None
        if path is not None:
            checkpoint = load_checkpoint(path)
            if checkpoint["config"]["model"] != self.cfg.model:
                raise ValueError(f"resume: {path} holds a {checkpoint['config']['model']} model, "
                                 f"the config asks for {self.cfg.model}")
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if self.scaler and checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
            torch.set_rng_state(checkpoint["rng"])
            self.state = checkpoint["state"]
            log.info("resumed from %s after epoch %d", path, self.state["epoch"])
        self.state = self.ctx.broadcast_object(self.state, name="run_state")

    def _attrs(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        return {"status": "running", "config": cfg.to_json(), "keep_ratio": cfg.keep_ratio,
                "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed, "world_size": ctx.size,
                "launcher": ctx.launcher, "controller": ctx.controller, "loader": self.data.loader,
                "skipped_files": len(self.data.skipped),
                "start_time": self.state["start_time"], "end_time": "", **versions(ctx)}

    # --- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        try:
            if self.state["epoch"] == 0 and self.is_root:
                self._save("initial.pt")
            for epoch in range(self.state["epoch"], self.cfg.epochs):
                self._epoch(epoch)
            return self._finish()
        except BaseException as error:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            self._write_archive(status)
            raise
        finally:
            if self.writer:
                self.writer.close()

    def _epoch(self, epoch: int) -> None:
        cfg = self.cfg
        lr = self.lr_scale * lr_at_epoch(cfg.lr_schedule, cfg.lr, epoch, cfg.epochs, cfg.warmup_epochs,
                                         cfg.milestones, cfg.lr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        train = self._train_epoch(epoch)
        seconds = time.perf_counter() - start
        val = evaluate(self.model, self.data.val, self.device, self.ctx, self.autocast)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "epoch_seconds": seconds, "images_per_second": train["count"] / seconds}
        for name in METRICS:
            self.state["history"][name].append(row[name])
        self.state["epoch"] = epoch + 1
        # Without a validation split the last epoch counts as the best.
        improved = val["count"] == 0 or val["top1"] > self.state["best_val_top1"]
        if improved:
            self.state["best_val_top1"], self.state["best_epoch"] = val["top1"], epoch + 1
        if self.is_root:
            self._save("last.pt")
            if improved:
                self._save("best.pt")
            if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                self._save(f"epoch_{epoch + 1}.pt")
            self._write_archive("running")
            for name, value in row.items():
                if name != "epoch":
                    self.writer.add_scalar(f"epoch/{name}", value, epoch + 1)
            log.info("epoch %d/%d  lr %.4g  train loss %.4f top1 %.2f  val loss %.4f top1 %.2f top5 %.2f  "
                     "%.1f s  %.0f img/s", epoch + 1, cfg.epochs, lr, row["train_loss"], row["train_top1"],
                     row["val_loss"], row["val_top1"], row["val_top5"], seconds, row["images_per_second"])

    def _train_epoch(self, epoch: int) -> dict:
        model, optimizer, device = self.model, self.optimizer, self.device
        passes = self.cfg.backward_passes_per_step
        model.train()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        steps = len(self.data.train)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not (self.is_root and sys.stderr.isatty()))
        optimizer.zero_grad()
        for step, batch in enumerate(self.data.train.epoch(epoch)):
            images = batch.images.to(device, non_blocking=True)
            if self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch.labels.to(device, non_blocking=True)
            with self.autocast():
                logits = model(images)
            loss_sum = self.criterion(logits.float(), labels)
            # Divided by the GLOBAL batch: gradients summed over ranks are then the global batch's mean.
            loss = loss_sum / (batch.global_size * passes)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if (step + 1) % passes == 0 or step + 1 == steps:
                self._optimizer_step()
            totals += torch.stack([loss_sum.detach().double(),
                                   (logits.argmax(1) == labels).sum().double(),
                                   torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
            global_step = epoch * steps + step
            if self.writer and global_step % self.cfg.log_interval == 0:
                self.writer.add_scalar("step/train_loss", loss_sum.item() / len(labels), global_step)
            bar.update()
        bar.close()
        loss, correct, count = self.ctx.allreduce_sum(totals.cpu()).tolist()
        return {"loss": loss / count, "top1": 100 * correct / count, "count": count}

    def _optimizer_step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            # Horovod: finish the allreduce before unscaling, then step without a second one.
            synchronize = getattr(self.optimizer, "synchronize", None)
            if synchronize:
                synchronize()
            self.scaler.unscale_(self.optimizer)
            skip = getattr(self.optimizer, "skip_synchronize", contextlib.nullcontext)
            with skip():
                self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad()

    def _finish(self) -> dict:
        """Evaluate the test set once, with the best checkpoint's model."""
        if self.is_root:
            best = load_checkpoint(self.checkpoints / "best.pt")
            self.model.load_state_dict(best["model"])
        self.ctx.broadcast_model(self.model)
        test = evaluate(self.model, self.data.test, self.device, self.ctx, self.autocast)
        self.record.final = {"best_val_top1": self.state["best_val_top1"], "best_epoch": self.state["best_epoch"],
                             "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"]}
        self._write_archive("completed")
        if self.is_root:
            log.info("best epoch %d (val top1 %.2f): test top1 %.2f top5 %.2f on %d images -> %s",
                     self.state["best_epoch"], self.state["best_val_top1"], test["top1"], test["top5"],
                     test["count"], self.dir / "archive.h5")
        return {**self.record.final, "run_dir": str(self.dir)}

    # --- files (rank 0) ---------------------------------------------------------------------------
    def _save(self, filename: str) -> None:
        save_checkpoint(self.checkpoints / filename, {
            "config": self.cfg.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "state": self.state, "rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler else None})

    def _write_archive(self, status: str) -> None:
        if not self.is_root:
            return
        self.record.attrs["status"] = status
        if status != "running":
            self.record.attrs["end_time"] = now()
        self.record.metrics = self.state["history"]
        self.record.layers = layer_table(self.model)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_archive(self.dir / "archive.h5", self.record)


def train(cfg: Config, ctx) -> dict:
    return Run(cfg, ctx).fit()


def evaluate_checkpoint(path: str, split: str, ctx, data_dir: str = "", device: str = "auto") -> dict:
    """Score a checkpoint's model on its dataset's `split` (test or val)."""
    checkpoint = load_checkpoint(Path(path))
    cfg = Config.from_dict({**checkpoint["config"], **({"data": data_dir} if data_dir else {})}, origin=str(path))
    target = ctx.device(device)
    data = build_data(cfg, ctx.rank, ctx.size, target)
    model = model_from_config(cfg, data.in_channels, data.num_classes, data.image_size)
    model.load_state_dict(checkpoint["model"])
    return evaluate(model.to(target), getattr(data, split), target, ctx, autocast_for(cfg, target))
