"""The training loop: one loop for one process and for N Horovod ranks.

Data flows one way: config -> data splits -> model -> optimizer -> epochs (train, validate, checkpoint,
archive) -> test of the best checkpoint, once. Rank 0 does all file I/O; metrics are reduced over ranks.

What keeps N ranks exact:
- gradients are summed over ranks with every loss divided by the global batch (of the accumulation group),
  so the update is the one a single process with the whole global batch would make;
- BN running statistics are averaged over ranks before every validation and every end-of-epoch checkpoint,
  so every rank validates, and every checkpoint holds, one model (with `sync_batchnorm` the batch statistics
  themselves are those of the global batch);
- what differs per rank (RNG state, BN statistics and the epoch's partial totals between two averagings) is
  gathered into every checkpoint, and each rank gets its own back on resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import platform
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import biprop_hpc
from biprop_hpc.archive import METRICS, ArchiveError, RunRecord, read_archive, write_archive
from biprop_hpc.config import Config, ConfigError, describe_differences, result_differences
from biprop_hpc.data.build import build_data
from biprop_hpc.dist import batchnorm_statistics, scheduler_job_id, scheduler_nodes
from biprop_hpc.models import LayerBuilder, build_model
from biprop_hpc.nn import biprop_layers
from biprop_hpc.nn.global_prune import at_target_keep_ratio, set_run_pruning, trained_epoch
from biprop_hpc.train.checkpoint import load_checkpoint, resume_path, save_checkpoint
from biprop_hpc.train.evaluate import evaluate, to_device
from biprop_hpc.train.lock import RunLock, RunLocked
from biprop_hpc.train.losses import consistency_loss_sum
from biprop_hpc.train.progress import EpochProgress, RunLog, start_line
from biprop_hpc.train.schedule import lr_at_epoch
from biprop_hpc.train.stopping import RunCheckpointed, StopRequests
from biprop_hpc.train.watchdog import (HEARTBEAT_DIR, Heartbeats, Watchdog, WatchedContext, rank_on_host,
                                       reset_heartbeats)

log = logging.getLogger("biprop_hpc")

HEARTBEAT_SECONDS = 120.0  # the archive is rewritten at least this often within an epoch (rank 0)

# Why a run was continued, when its last checkpoint recorded no stop: from the archive's last status.
UNRECORDED_STOPS = {"running": "killed without a word (the archive still said running)", "failed": "failed",
                    "interrupted": "interrupted (SIGINT)", "checkpointed": "checkpointed"}


def model_from_config(cfg: Config, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    builder = LayerBuilder(keep_ratio=cfg.keep_ratio, weight_init=cfg.weight_init, layer_type=cfg.layer_type,
                           learn_batchnorm=cfg.learn_batchnorm, first_layer=cfg.first_layer,
                           last_layer=cfg.last_layer, fan_scale=cfg.fan_scale)
    return build_model(cfg.model, builder, in_channels=in_channels, num_classes=num_classes,
                       image_size=image_size, width_mult=cfg.width_mult)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Scores and learned dense weights get weight decay; learned BN affine parameters (every 1-D parameter)
    only with `bn_weight_decay`, as the original's SGD (its no_bn_decay defaulted to false). Adam gets the same
    groups: the original passed Adam only the lr, so its recipes set weight_decay 0 for Adam."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 and not cfg.bn_weight_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))


def autocast_for(cfg: Config, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def layer_table(model: nn.Module) -> list[dict]:
    return [{"name": name, "weights": layer.weight.numel(), "kept": layer.n_keep,
             "alpha": float(layer.alpha())} for name, layer in biprop_layers(model)]


def kept_fractions(model: nn.Module) -> list[float]:
    """Every BIPROP layer's kept fraction now (n_keep / weights), in module order."""
    return [layer.n_keep / layer.weight.numel() for _, layer in biprop_layers(model)]


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


def holds_a_run(directory: Path) -> bool:
    return (directory / "archive.h5").exists() or any((directory / "checkpoints").glob("*.pt"))


def claim_directory(cfg: Config) -> tuple[Config, RunLock]:
    """The run's config and its directory's lock, held from now on (rank 0 decides).

    The lock comes first, so two processes can never both decide that one directory is theirs. A run
    directory that holds a run is never started over: that is an error naming the directory and the ways
    on, unless `new_name` asks for the first free <name>_2, <name>_3, ... as the original code did.
    """
    number = 1
    while True:
        candidate = cfg if number == 1 else dataclasses.replace(cfg, name=f"{cfg.name}_{number}")
        number += 1
        try:
            lock = RunLock(candidate.run_dir()).acquire()
        except RunLocked:
            if cfg.new_name and not cfg.resume:
                continue
            raise
        if cfg.resume or not holds_a_run(candidate.run_dir()):
            return candidate, lock
        lock.release()
        if not cfg.new_name:
            raise ConfigError(f"{cfg.run_dir()} already holds a run; continue it with --resume auto, or start "
                              "another with --name NAME (or --new-name for the next free <name>_N)")


def refuse_other_settings(what: str, stored: dict, stored_ranks: int, cfg: Config, ranks: int) -> None:
    """ConfigError naming every result-changing setting in which `cfg` (on `ranks` ranks) differs from the
    `stored` config of a run (on `stored_ranks`): one run directory holds one run's settings. The batch is
    compared as the global batch, so a run may continue on other ranks with batch_size changed to match."""
    differences = result_differences(stored, cfg)
    then = (stored.get("batch_size", 0), stored_ranks, stored.get("backward_passes_per_step", 1))
    now = (cfg.batch_size, ranks, cfg.backward_passes_per_step)
    if math.prod(then) != math.prod(now):
        differences.append(("global batch", _global_batch(*then), _global_batch(*now)))
    if differences:
        raise ConfigError(f"{what} with other settings: {describe_differences(differences)}. A run is continued "
                          "with the settings it was started with: give the same ones (keep the global batch by "
                          "changing batch_size with the number of ranks), or start a new run with --name NAME")


def _global_batch(batch_size: int, ranks: int, passes: int) -> str:
    passes_text = f" x backward_passes_per_step {passes}" if passes > 1 else ""
    return f"{batch_size * ranks * passes} (batch_size {batch_size} x {ranks} rank(s){passes_text})"


class Run:
    """One search (or dense training) run: built from a config, then `fit()`."""

    def __init__(self, cfg: Config, ctx, stop: StopRequests | None = None):
        self.ctx, self.stop = ctx, stop or StopRequests()
        # Every collective tells the watchdog what this rank waits in; fit() starts it (hang_timeout).
        self.watchdog = Watchdog(cfg.hang_timeout, rank_on_host(ctx.rank, ctx.size), last_words=self._record_hang)
        self.ctx = ctx = WatchedContext(ctx, self.watchdog)
        self.is_root = ctx.rank == 0
        self.record = None  # the archive's content (rank 0 writes it), from _set_up on
        # Several ranks: watched from their first collective on (start-up included); one process: in fit().
        heartbeats = ctx.size > 1 and cfg.hang_timeout > 0
        if ctx.size > 1:
            self.watchdog.start(start_up=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.lock = None  # rank 0: the run directory's lock, held until fit() ends
        self.run_log = None  # rank 0: the copy of its log in the run directory, kept until fit() ends

        def claim() -> Config:
            claimed, self.lock = claim_directory(cfg)
            if heartbeats:  # emptied before the other ranks know the directory: its files are this job's
                reset_heartbeats(claimed.run_dir())
            return claimed

        try:
            self.cfg = cfg = _on_root(ctx, "run_directory", claim)
        except BaseException:
            self.watchdog.stop()
            raise
        self.dir = cfg.run_dir()
        if heartbeats:  # whose heartbeat stopped: the watchdog's line names them (train/watchdog.py)
            self.watchdog.attach(Heartbeats(self.dir / HEARTBEAT_DIR, ctx.rank, ctx.size, socket.gethostname()))
        self.checkpoints = self.dir / "checkpoints"
        if self.is_root:
            self.run_log = RunLog(log, self.dir)
        try:
            self._set_up(cfg, ctx)
        except BaseException:
            self.watchdog.stop()
            self._release()
            raise

    def _set_up(self, cfg: Config, ctx) -> None:
        self.completed = _on_root(ctx, "completed_run", self._completed_result)
        if self.completed:
            return
        self.watchdog.progress("the start-up (building the data and the model)")
        self.run_started = time.monotonic()  # the progress lines' elapsed and left times are this process's
        self.epoch_seconds = None  # the wall time of the last whole epoch this process ran
        self.device = ctx.device(cfg.device)
        self.data = build_data(cfg, ctx.rank, ctx.size, self.device)
        torch.manual_seed(cfg.seed)  # the frozen weights and initial scores are a function of the seed
        model = model_from_config(cfg, self.data.in_channels, self.data.num_classes, self.data.image_size)
        if cfg.pretrained and resume_path(cfg.resume, self.checkpoints) is None:  # a fresh run starts from it
            from biprop_hpc.ticket.pretrained import load_pretrained
            load_pretrained(model, cfg.pretrained, quiet=not self.is_root)
        if cfg.sync_batchnorm:
            model = ctx.sync_batchnorm(model)
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Wrapped before any state is loaded: Horovod's wrapper is a new optimizer with empty state.
        self.optimizer = ctx.distributed_optimizer(make_optimizer(cfg, self.model), self.model,
                                                   cfg.fp16_allreduce, cfg.backward_passes_per_step)
        self.autocast = autocast_for(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
        global_batch = cfg.batch_size * ctx.size * cfg.backward_passes_per_step
        self.lr_scale = global_batch / cfg.lr_reference_batch if cfg.lr_reference_batch else 1.0
        self.state = {"epoch": 0, "step": 0, "history": {name: [] for name in METRICS}, "best_val_top1": None,
                      "best_epoch": -1, "start_time": now(), "restarts": [], "stop_reason": None}
        self.partial = None  # this rank's totals of an epoch interrupted mid-way (resume)
        self._resume()
        set_run_pruning(self.model, cfg, self.state["epoch"])  # global pruning: the counts the archive shows first
        self.first_epoch = self.state["epoch"]  # the first epoch this process runs
        self.record = RunRecord(self._attrs())
        self.next_heartbeat = 0.0
        self.writer = None
        if self.is_root:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.dir / "logs"))

    # --- set-up -----------------------------------------------------------------------------------
    def _completed_result(self) -> dict | None:
        """The final results of this run if its archive says it completed (a requeued job that is done)."""
        if not self.cfg.resume or not (self.dir / "archive.h5").exists():
            return None
        try:
            record = read_archive(self.dir / "archive.h5")
        except ArchiveError:
            return None
        if record.attrs.get("status") != "completed":
            return None
        refuse_other_settings(f"{self.dir} holds a completed run", record.config, record.attrs.get("world_size", 1),
                              self.cfg, self.ctx.size)
        return {**record.final, "run_dir": str(self.dir)}

    def _resume(self) -> None:
        """Rank 0 reads and checks the checkpoint; the model, optimizer, scaler and run state go to every
        rank, and each rank gets back its own part (RNG, BN statistics and partial totals of a mid-epoch
        checkpoint; from an end-of-epoch checkpoint of another number of ranks, rank 0's)."""
        shared = _on_root(self.ctx, "resume", self._read_checkpoint)
        self.ctx.broadcast_model(self.model)
        self.ctx.broadcast_optimizer(self.optimizer)
        if shared is None:
            return
        self.state = shared["state"]
        if self.scaler and shared["scaler"]:
            self.scaler.load_state_dict(shared["scaler"])
        ranks = shared["ranks"] or []
        if len(ranks) == self.ctx.size:
            self._restore_own(ranks[self.ctx.rank])
        elif ranks:  # end of an epoch (checked): BN statistics were averaged, every rank's are rank 0's
            self._restore_own(ranks[0])
        log.info("resumed from %s at epoch %d, step %d", shared["path"], self.state["epoch"] + 1,
                 self.state["step"])

    def _read_checkpoint(self) -> dict | None:
        """Rank 0: the checkpoint to continue from, checked and loaded into the model and optimizer; what
        every rank needs of it (None for a fresh run)."""
        path = resume_path(self.cfg.resume, self.checkpoints)
        if path is None:
            return None
        checkpoint = load_checkpoint(path)
        self._check_resumable(path, checkpoint)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        state["restarts"] = state.get("restarts", []) + [{
            "time": now(), "epoch": state["epoch"], "step": state.get("step", 0),
            "reason": state.get("stop_reason") or self._unrecorded_stop()}]
        state["stop_reason"] = None
        return {"state": {**self.state, **state}, "scaler": checkpoint.get("scaler"),
                "ranks": checkpoint.get("ranks"), "path": str(path)}

    def _check_resumable(self, path: Path, checkpoint: dict) -> None:
        stored, ranks = checkpoint["config"], len(checkpoint.get("ranks") or [None])
        refuse_other_settings(f"resume: {path} holds a run", stored, ranks, self.cfg, self.ctx.size)
        if checkpoint["state"].get("step", 0):  # mid-epoch: the epoch's sample plan must be the same
            then = (ranks, stored["batch_size"])
            if then != (self.ctx.size, self.cfg.batch_size):
                raise ConfigError(f"resume: {path} was written in the middle of an epoch by {then[0]} rank(s) "
                                  f"with batch_size {then[1]}, and that epoch's samples are divided among ranks "
                                  f"and steps that way: continue it with {then[0]} rank(s) and batch_size "
                                  f"{then[1]} (a checkpoint written at the end of an epoch continues with any)")

    def _unrecorded_stop(self) -> str:
        try:
            attrs = read_archive(self.dir / "archive.h5").attrs
        except ArchiveError:
            attrs = {}
        return attrs.get("end_reason") or UNRECORDED_STOPS.get(attrs.get("status", ""), "unknown (no archive)")

    def _own_state(self, totals=None, count: int = 0, seconds: float = 0.0) -> dict:
        """What differs between ranks: saved per rank in every checkpoint."""
        return {"rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                "batchnorm": [b.detach().cpu().clone() for b in batchnorm_statistics(self.model)],
                "partial": None if totals is None else {"totals": totals.cpu(), "count": count, "seconds": seconds}}

    def _restore_own(self, own: dict) -> None:
        torch.set_rng_state(own["rng"])
        if own.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"])
        with torch.no_grad():
            for buffer, saved in zip(batchnorm_statistics(self.model), own["batchnorm"]):
                buffer.copy_(saved)
        self.partial = own["partial"]

    def _attrs(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        return {"status": "running", "config": cfg.to_json(), "keep_ratio": cfg.keep_ratio,
                "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed, "epochs": cfg.epochs,
                "world_size": ctx.size, "launcher": ctx.launcher, "controller": ctx.controller,
                "loader": self.data.loader, "skipped_files": len(self.data.skipped), "job_id": scheduler_job_id(),
                "job_nodes": scheduler_nodes(), "start_time": self.state["start_time"], "end_time": "",
                "heartbeat": now(), **versions(ctx)}

    # --- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        if self.completed:
            if self.is_root:
                log.info("%s has completed already: test top1 %s (best epoch %s); nothing to do. To start another "
                         "run add --new-name (the next free %s_N) or --name NAME", self.dir,
                         _percent(self.completed.get("test_top1")), self.completed.get("best_epoch", "?"),
                         self.cfg.name)
            self.watchdog.stop()
            self._release()
            return self.completed
        try:
            self.watchdog.start(start_up=True)  # (several ranks: since __init__) up to the first collective of fit,
            self._announce()                    # which every rank reaches only once its start-up is done
            self.watchdog.start()
            if self.state["epoch"] == 0 and self.state["step"] == 0:
                self._checkpoint(["initial.pt"])
            self._write_archive("running")  # visible from the start, with this continuation's restart row
            for epoch in range(self.state["epoch"], self.cfg.epochs):
                self._epoch(epoch)
            return self._finish()
        except RunCheckpointed:
            raise
        except BaseException as error:
            self._write_archive("interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
            if self.run_log:  # the command line prints it on stderr after fit() has closed run.log
                what = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else "the run failed on rank 0:"
                self.run_log.write_only(logging.ERROR, what, sys.exc_info())
            raise
        finally:
            self.watchdog.stop()
            if self.writer:
                self.writer.close()
            self._release()

    def _announce(self) -> None:
        """Every rank: where it runs (host, local rank and size, device) to rank 0, which keeps it for the
        archive's /ranks table, opens run.log and logs the run's first line."""
        ctx = self.ctx
        places = ctx.gather_object((socket.gethostname(), ctx.local_rank, ctx.local_size, str(self.device)),
                                   name="hosts_and_devices")
        if self.is_root:
            self.record.ranks = [{"rank": rank, "host": host, "local_rank": local_rank, "local_size": local_size,
                                  "device": device}
                                 for rank, (host, local_rank, local_size, device) in enumerate(places)]
            places = [(host, device) for host, _, _, device in places]
            self.run_log.open()
            cfg = self.cfg
            log.info(start_line(self.dir, places, self.data.loader, len(self.data.train),
                                cfg.batch_size * self.ctx.size * cfg.backward_passes_per_step, cfg.epochs,
                                self.state["epoch"], self.state["step"], cfg.config_name))

    def _release(self) -> None:
        if self.run_log:
            self.run_log.close()
            self.run_log = None
        if self.lock:
            self.lock.release()
            self.lock = None

    def _epoch(self, epoch: int) -> None:
        cfg = self.cfg
        lr = self.lr_scale * lr_at_epoch(cfg.lr_schedule, cfg.lr, epoch, cfg.epochs, cfg.warmup_epochs,
                                         cfg.milestones, cfg.lr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        set_run_pruning(self.model, cfg, epoch)  # global pruning: the epoch's kept fraction (from the epoch alone)
        started = time.monotonic()
        train = self._train_epoch(epoch, progress_lines=self.is_root and not sys.stderr.isatty())
        self.ctx.average_batchnorm(self.model)
        self.watchdog.progress(f"validation after epoch {epoch + 1}")
        val = evaluate(self.model, self.data.val, self.device, self.ctx, self.autocast, self.watchdog.progress)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "epoch_seconds": train["seconds"], "images_per_second": train["count"] / train["seconds"]}
        for name in METRICS:
            self.state["history"][name].append(row[name])
        # each layer's kept fraction as validated (global pruning: from the final scores of the epoch)
        self.state.setdefault("kept_fraction", []).append({"epoch": epoch + 1,
                                                           "fractions": kept_fractions(self.model)})
        self.state["epoch"], self.state["step"] = epoch + 1, 0
        best = self.state["best_val_top1"]
        # Without a validation split the last epoch's model is the one tested. Global pruning: only an epoch that
        # keeps keep_ratio can be the best (the schedule's earlier epochs keep more).
        improved = at_target_keep_ratio(cfg, epoch) and (val["count"] == 0 or best is None or val["top1"] > best)
        if improved:
            self.state["best_val_top1"] = val["top1"] if val["count"] else None
            self.state["best_epoch"] = epoch + 1
        if val["count"] == 0 and epoch == self.first_epoch and self.is_root:
            log.warning("no validation split (val_fraction %g leaves no held-out sample): the last epoch's "
                        "model is tested and no best_val_top1 is reported", cfg.val_fraction)
        names = ["best.pt"] if improved else []
        if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
            names.append(f"epoch_{epoch + 1}.pt")
        self._checkpoint(names + ["last.pt"])  # last.pt last: it is what a resume reads
        if self.is_root:
            self._write_archive("running")
            for name, value in row.items():
                if name != "epoch":
                    self.writer.add_scalar(f"epoch/{name}", value, epoch + 1)
            log.info("epoch %d/%d  lr %.4g  train loss %.4f top1 %.2f  val loss %.4f top1 %.2f top5 %.2f  "
                     "%.1f s  %.0f img/s", epoch + 1, cfg.epochs, lr, row["train_loss"], row["train_top1"],
                     row["val_loss"], row["val_top1"], row["val_top5"], row["epoch_seconds"],
                     row["images_per_second"])
        self.epoch_seconds = time.monotonic() - started
        if self.ctx.any_async(self.stop.reason is not None, "stop_vote")():
            self._stopped(epoch + 1, 0)

    def _train_epoch(self, epoch: int, progress_lines: bool = False) -> dict:
        """One epoch's training steps; with `progress_lines` (rank 0, when no terminal shows the tqdm bar) a
        progress line every log_interval steps or log_seconds, whichever first."""
        model, optimizer, device = self.model, self.optimizer, self.device
        passes = self.cfg.backward_passes_per_step
        # Each loss is divided by the samples of its whole accumulation group (over all ranks), so a group
        # cut short at the end of an epoch weighs its samples as much as a full one.
        sizes = [global_size for _, global_size in self.data.train.steps(epoch)]
        steps, first = len(sizes), self.state["step"]
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct (this rank)
        count, seconds = 0, 0.0                                         # samples (this rank), time so far
        if self.partial:
            totals += self.partial["totals"].to(device)
            count, seconds = self.partial["count"], self.partial["seconds"]
            self.partial = None
        progress = None
        if progress_lines:
            progress = EpochProgress(epoch, self.cfg.epochs, sizes, first, self.cfg.log_interval,
                                     self.cfg.log_seconds, self.run_started, self.epoch_seconds, seconds)
        model.train()
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not (self.is_root and sys.stderr.isatty()))
        start = time.perf_counter()
        vote = None
        optimizer.zero_grad()
        self.watchdog.progress(f"training step {first + 1}/{steps} of epoch {epoch + 1} (data, forward, backward)")
        for step, batch in enumerate(self.data.train.epoch(epoch, first), start=first):
            group = step - step % passes
            group_end = min(group + passes, steps)
            images = to_device(batch.images, device)
            if batch.views is not None:  # AugMix's clean and two augmented views in one pass, as the original
                images = torch.cat([images, to_device(batch.views, device).flatten(0, 1)])
            if self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = to_device(batch.labels, device)
            with self.autocast():
                logits = model(images)
            if batch.views is None:
                loss_sum = self.criterion(logits.float(), labels)
            else:
                loss_sum = consistency_loss_sum(self.criterion, logits, labels, self.cfg.jsd_weight)
                logits = logits[:len(labels)]  # accuracy on the clean images
            loss = loss_sum / sum(sizes[group:group_end])
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            totals += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == labels).sum().double()])
            count += len(batch.labels)
            global_step = epoch * steps + step
            if self.writer and global_step % self.cfg.log_interval == 0:  # a host sync every log_interval steps
                self.writer.add_scalar("step/train_loss", loss_sum.item() / len(batch.labels), global_step)
            bar.update()
            if progress and progress.due(step + 1):  # a host sync, only on the steps that log a line
                log.info(progress.line(step + 1, totals[0].item() / count, optimizer.param_groups[0]["lr"]))
            if step + 1 == group_end:
                with self.watchdog.waiting(f"the optimizer step after step {step + 1}/{steps} of epoch {epoch + 1}"
                                           + (" (its gradient allreduce)" if self.ctx.size > 1 else "")):
                    self._optimizer_step()
                self._heartbeat()
                # The vote started at the previous boundary: every rank sees the same answer at this step.
                if vote is not None and vote():
                    bar.close()
                    self._stopped(epoch, step + 1, totals, count, seconds + time.perf_counter() - start)
                vote = self.ctx.any_async(self.stop.reason is not None, "stop_vote")
            self.watchdog.progress(f"training step {step + 2}/{steps} of epoch {epoch + 1} (data, forward, backward)")
        if vote is not None:
            vote()  # finish the collective; a stop asked for now is seen after the epoch's checkpoint
        bar.close()
        seconds += time.perf_counter() - start
        reduced = torch.cat([totals.cpu(), torch.tensor([count], dtype=torch.float64)])
        loss, correct, count = self.ctx.allreduce_sum(reduced, "train_totals").tolist()
        return {"loss": loss / count, "top1": 100 * correct / count, "count": count, "seconds": seconds}

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

    def _stopped(self, epoch: int, step: int, totals=None, count: int = 0, seconds: float = 0.0):
        """Every rank: checkpoint (mid-epoch when step > 0), mark the archive, and leave with RunCheckpointed."""
        reasons = self.ctx.gather_object(self.stop.reason, name="stop_reasons")
        reason = next((r for r in reasons if r), "a stop signal")
        if step:
            self.state["epoch"], self.state["step"] = epoch, step
        self.state["stop_reason"] = reason
        self._checkpoint(["last.pt"], self._own_state(totals, count, seconds))
        self._write_archive("checkpointed")
        self.ctx.allreduce_sum(torch.zeros(1), "checkpoint_written")  # no rank exits before rank 0 has written
        if self.is_root:
            log.warning("%s: checkpointed at epoch %d, step %d of %d; continue with --resume auto", reason,
                        self.state["epoch"] + 1, self.state["step"], len(self.data.train))
        raise RunCheckpointed(reason, self.state["epoch"], self.state["step"])

    def _finish(self) -> dict:
        """Evaluate the test set once, with the best checkpoint's model."""
        if self.is_root:
            best = load_checkpoint(self.checkpoints / "best.pt")
            self.model.load_state_dict(best["model"])
        self.ctx.broadcast_model(self.model)
        set_run_pruning(self.model, self.cfg, max(self.state["best_epoch"] - 1, 0))  # the best epoch's schedule
        self.watchdog.progress("the test evaluation")
        test = evaluate(self.model, self.data.test, self.device, self.ctx, self.autocast, self.watchdog.progress)
        final = {"best_epoch": self.state["best_epoch"], "test_loss": test["loss"], "test_top1": test["top1"],
                 "test_top5": test["top5"]}
        if self.state["best_val_top1"] is not None:
            final["best_val_top1"] = self.state["best_val_top1"]
        self.record.final = final
        self._write_archive("completed")
        if self.is_root:
            log.info("best epoch %d (val top1 %s): test top1 %.2f top5 %.2f on %d images -> %s",
                     self.state["best_epoch"], _percent(self.state["best_val_top1"]), test["top1"],
                     test["top5"], test["count"], self.dir / "archive.h5")
        return {**final, "run_dir": str(self.dir)}

    # --- files (rank 0 writes) --------------------------------------------------------------------
    def _checkpoint(self, filenames: list[str], own: dict | None = None) -> None:
        """Collective: gathers every rank's own state, then rank 0 writes `filenames` in order."""
        ranks = self.ctx.gather_object(own or self._own_state(), name="rank_states")
        if not self.is_root:
            return
        content = {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                   "optimizer": self.optimizer.state_dict(), "state": self.state, "ranks": ranks,
                   "scaler": self.scaler.state_dict() if self.scaler else None}
        for filename in filenames:
            self.watchdog.progress(f"writing checkpoint {filename}")
            save_checkpoint(self.checkpoints / filename, content)
        self.watchdog.progress("writing the archive after the checkpoints")

    def _write_archive(self, status: str, layers: bool = True) -> None:
        """Rank 0: the whole archive, rewritten (at every status change and epoch end, and as a heartbeat:
        then without recomputing the layer table, which reads every layer's alpha)."""
        if not self.is_root:
            return
        if layers:
            self.record.layers = layer_table(self.model)
        self.record.attrs["status"] = status
        self.record.attrs["heartbeat"] = now()
        if status in ("completed", "failed", "interrupted"):
            self.record.attrs["end_time"] = now()
        self.record.metrics = self.state["history"]
        self.record.kept_fraction = {"layers": [name for name, _ in biprop_layers(self.model)],
                                     "epochs": [row["epoch"] for row in self.state.get("kept_fraction", [])],
                                     "fractions": [row["fractions"] for row in self.state.get("kept_fraction", [])]}
        self.record.restarts = self.state["restarts"]
        write_archive(self.dir / "archive.h5", self.record)
        self.next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS

    def _record_hang(self, message: str) -> None:
        """The watchdog's last words (its thread; the main thread is blocked): rank 0 marks the archive failed
        with the reason and gives the run directory back. Another rank cannot: rank 0 owns the archive."""
        if self.is_root:
            if self.record is not None:  # None in start-up, before the archive is first written
                self.record.attrs["end_reason"] = message
                self._write_archive("failed", layers=False)
            self._release()

    def _heartbeat(self) -> None:
        """Within an epoch, between optimizer steps: the archive's heartbeat every HEARTBEAT_SECONDS, so a
        run in a long epoch is seen alive (and one whose heartbeat stops, as hung or dead)."""
        if self.is_root and time.monotonic() >= self.next_heartbeat:
            self._write_archive("running", layers=False)


def _on_root(ctx, name: str, compute):
    """`compute()` on rank 0, its result on every rank; or its bad-input error, raised on every rank as a
    CommonError, which rank 0 alone reports (cli.main)."""
    from biprop_hpc.config import CommonError
    outcome = None
    if ctx.rank == 0:
        try:
            outcome = ("value", compute())
        except (ConfigError, ValueError, FileNotFoundError) as error:
            outcome = ("error", str(error))
    kind, value = ctx.broadcast_object(outcome, name=name)
    if kind == "error":
        raise CommonError(value)
    return value


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def train(cfg: Config, ctx, stop: StopRequests | None = None) -> dict:
    return Run(cfg, ctx, stop).fit()


def evaluate_checkpoint(path: str, split: str, ctx, data_dir: str = "", device: str = "auto", scorer=None) -> dict:
    """Score a checkpoint's model on its dataset's `split` (test or val); or, given `scorer`, return
    scorer(model, data, cfg, device) (train/robustness.py: the corrupted test sets)."""
    checkpoint = load_checkpoint(Path(path))
    cfg = Config.from_dict({**checkpoint["config"], **({"data": data_dir} if data_dir else {})}, origin=str(path))
    target = ctx.device(device)
    data = build_data(cfg, ctx.rank, ctx.size, target)
    model = model_from_config(cfg, data.in_channels, data.num_classes, data.image_size)
    model.load_state_dict(checkpoint["model"])
    set_run_pruning(model, cfg, trained_epoch(checkpoint["state"]))
    if scorer is not None:
        return scorer(model.to(target), data, cfg, target)
    return evaluate(model.to(target), getattr(data, split), target, ctx, autocast_for(cfg, target))
