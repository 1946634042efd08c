"""Horovod on the CPU: the allreduce's share of a small model's training step, and a WRN-50-2-sized allreduce.

(a) Conv4 BIPROP (keep ratio 0.5), CIFAR shape 3x32x32, --batch images per rank: median training-step time
    with the Horovod DistributedOptimizer (op Sum, as training uses it: biprop_hpc.dist.HorovodContext),
    the time spent waiting in optimizer.synchronize() after backward (the allreduce not hidden behind
    backward), the same step followed by the training loop's stop vote (wait for the previous step's vote,
    start the next: ctx.any_async, how all ranks agree on a step at which to stop on a scheduler's signal),
    and the same step on an identical model with the plain optimizer (no allreduce), steps interleaved.
    allreduce share = (step - step without allreduce) / step. With 1 rank Horovod registers no gradient hooks,
    so there the share is ~0 by construction.
(b) The score gradient of WRN-50-2: hvd.allreduce (op Sum) of one --numel fp32 tensor (68.9M floats, 276 MB),
    plain, with hvd.Compression.fp16 (cast to half, allreduce, cast back), and of an already-half tensor
    (wire cost only); median of --repeats. grad GB/s = fp32 gradient bytes / time (what training gets);
    bus GB/s = wire bytes * 2(n-1)/n / time (ring allreduce traffic per rank; only for n > 1).
Each rank uses --threads torch threads (default 1, so 2 ranks fill 2 cores without oversubscription and
per-rank compute is the same for 1 and 2 ranks). Times are the maximum over ranks of each rank's median.

Started without a launcher, the script re-runs itself under `mpirun -np N` for each N in --ranks and
prints one table with a column per rank count (ratios from numbers measured in this run):

  python bench/allreduce.py                          # defaults: ranks 1,2; batch 64; 68.9M floats
  mpirun -np 2 --bind-to none python bench/allreduce.py   # one rank count only (add --allow-run-as-root as root)
  python bench/allreduce.py --repeats 2 --warmup 1 --numel 2000000 --batch 8    # smoke test
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # _timing beside this file
from _timing import mpirun_prefix  # noqa: E402

LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE", "PMIX_RANK")
RESULT = "RESULT "


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2", help="rank counts to launch when started without mpirun")
    parser.add_argument("--model", default="conv4")
    parser.add_argument("--batch", type=int, default=64, help="images per rank per step")
    parser.add_argument("--numel", type=float, default=68.9e6, help="floats in the big allreduce (WRN-50-2 scores)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps / allreduces (median)")
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------- worker

def worker(args):
    import torch
    from torch import nn

    from biprop_hpc.dist import HorovodContext
    from biprop_hpc.models import LayerBuilder, build_model

    torch.set_num_threads(args.threads)
    ctx = HorovodContext("mpirun")   # also with 1 rank, so Horovod itself is timed (init_distributed would not)
    hvd = ctx.hvd
    n = hvd.size()

    def model_and_optimizer(distributed):
        torch.manual_seed(0)
        model = build_model(args.model, LayerBuilder(keep_ratio=0.5, layer_type="biprop"), in_channels=3,
                            num_classes=10, image_size=32)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        if distributed:
            optimizer = ctx.distributed_optimizer(optimizer, model)
        return model, optimizer

    criterion = nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    dist_model, dist_opt = model_and_optimizer(True)
    local_model, local_opt = model_and_optimizer(False)
    trainable = sum(p.numel() for p in dist_model.parameters() if p.requires_grad)

    def step_with_allreduce():
        dist_opt.zero_grad()   # Horovod's takes no set_to_none; torch's default is True
        criterion(dist_model(x), y).backward()
        start = time.perf_counter()
        dist_opt.synchronize()
        wait = time.perf_counter() - start
        with dist_opt.skip_synchronize():
            dist_opt.step()
        return wait

    pending_vote = [lambda: False]

    def step_with_allreduce_and_vote():
        wait = step_with_allreduce()
        pending_vote[0]()
        pending_vote[0] = ctx.any_async(False, "stop_vote")
        return wait

    def step_without_allreduce():
        local_opt.zero_grad()
        criterion(local_model(x), y).backward()
        local_opt.step()

    def timed(fn):
        hvd.barrier()               # all ranks start together; not inside the timed region
        start = time.perf_counter()
        extra = fn()
        return time.perf_counter() - start, extra

    for _ in range(args.warmup):
        timed(step_with_allreduce), timed(step_with_allreduce_and_vote), timed(step_without_allreduce)
    with_ar, waits, with_vote, without_ar = [], [], [], []
    for _ in range(args.repeats):
        t, w = timed(step_with_allreduce)
        with_ar.append(t), waits.append(w)
        with_vote.append(timed(step_with_allreduce_and_vote)[0])
        without_ar.append(timed(step_without_allreduce)[0])
    pending_vote[0]()

    numel = int(args.numel)
    big = torch.randn(numel)
    big_half = big.half()
    variants = {
        "fp32": lambda: hvd.allreduce(big, op=hvd.Sum, name="big_fp32"),
        "fp16": lambda: hvd.allreduce(big, op=hvd.Sum, name="big_fp16", compression=hvd.Compression.fp16),
        "half": lambda: hvd.allreduce(big_half, op=hvd.Sum, name="big_half"),
    }
    for fn in variants.values():
        for _ in range(args.warmup):
            timed(fn)
    big_times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            big_times[name].append(timed(fn)[0])

    medians = {"step": statistics.median(with_ar), "wait": statistics.median(waits),
               "step_vote": statistics.median(with_vote),
               "step_no_ar": statistics.median(without_ar),
               **{name: statistics.median(t) for name, t in big_times.items()}}
    every_rank = hvd.allgather_object(medians, name="medians")
    worst = {key: max(m[key] for m in every_rank) for key in medians}
    if hvd.rank() != 0:
        return None
    result = {"ranks": n, "controller": ctx.controller, "threads": args.threads, "numel": numel,
              "trainable": trainable, "batch": args.batch, "model": args.model,
              **{key: 1e3 * value for key, value in worst.items()}}
    print(RESULT + json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------------------------- report

def report(results):
    first = results[0]
    gb = first["numel"] * 4 / 1e9
    print(f"{first['model']} BIPROP k=0.5, batch {first['batch']} per rank ({first['trainable'] / 1e6:.2f}M "
          f"scores), {first['threads']} torch thread(s) per rank, controller {first['controller']}; "
          f"big allreduce {first['numel'] / 1e6:.1f}M floats ({gb * 1e3:.0f} MB fp32). ms are medians; "
          "max over ranks.")

    def bus(r, key, bytes_per):
        n = r["ranks"]
        return "-" if n == 1 else f"{first['numel'] * bytes_per * 2 * (n - 1) / n / 1e9 / (r[key] / 1e3):.2f}"

    rows = [
        ("train step ms (with allreduce)", lambda r: f"{r['step']:.1f}"),
        ("train step ms (with allreduce + stop vote)", lambda r: f"{r['step_vote']:.1f}"),
        ("  stop vote / step", lambda r: f"{r['step_vote'] / r['step']:.3f}"),
        ("train step ms (no allreduce)", lambda r: f"{r['step_no_ar']:.1f}"),
        ("allreduce share of step", lambda r: f"{100 * (r['step'] - r['step_no_ar']) / r['step']:.1f}%"),
        ("synchronize() wait ms", lambda r: f"{r['wait']:.1f}"),
        ("synchronize() share of step", lambda r: f"{100 * r['wait'] / r['step']:.1f}%"),
        ("fp32 allreduce ms", lambda r: f"{r['fp32']:.1f}"),
        ("  grad GB/s", lambda r: f"{gb / (r['fp32'] / 1e3):.2f}"),
        ("  bus GB/s", lambda r: bus(r, "fp32", 4)),
        ("fp16-compressed allreduce ms", lambda r: f"{r['fp16']:.1f}"),
        ("  grad GB/s", lambda r: f"{gb / (r['fp16'] / 1e3):.2f}"),
        ("  bus GB/s", lambda r: bus(r, "fp16", 2)),
        ("half-tensor allreduce ms", lambda r: f"{r['half']:.1f}"),
        ("fp16-compressed / fp32 time", lambda r: f"{r['fp16'] / r['fp32']:.2f}"),
    ]
    names = [f"ranks={r['ranks']}" for r in results]
    ratio = len(results) > 1
    header = ["measurement", *names] + ([f"{names[-1]} / {names[0]}"] if ratio else [])
    table = []
    for label, cell in rows:
        line = [label, *(cell(r) for r in results)]
        if ratio:
            key = {"train step ms (with allreduce)": "step", "train step ms (no allreduce)": "step_no_ar",
                   "train step ms (with allreduce + stop vote)": "step_vote",
                   "fp32 allreduce ms": "fp32", "fp16-compressed allreduce ms": "fp16",
                   "half-tensor allreduce ms": "half"}.get(label)
            line.append(f"{results[-1][key] / results[0][key]:.2f}" if key else "")
        table.append(line)
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for i, row in enumerate([header, None, *table]):
        if row is None:
            print("  ".join("-" * w for w in widths))
            continue
        print("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))))


def launch(args):
    results = []
    for n in [int(v) for v in args.ranks.split(",")]:
        prefix, env = mpirun_prefix(n)
        command = [*prefix, sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        print(f"running {n} rank(s): {' '.join(command)}", flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode != 0 or not lines:
            sys.exit(f"{n} rank(s) failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        results.append(json.loads(lines[-1][len(RESULT):]))
    print()
    report(results)


def main():
    args = parse_args()
    if any(var in os.environ for var in LAUNCHER_VARS):
        result = worker(args)
        if result is not None:
            report([result])
    else:
        launch(args)


if __name__ == "__main__":
    main()
