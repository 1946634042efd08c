"""The one place that talks to Horovod.

`init_distributed()` returns a context: `Local` for a single process started without a launcher (Horovod is
neither initialised nor needed), or `HorovodContext` when a launcher (mpirun, srun, jsrun, horovodrun) started
several ranks. The training loop only uses the context's methods and never imports horovod itself.
"""
from __future__ import annotations

import os

import torch
from torch.nn.modules.batchnorm import _BatchNorm

# Environment variables by which launchers tell a process how many ranks there are.
LAUNCHER_SIZE_VARS = (
    ("horovodrun", "HOROVOD_SIZE"),
    ("mpirun", "OMPI_COMM_WORLD_SIZE"),
    ("jsrun", "JSM_NAMESPACE_SIZE"),
    ("srun", "SLURM_STEP_NUM_TASKS"),
    ("mpirun", "PMI_SIZE"),
    ("mpirun", "PMIX_SIZE"),
)


# Variables of launchers this package does not support (torchrun / torch.distributed.launch and others that
# follow torch's env:// convention): their ranks would each run a world of size 1, all writing one run.
FOREIGN_LAUNCHER_VARS = ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "GROUP_RANK")
SUPPORTED_LAUNCHERS = "mpirun (Open MPI), srun --mpi=pmix (SLURM), jsrun (LSF), horovodrun, or flux run/submit"


class LauncherError(ValueError):
    """The process was started by a launcher whose ranks this package cannot join into one run."""


def detect_launcher(environ=os.environ) -> tuple[str, int]:
    """(launcher name, number of ranks) from the environment; ("none", 1) for a plain process.

    LauncherError when a launcher this package does not know started it: torchrun's variables (or
    WORLD_SIZE > 1) without the variables of a supported one.
    """
    for launcher, variable in LAUNCHER_SIZE_VARS:
        if environ.get(variable, "").isdigit() and int(environ[variable]) > 1:
            return launcher, int(environ[variable])
    foreign = [v for v in FOREIGN_LAUNCHER_VARS if environ.get(v)]
    if foreign and (environ.get("WORLD_SIZE", "1") != "1" or "TORCHELASTIC_RUN_ID" in foreign):
        raise LauncherError(f"started by a launcher biprop-hpc does not support ({', '.join(foreign)} set, as "
                            f"torchrun sets them): its ranks would not form one run. Use {SUPPORTED_LAUNCHERS}, "
                            "e.g. mpirun -np 2 biprop train ...; or start one process without a launcher")
    return "none", 1


# Environment variables holding the batch scheduler's job id (SLURM arrays: job id and task id).
JOB_ID_VARS = ("SLURM_JOB_ID", "LSB_JOBID", "FLUX_JOB_ID")


def scheduler_job_id(environ=os.environ) -> str:
    """The scheduler's id of the job this process runs in ("" outside a batch job); array jobs as ID_TASK.

    BIPROP_JOB_ID comes first: the job scripts (jobs/*.sh.j2) export the batch job's id as `biprop jobs`
    records it; under Flux the ranks' own FLUX_JOB_ID is that of the job the batch script started inside it.
    """
    if environ.get("BIPROP_JOB_ID"):
        return environ["BIPROP_JOB_ID"]
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    if environ.get("LSB_JOBID") and environ.get("LSB_JOBINDEX", "0") != "0":
        return f"{environ['LSB_JOBID']}[{environ['LSB_JOBINDEX']}]"
    return next((environ[v] for v in JOB_ID_VARS if environ.get(v)), "")


def scheduler_nodes(environ=os.environ) -> str:
    """Slurm's list of the job's nodes as it gives it (SLURM_JOB_NODELIST, e.g. "node[1-2]"); "" outside a
    Slurm job (the archive's /ranks table has every rank's host under any launcher)."""
    return environ.get("SLURM_JOB_NODELIST", "")


def select_device(preference: str, local_rank: int) -> torch.device:
    """CUDA device local_rank % visible GPUs (jsrun -g1 shows each rank one GPU), else the CPU.

    The device is also made the current one, so that nothing (CUDA contexts, unpinned allocations, NCCL)
    lands on GPU 0 of every rank.
    """
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def to_cpu(obj):
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU (for pickling to other ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def batchnorm_statistics(model) -> list[torch.Tensor]:
    """The running mean and variance buffers of every BN layer of `model` that tracks them."""
    return [buffer for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            for buffer in (m.running_mean, m.running_var)]


class _AllreduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the gradients (explicitly named collectives)."""

    @staticmethod
    def forward(ctx, tensor, allreduce, name):
        ctx.allreduce, ctx.name = allreduce, name
        return allreduce(tensor, f"{name}.forward")

    @staticmethod
    def backward(ctx, grad):
        return ctx.allreduce(grad.contiguous(), f"{ctx.name}.backward"), None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the GLOBAL batch (all ranks), on CPU and GPU.

    Each rank sums x and x^2 per channel (in float64) with its sample count; one allreduce gives the global
    mean and (biased) variance, used to normalise exactly as one process with the whole global batch would,
    and to update the running statistics (unbiased variance, as nn.BatchNorm). The allreduce is
    differentiable (its backward sums the gradients over ranks), so autograd gives the exact global-batch
    gradient. Evaluation uses the running statistics, as any BN. State dict keys are nn.BatchNorm's.
    (Horovod's own SyncBatchNorm is not used: it runs on CUDA tensors only.)
    """

    def __init__(self, bn: _BatchNorm, allreduce, name: str):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.to(next(bn.buffers(), torch.empty(0)).device)
        self._allreduce, self._name = allreduce, name

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        local = torch.cat([x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64), count])
        total = _AllreduceSum.apply(local, self._allreduce, self._name)
        channels, n = x.shape[1], total[-1]
        mean = total[:channels] / n
        var = total[channels:2 * channels] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class Local:
    """A single process: every collective is the identity."""
    rank, size, local_rank, local_size = 0, 1, 0, 1
    launcher, controller = "none", "none"

    def device(self, preference: str) -> torch.device:
        return select_device(preference, self.local_rank)

    def allreduce_sum(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return tensor

    def any_async(self, flag: bool, name: str):
        """Start a vote "does any rank say yes?"; returns a function that waits for the answer."""
        return lambda: flag

    def broadcast_object(self, obj, name: str):
        return obj

    def gather_object(self, obj, name: str) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def broadcast_model(self, model) -> None:
        pass

    def broadcast_optimizer(self, optimizer) -> None:
        pass

    def average_batchnorm(self, model) -> None:
        """Make every rank's BN running statistics the mean over ranks (in place)."""

    def sync_batchnorm(self, model):
        """`model` with its BN layers computing global-batch statistics (one process: as it is)."""
        return model

    def distributed_optimizer(self, optimizer, model, fp16_compression=False, backward_passes_per_step=1):
        return optimizer

    def horovod_version(self) -> str:
        return ""


class HorovodContext(Local):
    """Several ranks under Horovod (MPI or Gloo controller)."""

    def __init__(self, launcher: str, hang_timeout: float = 0.0):
        import horovod.torch as hvd  # imported only here: a single process does not need Horovod
        set_horovod_stall_check(hang_timeout)  # Horovod reads it in hvd.init only
        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        # This rank's index among the ranks on its host, and their number (Horovod splits the ranks by host).
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self.launcher = launcher
        self.controller = "mpi" if hvd.mpi_enabled() else "gloo" if hvd.gloo_enabled() else "unknown"

    def allreduce_sum(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def any_async(self, flag: bool, name: str):
        handle = self.hvd.allreduce_async(torch.tensor([int(flag)], dtype=torch.int32), op=self.hvd.Sum,
                                          name=name)
        return lambda: bool(self.hvd.synchronize(handle).item())

    def broadcast_object(self, obj, name: str):
        # Every rank must pass the same name, or Horovod waits forever.
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def gather_object(self, obj, name: str) -> list:
        return self.hvd.allgather_object(to_cpu(obj), name=name)

    def average_batchnorm(self, model) -> None:
        buffers = batchnorm_statistics(model)
        if not buffers:
            return
        flat = torch.cat([b.detach().flatten().double() for b in buffers])
        mean = self.hvd.allreduce(flat, op=self.hvd.Sum, name="batchnorm_statistics") / self.size
        with torch.no_grad():
            for buffer, values in zip(buffers, mean.split([b.numel() for b in buffers])):
                buffer.copy_(values.view_as(buffer))

    def sync_batchnorm(self, model):
        def allreduce(tensor, name):
            return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm) and not isinstance(child, SyncBatchNorm):
                    name = f"sync_bn.{parent_name}.{child_name}".replace("..", ".")
                    setattr(parent, child_name, SyncBatchNorm(child, allreduce, name))
        return model

    def broadcast_model(self, model) -> None:
        """Rank 0's parameters and buffers (frozen weights, scores, BN statistics) to every rank."""
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def broadcast_optimizer(self, optimizer) -> None:
        """Rank 0's optimizer state (e.g. momentum after a resume) to every rank.

        Not hvd.broadcast_optimizer_state: it initialises empty state with a zero-gradient step, which
        moves parameters under weight decay and advances Adam's step count.
        """
        # Pickled on the CPU: CUDA tensors would unpickle onto rank 0's GPU index on every rank;
        # load_state_dict moves the state to each parameter's device.
        state = self.hvd.broadcast_object(to_cpu(optimizer.state_dict()) if self.rank == 0 else None,
                                          root_rank=0, name="optimizer_state")
        if self.rank != 0:
            optimizer.load_state_dict(state)

    def distributed_optimizer(self, optimizer, model, fp16_compression=False, backward_passes_per_step=1):
        """Gradients are SUMMED across ranks: the loop divides each rank's loss by the global batch size."""
        compression = self.hvd.Compression.fp16 if fp16_compression else self.hvd.Compression.none
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=trainable, compression=compression,
                                             backward_passes_per_step=backward_passes_per_step,
                                             op=self.hvd.Sum)

    def horovod_version(self) -> str:
        import horovod
        return horovod.__version__


def horovod_stall_environment(hang_timeout: float) -> dict[str, str]:
    """Horovod's stall check for a run whose watchdog ends it after `hang_timeout` s (train/watchdog.py).

    Horovod (0.28.1, horovod/common/stall_inspector.cc) checks every HOROVOD_STALL_CHECK_TIME_SECONDS (default
    60, whole seconds) for tensors some ranks submitted and others did not for that long, and logs them with the
    missing ranks; a tensor seen before (in Horovod's response cache: every step's) is first taken out of the
    cache after that time, then reported after it again, so the warning can take 4 times as long. A sixth of the
    timeout (at most Horovod's 60, at least 1) makes it come before the watchdog ends the job. Its shutdown
    (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS) stays off: see train/watchdog.py.
    """
    if hang_timeout <= 0:
        return {}
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, min(60, int(hang_timeout / 6))))}


def set_horovod_stall_check(hang_timeout: float, environ=os.environ) -> None:
    """horovod_stall_environment into `environ`, except for a variable the user set already."""
    for variable, value in horovod_stall_environment(hang_timeout).items():
        environ.setdefault(variable, value)


def init_distributed(hang_timeout: float = 0.0) -> Local:
    """The context of this process; `hang_timeout` (the run's, > 0) sets Horovod's stall check from it."""
    launcher, size = detect_launcher()
    return HorovodContext(launcher, hang_timeout) if size > 1 else Local()
