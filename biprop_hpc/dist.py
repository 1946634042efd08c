"""The one place that talks to Horovod.

`init_distributed()` returns a context: `Local` for a single process started without a launcher (Horovod is
neither initialised nor needed), or `HorovodContext` when a launcher (mpirun, srun, jsrun, horovodrun) started
several ranks. The training loop only uses the context's methods and never imports horovod itself.
"""
from __future__ import annotations

import os

import torch

# Environment variables by which launchers tell a process how many ranks there are.
LAUNCHER_SIZE_VARS = (
    ("horovodrun", "HOROVOD_SIZE"),
    ("mpirun", "OMPI_COMM_WORLD_SIZE"),
    ("jsrun", "JSM_NAMESPACE_SIZE"),
    ("srun", "SLURM_STEP_NUM_TASKS"),
    ("mpirun", "PMI_SIZE"),
    ("mpirun", "PMIX_SIZE"),
)


def detect_launcher(environ=os.environ) -> tuple[str, int]:
    """(launcher name, number of ranks) from the environment; ("none", 1) for a plain process."""
    for launcher, variable in LAUNCHER_SIZE_VARS:
        if environ.get(variable, "").isdigit() and int(environ[variable]) > 1:
            return launcher, int(environ[variable])
    return "none", 1


def select_device(preference: str, local_rank: int) -> torch.device:
    """CUDA device local_rank % visible GPUs (jsrun -g1 shows each rank one GPU), else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


class Local:
    """A single process: every collective is the identity."""
    rank, size, local_rank = 0, 1, 0
    launcher, controller = "none", "none"

    def device(self, preference: str) -> torch.device:
        return select_device(preference, self.local_rank)

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj, name: str):
        return obj

    def broadcast_model(self, model) -> None:
        pass

    def broadcast_optimizer(self, optimizer) -> None:
        pass

    def distributed_optimizer(self, optimizer, model, fp16_compression=False, backward_passes_per_step=1):
        return optimizer

    def horovod_version(self) -> str:
        return ""


class HorovodContext(Local):
    """Several ranks under Horovod (MPI or Gloo controller)."""

    def __init__(self, launcher: str):
        import horovod.torch as hvd  # imported only here: a single process does not need Horovod
        hvd.init()
        self.hvd = hvd
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.launcher = launcher
        self.controller = "mpi" if hvd.mpi_enabled() else "gloo" if hvd.gloo_enabled() else "unknown"

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum)

    def broadcast_object(self, obj, name: str):
        # Every rank must pass the same name, or Horovod waits forever.
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def broadcast_model(self, model) -> None:
        """Rank 0's parameters and buffers (frozen weights, scores, BN statistics) to every rank."""
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def broadcast_optimizer(self, optimizer) -> None:
        """Rank 0's optimizer state (e.g. momentum after a resume) to every rank.

        Not hvd.broadcast_optimizer_state: it initialises empty state with a zero-gradient step, which
        moves parameters under weight decay and advances Adam's step count.
        """
        state = self.hvd.broadcast_object(optimizer.state_dict() if self.rank == 0 else None,
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


def init_distributed() -> Local:
    launcher, size = detect_launcher()
    return HorovodContext(launcher) if size > 1 else Local()
