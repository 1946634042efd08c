"""Scaling past this machine: a latency-bandwidth MODEL of ring allreduce, fitted to Horovod allreduce times
MEASURED here, and a MODEL projection of WRN-50-2 images/s on 1-256 nodes x 4 GPUs.

MEASURED (this machine, under a real `mpirun -np N`, N in --ranks, Horovod's MPI controller, --threads torch
threads per rank; per rank the fastest of the repeats -- the least disturbed by other work on the shared
cores -- then the maximum over ranks; medians too, in the JSON file):
  - the step of a small BIPROP model (--model at --batch images per rank, 3x32x32): forward, backward and SGD
    without an allreduce (compute), and the same with Horovod's DistributedOptimizer (op Sum, as training
    uses it: the score gradient allreduced);
  - hvd.allreduce (op Sum) of one tensor of each of --sizes elements and of the WRN-50-2 score gradient
    (68,814,016 scores, counted with the repo's model builder), as fp32, with hvd.Compression.fp16 (cast,
    allreduce in half, cast back), already in half (the wire cost of fp16 or bf16), and, for comparison, a
    plain MPI_Allreduce of the fp32 buffer through mpi4py (no Horovod). bf16 is not measured: Horovod 0.28.1
    allreduces only double, float, half, int and long tensors (a bfloat16 tensor raises "Tensor type
    torch.BFloat16Tensor is not supported"; hvd.Compression has only `none` and `fp16`).
  - ACROSS NODES: the WRN-50-2 score gradient's allreduce (fp32, half tensor, mpi4py fp32) with 2 + 2 ranks on
    the two nodes of tests/netns_cluster.py (network namespaces, one slurmd each; `srun --mpi=pmix`; between
    the nodes TCP over veth pairs and a bridge, within a node shared memory), beside the 4 ranks on one node
    above. Needs root (`ip netns`) and Slurm's daemons; otherwise skipped, the reason in the output.
  The ring model t(n bytes, p ranks) = 2(p-1)/p * n/B + 2(p-1) * alpha is fitted (alpha, B) to the p > 1
  times of each variant by least squares on relative error (t spans 4 orders of magnitude); p = 1 is zero in
  the model (what Horovod spends there is copies and its background cycle) and is shown, not fitted.

MODEL (nothing of it is measured; every input is a stated assumption or a cited figure: the constants below and
README "Scaling (a model)"): per-GPU compute time of WRN-50-2 from bench/results, a per-step allreduce of
the score gradient as Horovod would run it (per-layer messages or fused up to its threshold; flat ring or
hierarchical), and step = compute + max(0, allreduce - hide * compute).

  python bench/scaling.py                      # measure (ranks 1,2,4 and 2+2 across nodes; 3-6 min here, by
                                               # load) and project; writes bench/results/<date>-scaling/
                                               # (never over a run); --no-nodes: not across nodes
  python bench/scaling.py --model-only         # the projection alone (seconds; files only with --out)
  python bench/scaling.py --ranks 1,2 --sizes 1024,1048576 --repeats 3 --batch 8 --out /tmp/s   # smoke test
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # _timing, cpu_step beside this file
from _timing import mpirun_prefix, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE", "PMIX_RANK")
RESULT = "RESULT "

# ------------------------------------------------------------------------------------- cited inputs
# Per-GPU step of WRN-50-2, BIPROP, at the ImageNet recipe's per-GPU batch (configs/imagenet/_base.yaml:
# batch_size 128 per GPU, amp bf16, channels_last): the H200 row of this log (an H200 is an H100's GH100
# compute with faster memory; the only H100 WRN-50-2 figure, h100-2026-11-26/wrn.log, is at batch 64 with
# the mask code of before: 1032 img/s, --gpu-img-s 1032 --gpu-batch 64). tests/test_scaling.py checks that
# the log holds this figure.
GPU_STEP_LOG = "bench/results/h200-2026-11-29/gpu_step_layerwise.log"
GPU_STEP_ROW = ("wide_resnet50_2", 128, "bf16+CL")
GPU_IMG_S = 2175.0
GPU_BATCH = 128
WRN_MODEL = "wide_resnet50_2"
MIB = 1024 * 1024
HOROVOD_FUSION_BYTES = 128 * MIB   # Horovod >= 0.21 default (horovodrun --help in 0.28.1: "default: 128");
                                   # its docs page tensor-fusion.rst still says 64 MB


@dataclasses.dataclass(frozen=True)
class Network:
    """A node's links to the other nodes: `nics` NICs of `nic_gbit_s` Gb/s each (per direction, nominal data
    rate), and `alpha_s` seconds per network step of a ring."""
    name: str
    nics: int
    nic_gbit_s: float
    alpha_s: float

    @property
    def node_bytes_s(self) -> float:
        return self.nics * self.nic_gbit_s * 1e9 / 8


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """Inside a node: `gpus` GPUs on NVLink (`nvlink_bytes_s` per GPU per direction, `nvlink_alpha_s` per ring
    step), and the GPU<->host copies of Horovod's hierarchical allreduce at `host_copy_bytes_s`."""
    gpus: int = 4
    nvlink_bytes_s: float = 450e9       # H100 SXM: NVLink 4, 18 links, 900 GB/s both directions together
    nvlink_alpha_s: float = 3.4e-6      # NCCL src/graph/tuning.cc hwLat, NVLink, Ring/Simple
    host_copy_bytes_s: float = 50e9     # assumed: PCIe Gen5 x16 is ~63 GB/s per direction, nominal


# alpha: NCCL's own model of one network step of a ring (src/graph/tuning.cc hwLat NET Ring/Simple: 9.6 us in
# NCCL 2.7, 14 us in recent releases) -- software and protocol, larger than the wire latency of either link
# (about 1-2 us, an assumption here). The same for both networks: an assumption, change with --alpha-net-us.
NETWORKS = {
    "edr": Network("2 x 100 Gb/s InfiniBand EDR", nics=2, nic_gbit_s=100.0, alpha_s=10e-6),
    "slingshot": Network("4 x 200 Gb/s Slingshot", nics=4, nic_gbit_s=200.0, alpha_s=10e-6),
}


# ------------------------------------------------------------------------------------------- the model

def ring_allreduce_s(n_bytes: float, ranks: int, bandwidth: float, alpha: float) -> float:
    """Ring allreduce of n_bytes over `ranks` ranks, links of `bandwidth` bytes/s and `alpha` s per step:
    2(p-1) steps (reduce-scatter, then allgather), each moving n/p bytes over every link."""
    if ranks < 1 or int(ranks) != ranks:
        raise ValueError(f"ranks must be a whole number >= 1, got {ranks!r}")
    if bandwidth <= 0 or alpha < 0 or n_bytes < 0:
        raise ValueError(f"need bandwidth > 0, alpha >= 0, n_bytes >= 0; got {bandwidth!r}, {alpha!r}, "
                         f"{n_bytes!r}")
    return 2 * (ranks - 1) / ranks * n_bytes / bandwidth + 2 * (ranks - 1) * alpha


@dataclasses.dataclass(frozen=True)
class Fit:
    alpha_s: float
    bandwidth: float        # bytes/s
    residuals: list         # (model - measured) / measured, in the order of the samples


def fit_ring(samples) -> Fit:
    """Least-squares fit of ring_allreduce_s to samples (n_bytes, ranks, seconds), ranks > 1, minimising the
    relative error: t/t_i = alpha * 2(p-1)/t_i + (1/B) * 2(p-1)/p * n/t_i, linear in (alpha, 1/B)."""
    import numpy as np
    rows = [(n, p, t) for n, p, t in samples]
    if any(p < 2 for _, p, _ in rows):
        raise ValueError("fit_ring takes ranks >= 2 only: the ring model is zero at one rank")
    if len({(n, p) for n, p, _ in rows}) < 2 or any(t <= 0 for _, _, t in rows):
        raise ValueError("fit_ring needs at least two different (n_bytes, ranks) points with times > 0")
    a = np.array([[2 * (p - 1) / t, 2 * (p - 1) / p * n / t] for n, p, t in rows], dtype=float)
    (alpha, inv_bandwidth), *_ = np.linalg.lstsq(a, np.ones(len(rows)), rcond=None)
    bandwidth = 1 / inv_bandwidth if inv_bandwidth > 0 else math.inf
    model = [2 * (p - 1) * alpha + 2 * (p - 1) / p * n * inv_bandwidth for n, p, _ in rows]
    return Fit(float(alpha), float(bandwidth), [(m - t) / t for m, (_, _, t) in zip(model, rows)])


def fuse(sizes_bytes, threshold_bytes: float) -> list:
    """Horovod's tensor fusion when all tensors are ready at once: tensors in order, packed into one buffer
    until the next would pass the threshold; a tensor larger than the threshold goes alone. 0 = no fusion."""
    if threshold_bytes < 0:
        raise ValueError(f"fusion threshold must be >= 0 bytes (0 disables fusion), got {threshold_bytes!r}")
    messages, current = [], 0
    for size in sizes_bytes:
        if current and current + size > threshold_bytes:
            messages.append(current)
            current = 0
        current += size
    if current:
        messages.append(current)
    return messages


@dataclasses.dataclass(frozen=True)
class Cost:
    """Seconds of one allreduce (or a step's), by term."""
    bandwidth_s: float = 0.0
    latency_s: float = 0.0
    copy_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.bandwidth_s + self.latency_s + self.copy_s

    def __add__(self, other):
        return Cost(self.bandwidth_s + other.bandwidth_s, self.latency_s + other.latency_s,
                    self.copy_s + other.copy_s)


def flat_allreduce(n_bytes: float, nodes: int, node: NodeSpec, net: Network) -> Cost:
    """One ring over all nodes x gpus ranks (Horovod with NCCL, not hierarchical). Assumed: NCCL runs one ring
    per NIC, so the node's whole injection bandwidth carries the ring's network hops (NVLink, 18-72x faster
    per GPU, is never the bottleneck); of the 2(P-1) steps, 2(nodes-1) cross the network (NCCL's count)."""
    ranks = nodes * node.gpus
    if nodes == 1:
        return Cost(2 * (ranks - 1) / ranks * n_bytes / node.nvlink_bytes_s, 2 * (ranks - 1) * node.nvlink_alpha_s)
    network_steps = 2 * (nodes - 1)
    return Cost(2 * (ranks - 1) / ranks * n_bytes / net.node_bytes_s,
                network_steps * net.alpha_s + (2 * (ranks - 1) - network_steps) * node.nvlink_alpha_s)


def hierarchical_allreduce(n_bytes: float, nodes: int, node: NodeSpec, net: Network) -> Cost:
    """Horovod's HOROVOD_HIERARCHICAL_ALLREDUCE with NCCL (horovod/common/ops/nccl_operations.cc,
    NCCLHierarchicalAllreduce): NCCL reduce-scatter inside the node (NVLink), each local rank copies its n/g
    share to the host, MPI_Allreduce across the nodes (the g local ranks in parallel, each on its share of the
    node's NICs), copy back, NCCL allgather inside the node."""
    g = node.gpus
    share = n_bytes / g
    inside = Cost(2 * (g - 1) / g * n_bytes / node.nvlink_bytes_s, 2 * (g - 1) * node.nvlink_alpha_s)
    copies = Cost(copy_s=2 * share / node.host_copy_bytes_s)
    across = Cost(2 * (nodes - 1) / nodes * share / (net.node_bytes_s / g), 2 * (nodes - 1) * net.alpha_s)
    return inside + copies + across


ALGORITHMS = {"flat": flat_allreduce, "hierarchical": hierarchical_allreduce}


def step_allreduce(layer_elements, bytes_per_element: int, threshold_bytes: float, nodes: int, node: NodeSpec,
                   net: Network, algorithm: str) -> tuple:
    """(Cost, number of messages) of one step's gradient allreduce: the layers' gradients in backward order
    (last layer first), fused up to threshold_bytes, each message allreduced in turn."""
    sizes = [n * bytes_per_element for n in reversed(list(layer_elements))]
    messages = fuse(sizes, threshold_bytes)
    total = Cost()
    for message in messages:
        total = total + ALGORITHMS[algorithm](message, nodes, node, net)
    return total, len(messages)


def step_s(compute_s: float, comm_s: float, hide: float) -> float:
    """A data-parallel step: compute, then the allreduce less what hides behind backward. `hide` is the
    fraction of the compute time the allreduce may overlap (0: none)."""
    if not 0 <= hide < 1:
        raise ValueError(f"hide (overlap) must be in [0, 1), got {hide!r}")
    return compute_s + max(0.0, comm_s - hide * compute_s)


def project(layer_elements, *, compute_s: float, batch: int, nodes: int, node: NodeSpec, net: Network,
            algorithm: str, bytes_per_element: int, threshold_bytes: float, hide: float) -> dict:
    """images/s and parallel efficiency (against nodes x gpus GPUs that never communicate) of one setting."""
    cost, messages = step_allreduce(layer_elements, bytes_per_element, threshold_bytes, nodes, node, net,
                                    algorithm)
    step = step_s(compute_s, cost.total_s, hide)
    return {"nodes": nodes, "gpus": nodes * node.gpus, "algorithm": algorithm, "bytes_per_element": bytes_per_element,
            "threshold_bytes": threshold_bytes, "hide": hide, "messages": messages,
            "bandwidth_ms": 1e3 * cost.bandwidth_s, "latency_ms": 1e3 * cost.latency_s, "copy_ms": 1e3 * cost.copy_s,
            "allreduce_ms": 1e3 * cost.total_s, "step_ms": 1e3 * step,
            "images_s": nodes * node.gpus * batch / step, "efficiency": compute_s / step}


def wrn_layer_elements() -> list:
    """Scores per BIPROP layer of WRN-50-2 (ImageNet input), in forward order, from the repo's model builder
    (on the meta device: no memory, no random numbers). The ImageNet configs train only these (BN non-affine)."""
    import torch
    from biprop_hpc.models import LayerBuilder, build_model
    from biprop_hpc.models.registry import INPUTS, MADE_FOR
    from biprop_hpc.nn import biprop_layers
    in_channels, image_size, num_classes = INPUTS[MADE_FOR[WRN_MODEL]]
    with torch.device("meta"):
        model = build_model(WRN_MODEL, LayerBuilder(), in_channels=in_channels, num_classes=num_classes,
                            image_size=image_size)
    return [layer.scores.numel() for _, layer in biprop_layers(model)]


# The columns of the projection: (label, algorithm, bytes per element, fusion threshold, hide).
VARIANTS = [
    ("flat fp32 per-layer", "flat", 4, 0, 0.0),
    ("flat fp32 fused", "flat", 4, HOROVOD_FUSION_BYTES, 0.0),
    ("flat fp16/bf16 fused", "flat", 2, HOROVOD_FUSION_BYTES, 0.0),
    ("hier fp32 fused", "hierarchical", 4, HOROVOD_FUSION_BYTES, 0.0),
    ("hier fp16/bf16 fused", "hierarchical", 2, HOROVOD_FUSION_BYTES, 0.0),
    ("hier fp16/bf16 fused, overlap", "hierarchical", 2, HOROVOD_FUSION_BYTES, None),   # None: --hide, in the label
]
NODE_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# Overlap of the last column (assumed): the allreduce hides behind 20% of the per-GPU step. Backward is roughly
# 40% of a BIPROP step on the H200 (the step less the masks' 21.6 ms of gpu_step_layerwise.log is forward and
# backward; backward taken as 2/3 of it), and Horovod's hooks see each score gradient as backward makes it
# (biprop_hpc/nn/engine.py); 0.2 is about half of backward.
HIDE = 0.2


def projections(layers, args, node: NodeSpec, networks: dict) -> list:
    compute_s = args.gpu_batch / args.gpu_img_s
    rows = []
    for key, net in networks.items():
        for nodes in NODE_COUNTS:
            for label, algorithm, width, threshold, hide in VARIANTS:
                threshold = threshold if threshold == 0 else args.fusion_mb * MIB
                row = project(layers, compute_s=compute_s, batch=args.gpu_batch, nodes=nodes, node=node, net=net,
                              algorithm=algorithm, bytes_per_element=width, threshold_bytes=threshold,
                              hide=args.hide if hide is None else hide)
                name = label if hide is not None else f"{label} {100 * args.hide:.0f}%"
                rows.append({"network": key, "variant": name, **row})
    return rows


# ------------------------------------------------------------------------------------------ measuring

SWEEP_VARIANTS = ("fp32", "fp16 compression", "half tensor", "mpi4py fp32")
WIRE_BYTES = {"fp32": 4, "fp16 compression": 2, "half tensor": 2, "mpi4py fp32": 4}
# Across the namespace nodes: the score gradient only, in the variants that differ in what crosses the link
# (fp16 compression sends what the half tensor does, plus casts on each rank: measured on one node above).
NODE_VARIANTS = ("fp32", "half tensor", "mpi4py fp32")
NODES, RANKS_PER_NODE = 2, 2


def repeats_for(n_bytes: int, repeats: int) -> int:
    """Fewer repeats for big messages, so a run stays within minutes on 2 cores."""
    return repeats if n_bytes <= 4 * MIB else max(3, repeats // 3) if n_bytes <= 64 * MIB else 2


def worker(args):
    import numpy as np
    import torch
    from mpi4py import MPI

    from biprop_hpc.dist import HorovodContext

    torch.set_num_threads(args.threads)
    ctx = HorovodContext("mpirun")   # also with 1 rank, so Horovod itself is timed
    hvd = ctx.hvd
    comm = MPI.COMM_WORLD

    def timed(fn) -> float:
        hvd.barrier()                # all ranks start together; not inside the timed region
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    if args.scores_only:  # across nodes: the score gradient's allreduce alone
        steps, trainable = {}, 0
    else:
        steps, trainable = measure_steps(args, ctx, timed)

    # (2) allreduce of one tensor per size and variant
    sizes = [args.score_elements] if args.scores_only else \
        [int(s) for s in args.sizes.split(",")] + [args.score_elements]
    wanted = NODE_VARIANTS if args.scores_only else SWEEP_VARIANTS
    sweep = {}
    for numel in sizes:
        x32 = torch.randn(numel)
        x16 = x32.half()
        out = np.empty(numel, dtype=np.float32)
        variants = {
            "fp32": lambda: hvd.allreduce(x32, op=hvd.Sum, name=f"fp32_{numel}"),
            "fp16 compression": lambda: hvd.allreduce(x32, op=hvd.Sum, name=f"fp16c_{numel}",
                                                      compression=hvd.Compression.fp16),
            "half tensor": lambda: hvd.allreduce(x16, op=hvd.Sum, name=f"half_{numel}"),
            "mpi4py fp32": lambda: comm.Allreduce(x32.numpy(), out, op=MPI.SUM),
        }
        repeats = repeats_for(4 * numel, args.repeats)
        for name in wanted:
            times = [timed(variants[name]) for _ in range(args.warmup + repeats)][args.warmup:]
            sweep[f"{name}|{numel}"] = times

    # Per rank: the fastest of the repeats (the one least disturbed by other work on the shared cores) and
    # the median; then, of each, the maximum over ranks (the slowest rank decides).
    mine = {key: (min(times), statistics.median(times)) for key, times in {**steps, **sweep}.items()}
    every_rank = hvd.allgather_object((socket.gethostname(), mine), name="timings")
    hosts = [host for host, _ in every_rank]
    every_rank = [timings for _, timings in every_rank]
    fastest = {key: max(m[key][0] for m in every_rank) for key in mine}
    median = {key: max(m[key][1] for m in every_rank) for key in mine}
    if hvd.rank() != 0:
        return
    result = {"ranks": hvd.size(), "hosts": hosts, "controller": ctx.controller, "threads": args.threads,
              "model": args.model, "batch": args.batch, "trainable": trainable}
    for suffix, of in (("ms", fastest), ("median_ms", median)):
        if steps:
            result.update({f"compute_{suffix}": 1e3 * of["compute"], f"distributed_{suffix}": 1e3 * of["distributed"]})
        result[f"allreduce_{suffix}"] = {name: {str(numel): 1e3 * of[f"{name}|{numel}"] for numel in sizes}
                                         for name in wanted}
    print(RESULT + json.dumps(result), flush=True)


def measure_steps(args, ctx, timed) -> tuple[dict, int]:
    """The step's times (compute only; with Horovod's allreduce) per repeat, and the model's score count."""
    import torch
    from torch import nn

    from biprop_hpc.models import LayerBuilder, build_model
    from cpu_step import make_step

    # (1) the step: compute only (cpu_step.make_step: forward, backward, SGD) and with Horovod's allreduce
    _, compute_step = make_step(args.model, "biprop", 0.5, args.batch)
    torch.manual_seed(0)
    model = build_model(args.model, LayerBuilder(keep_ratio=0.5, layer_type="biprop"), in_channels=3,
                        num_classes=10, image_size=32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ctx.distributed_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4), model)
    criterion = nn.CrossEntropyLoss()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def distributed_step():
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()             # Horovod's: waits for the allreduce of every score gradient

    steps = {"compute": [], "distributed": []}
    for round_ in range(args.warmup + args.step_repeats):
        for name, fn in (("compute", compute_step), ("distributed", distributed_step)):
            t = timed(fn)
            if round_ >= args.warmup:
                steps[name].append(t)

    return steps, sum(p.numel() for p in params)


def launch(args, score_elements: int) -> list:
    results = []
    for n in [int(v) for v in args.ranks.split(",")]:
        prefix, env = mpirun_prefix(n, ": install Open MPI (env/install.sh), or run with --model-only")
        command = [*prefix, sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                   "--score-elements", str(score_elements)]
        print(f"running {n} rank(s): {' '.join(command)}", flush=True)
        started, load_before = time.perf_counter(), os.getloadavg()[0]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode != 0 or not lines:
            sys.exit(f"{n} rank(s) failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        # the machine's 1-minute load average before and after: other work shares the cores
        results.append({**json.loads(lines[-1][len(RESULT):]), "seconds": time.perf_counter() - started,
                        "load_average": [load_before, os.getloadavg()[0]]})
        print(f"  done in {results[-1]['seconds']:.0f} s", flush=True)
    return results


def launch_across_nodes(args, score_elements: int) -> dict:
    """The score gradient's allreduce with NODES x RANKS_PER_NODE ranks on the namespace nodes of
    tests/netns_cluster.py (the worker under `srun --mpi=pmix`); {"skipped": why} where they cannot be made."""
    sys.path.insert(0, str(REPO / "tests"))   # the test suite's cluster fixture, a context manager
    from netns_cluster import NamespacesUnavailable, check_namespaces, netns_cluster
    from slurm_cluster import SlurmStartError, SlurmUnavailable
    try:
        check_namespaces()
    except NamespacesUnavailable as why:
        print(f"across nodes: skipped: {why}", flush=True)
        return {"skipped": str(why)}
    command = ["srun", "--mpi=pmix", f"--nodes={NODES}", f"--ntasks-per-node={RANKS_PER_NODE}", sys.executable,
               os.path.abspath(__file__), "--scores-only", "--score-elements", str(score_elements),
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="biprop-scaling-") as tmp, \
                netns_cluster(tmp, nodes=NODES, cpus=RANKS_PER_NODE) as cluster:
            print(f"running {NODES} x {RANKS_PER_NODE} ranks on {', '.join(cluster.nodes)} (network namespaces, "
                  f"subnet {cluster.subnet}): {' '.join(command)}", flush=True)
            done = cluster.run(*command, timeout=600, cwd=str(REPO))
    except (NamespacesUnavailable, SlurmUnavailable, SlurmStartError) as why:
        print(f"across nodes: skipped: {why}", flush=True)
        return {"skipped": str(why)}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        sys.exit(f"{NODES} x {RANKS_PER_NODE} ranks across nodes failed (exit {done.returncode}):\n{done.stdout}\n"
                 f"{done.stderr}")
    result = {**json.loads(lines[-1][len(RESULT):]), "seconds": time.perf_counter() - started,
              "load_average": [load_before, os.getloadavg()[0]]}
    print(f"  done in {result['seconds']:.0f} s (the cluster's start and stop included)", flush=True)
    return result


def fits_of(results) -> dict:
    """Per sweep variant: the ring model fitted to the p > 1 times (wire bytes = elements x bytes each)."""
    fits = {}
    for variant in SWEEP_VARIANTS:
        samples = [(int(numel) * WIRE_BYTES[variant], r["ranks"], ms / 1e3)
                   for r in results if r["ranks"] > 1 for numel, ms in r["allreduce_ms"][variant].items()]
        if len({(n, p) for n, p, _ in samples}) >= 2:
            fits[variant] = (fit_ring(samples), samples)
    return fits


# ------------------------------------------------------------------------------------------ reporting

def across_nodes_report(results, across: dict, fits, score_elements: int) -> list:
    """Blocks of the MEASURED across-nodes part: the score gradient's allreduce on one node and on two."""
    if "skipped" in across:
        return [("text", f"MEASURED across nodes: not measured here ({across['skipped']}).")]
    score = str(score_elements)
    one_node = next((r for r in results if r["ranks"] == across["ranks"]), None)
    placement = ", ".join(f"{host} x {across['hosts'].count(host)}" for host in dict.fromkeys(across["hosts"]))
    rows = []
    for variant in NODE_VARIANTS:
        here = across["allreduce_ms"][variant][score]
        there = one_node["allreduce_ms"][variant][score] if one_node else None
        fit = fits.get(variant, (None,))[0]
        model = 1e3 * ring_allreduce_s(score_elements * WIRE_BYTES[variant], across["ranks"], fit.bandwidth,
                                       fit.alpha_s) if fit else None
        rows.append([variant, f"{score_elements * WIRE_BYTES[variant] / 1e6:.0f}",
                     "-" if there is None else f"{there:.0f}", f"{here:.0f}",
                     "-" if there is None else f"{here / there:.2f}", "-" if model is None else f"{model:.0f}"])
    text = (f"MEASURED across nodes: allreduce (op Sum) of the WRN-50-2 score gradient by {across['ranks']} ranks, "
            f"{placement} (tests/netns_cluster.py: network namespaces of this machine, srun --mpi=pmix; between "
            f"the nodes TCP over veth pairs and a bridge, within a node shared memory; the same 2 cores), beside "
            f"the {across['ranks']} ranks on one node above; MODEL = the one-node fit's ring")
    return [("text", text), ("table", ["variant", "wire MB", f"{across['ranks']} ranks, one node ms",
                                       f"{placement} ms", "two nodes / one", "MODEL ms"], rows, ["s"] * 6)]


def measured_report(results, fits, score_elements: int, across: dict | None = None) -> list:
    """Blocks ("text" or "table", text) of the MEASURED part (`across`: launch_across_nodes's result, shown
    before the fit table, which stays the last block)."""
    out = []
    say, show = (lambda text: out.append(("text", text))), (lambda *table_: out.append(("table", *table_)))
    first = results[0]
    loads = ", ".join(f"{r['ranks']} rank(s) {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}"
                      for r in results)
    say(f"MEASURED on this machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"shared with other work (1-minute load average before -> after each run: {loads}), Open MPI under "
        f"mpirun --oversubscribe, Horovod {first['controller']} controller, {first['threads']} torch thread(s) per "
        "rank; per rank the fastest of the repeats (medians in scaling.json), the maximum over ranks. Other work "
        "and more ranks than cores make the ranks take turns: noisy numbers, read them to tens of percent.")
    say("")
    rows = []
    for r in results:
        p = r["ranks"]
        fit = fits.get("fp32", (None,))[0]
        predicted = r["compute_ms"] + (1e3 * ring_allreduce_s(4 * r["trainable"], p, fit.bandwidth, fit.alpha_s)
                                       if fit and p > 1 else 0.0)
        rows.append([str(p), r["compute_ms"], r["distributed_ms"],
                     f"{100 * (r['distributed_ms'] - r['compute_ms']) / r['distributed_ms']:.1f}%", predicted])
    say(f"MEASURED step of {first['model']} BIPROP (keep 0.5), batch {first['batch']} per rank, "
               f"{first['trainable'] / 1e6:.2f}M scores; MODEL = compute + ring(fp32 score gradient, fitted alpha, B)")
    show(["ranks", "compute ms (MEASURED)", "with allreduce ms (MEASURED)", "allreduce share",
                      "MODEL ms"], rows, ["s", ".1f", ".1f", "s", ".1f"])
    say("")
    sizes = list(first["allreduce_ms"]["fp32"])
    header = ["variant", "elements", "wire MB"]
    for r in results:
        header.append(f"p={r['ranks']} ms")
    for r in results:
        if r["ranks"] > 1:
            header.append(f"MODEL p={r['ranks']}")
            header.append(f"resid p={r['ranks']}")
    rows = []
    for variant in SWEEP_VARIANTS:
        fit = fits.get(variant, (None,))[0]
        for numel in sizes:
            n_bytes = int(numel) * WIRE_BYTES[variant]
            label = f"{int(numel):,}" + (" (WRN-50-2 scores)" if int(numel) == score_elements else "")
            row = [variant, label, f"{n_bytes / 1e6:.3f}"]
            row += [f"{r['allreduce_ms'][variant][numel]:.3f}" for r in results]
            for r in results:
                if r["ranks"] > 1:
                    if fit is None:
                        row += ["-", "-"]
                        continue
                    model = 1e3 * ring_allreduce_s(n_bytes, r["ranks"], fit.bandwidth, fit.alpha_s)
                    measured = r["allreduce_ms"][variant][numel]
                    row += [f"{model:.3f}", f"{100 * (model - measured) / measured:+.0f}%"]
            rows.append(row)
    say("MEASURED allreduce (op Sum) of one tensor; MODEL = the ring model with the variant's fitted alpha and "
               "B; resid = (MODEL - MEASURED) / MEASURED")
    show(header, rows, ["s"] * len(header))
    say("")
    if across is not None:
        out += across_nodes_report(results, across, fits, score_elements) + [("text", "")]
    rows = []
    for variant, (fit, samples) in fits.items():
        rms = math.sqrt(statistics.mean(e * e for e in fit.residuals))
        rows.append([variant, 1e6 * fit.alpha_s, fit.bandwidth / 1e9, f"{100 * rms:.0f}%",
                     f"{100 * max(abs(e) for e in fit.residuals):.0f}%", str(len(samples))])
    say("FIT of t(n, p) = 2(p-1)/p * n/B + 2(p-1) * alpha to the p > 1 times (least squares on relative error)")
    show(["variant", "alpha us", "B GB/s", "rms resid", "max abs resid", "points"], rows,
                     ["s", ".1f", ".3f", "s", "s", "s"])
    return out


def model_report(rows, layers, args, node: NodeSpec, networks: dict) -> list:
    """Blocks ("text" or "table", text) of the MODEL part."""
    compute_s = args.gpu_batch / args.gpu_img_s
    out = []
    say, show = (lambda text: out.append(("text", text))), (lambda *table_: out.append(("table", *table_)))
    say(f"MODEL (not a measurement): WRN-50-2, {sum(layers):,} scores in {len(layers)} tensors "
           f"({4 * sum(layers) / 1e6:.1f} MB fp32, {2 * sum(layers) / 1e6:.1f} MB fp16/bf16); per-GPU step "
           f"{1e3 * compute_s:.2f} ms = batch {args.gpu_batch} / {args.gpu_img_s:g} img/s "
           f"({GPU_STEP_LOG}, row {' '.join(map(str, GPU_STEP_ROW))}, BIPROP img/s); {node.gpus} GPUs per node, "
           f"NVLink {node.nvlink_bytes_s / 1e9:g} GB/s and {1e6 * node.nvlink_alpha_s:g} us per step, host copies "
           f"{node.host_copy_bytes_s / 1e9:g} GB/s; fusion threshold {args.fusion_mb:g} MiB; overlap: none, except "
           f"the last column (the allreduce hides behind {100 * args.hide:.0f}% of the compute time).")
    say("Cells: images/s (parallel efficiency = per-GPU step / step).")
    for key, net in networks.items():
        say("")
        say(f"MODEL, {net.name} per node ({net.node_bytes_s / 1e9:g} GB/s per direction), alpha "
                   f"{1e6 * net.alpha_s:g} us per network step")
        header = ["nodes", "GPUs", "no-comm img/s"] + [r["variant"] for r in rows if r["network"] == key
                                                       and r["nodes"] == NODE_COUNTS[0]]
        body = []
        for nodes in NODE_COUNTS:
            cells = [r for r in rows if r["network"] == key and r["nodes"] == nodes]
            body.append([str(nodes), str(nodes * node.gpus), f"{nodes * node.gpus * args.gpu_batch / compute_s:.0f}"]
                        + [f"{r['images_s']:.0f} ({100 * r['efficiency']:.0f}%)" for r in cells])
        show(header, body, ["s"] * len(header))
    say("")
    say("MODEL, where the allreduce time goes (ms per step; no overlap)")
    body = []
    for key in networks:
        for nodes in (2, 16, 256):
            for r in rows:
                if r["network"] == key and r["nodes"] == nodes and r["hide"] == 0:
                    body.append([key, str(nodes), r["variant"], str(r["messages"]), r["bandwidth_ms"], r["latency_ms"],
                                 r["copy_ms"], r["allreduce_ms"], f"{100 * r['efficiency']:.0f}%"])
    show(["network", "nodes", "variant", "messages", "bandwidth ms", "latency ms", "host copies ms",
                      "allreduce ms", "efficiency"], body, ["s", "s", "s", "s", ".2f", ".2f", ".2f", ".2f", "s"])
    return out


def pipe_table(header, body, formats) -> str:
    """A markdown table."""
    cells = [[v if isinstance(v, str) else format(v, f) for v, f in zip(row, formats)] for row in body]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def as_text(blocks) -> str:
    return "\n".join(block[1] if block[0] == "text" else table(*block[1:]) for block in blocks)


def as_markdown(blocks) -> str:
    return "\n".join(block[1] if block[0] == "text" else "\n" + pipe_table(*block[1:]) + "\n"
                     for block in blocks) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="rank counts to measure (each under mpirun)")
    parser.add_argument("--model", default="conv4", help="small BIPROP model whose step is measured")
    parser.add_argument("--batch", type=int, default=32, help="images per rank per measured step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--step-repeats", type=int, default=5, help="timed steps")
    parser.add_argument("--repeats", type=int, default=9, help="timed allreduces per size up to 4 MiB; "
                                                               "a third of it, at least 3, up to 64 MiB; 2 above")
    parser.add_argument("--sizes", default="256,1024,4096,16384,65536,262144,1048576,4194304",
                        help="elements per allreduced tensor (the WRN-50-2 score count is added)")
    parser.add_argument("--score-elements", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--model-only", action="store_true", help="skip the measurements: the projection alone")
    parser.add_argument("--no-nodes", action="store_true", help="skip the measurement across the namespace nodes")
    parser.add_argument("--scores-only", action="store_true", help=argparse.SUPPRESS)  # the across-nodes worker
    parser.add_argument("--gpu-img-s", type=float, default=GPU_IMG_S, help="per-GPU WRN-50-2 images/s (MODEL)")
    parser.add_argument("--gpu-batch", type=int, default=GPU_BATCH, help="per-GPU batch (MODEL)")
    parser.add_argument("--alpha-net-us", type=float, default=None, help="network alpha per ring step, both networks")
    parser.add_argument("--nvlink-gbs", type=float, default=NodeSpec.nvlink_bytes_s / 1e9)
    parser.add_argument("--host-copy-gbs", type=float, default=NodeSpec.host_copy_bytes_s / 1e9)
    parser.add_argument("--fusion-mb", type=float, default=HOROVOD_FUSION_BYTES / MIB,
                        help="Horovod fusion threshold in MiB (HOROVOD_FUSION_THRESHOLD)")
    parser.add_argument("--hide", type=float, default=HIDE,
                        help="overlap of the last column: the allreduce hides behind this fraction of the compute")
    parser.add_argument("--out", default=None, help="results directory (default: bench/results/<date>-scaling for "
                                                    "a measured run; none for --model-only)")
    args = parser.parse_args(argv)
    for name in ("gpu_img_s", "gpu_batch", "nvlink_gbs", "host_copy_gbs"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.fusion_mb < 0:
        parser.error(f"--fusion-mb must be >= 0 (0 disables fusion), got {args.fusion_mb}")
    if not 0 <= args.hide < 1:
        parser.error(f"--hide must be in [0, 1), got {args.hide}")
    for name in ("ranks", "sizes"):
        values = getattr(args, name).split(",")
        if not all(v.strip().isdigit() and int(v) > 0 for v in values):
            parser.error(f"--{name} must be whole numbers > 0 separated by commas, got {getattr(args, name)!r}")
    return args


def main():
    args = parse_args()
    if any(var in os.environ for var in LAUNCHER_VARS):
        worker(args)
        return
    # Where the files go: --out, or a dated directory for a measured run; --model-only alone writes nothing.
    # A recorded run is never overwritten (README quotes it).
    out = Path(args.out) if args.out else None if args.model_only else \
        REPO / "bench" / "results" / f"{datetime.date.today():%Y-%m-%d}-scaling"
    if out is not None and (out / "scaling.json").exists():
        sys.exit(f"{out} already holds a run (scaling.json): pass --out DIR to write elsewhere, or remove it")
    layers = wrn_layer_elements()
    node = NodeSpec(nvlink_bytes_s=args.nvlink_gbs * 1e9, host_copy_bytes_s=args.host_copy_gbs * 1e9)
    networks = {key: dataclasses.replace(net, alpha_s=net.alpha_s if args.alpha_net_us is None
                                         else args.alpha_net_us * 1e-6) for key, net in NETWORKS.items()}
    lines, results, fits, across = [], [], {}, None
    if not args.model_only:
        args.score_elements = sum(layers)
        results = launch(args, sum(layers))
        across = None if args.no_nodes else launch_across_nodes(args, sum(layers))
        fits = fits_of(results)
        lines += measured_report(results, fits, sum(layers), across) + [("text", "")]
    rows = projections(layers, args, node, networks)
    lines += model_report(rows, layers, args, node, networks)
    text = as_text(lines)
    print()
    print(text)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/scaling.py " + " ".join(sys.argv[1:])
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    (out / "scaling.md").write_text(f"`{command.strip()}`, {stamp}\n\n" + as_markdown(lines))
    record = {"command": command.strip(), "measured": results, "across_nodes": across,
              "fits": {v: {"alpha_s": f.alpha_s, "bandwidth_bytes_s": f.bandwidth,
                           "samples": [{"bytes": n, "ranks": p, "seconds": t, "residual": e}
                                       for (n, p, t), e in zip(s, f.residuals)]} for v, (f, s) in fits.items()},
             "model": {"gpu_step_source": {"file": GPU_STEP_LOG, "row": GPU_STEP_ROW, "img_s": args.gpu_img_s,
                                           "batch": args.gpu_batch},
                       "layers": layers, "node": dataclasses.asdict(node),
                       "networks": {k: dataclasses.asdict(n) for k, n in networks.items()},
                       "fusion_threshold_bytes": args.fusion_mb * MIB, "hide": args.hide, "projections": rows}}
    (out / "scaling.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwritten: {out / 'scaling.md'}, {out / 'scaling.json'}")


if __name__ == "__main__":
    main()
