"""Packed binary inference (biprop_hpc.packed) against torch fp32 on the same CPU, interleaved in one run.

    python bench/packed.py                      # everything: layers and networks, batch 1 and 64, 1 and 2 threads
    python bench/packed.py --quick              # fewer shapes, batch 1 and 16, for a smoke run
    python bench/packed.py --json out.json      # also write the rows

Per layer: a 3x3 conv on a +-1 map, torch fp32 (F.conv2d on the float +-1 tensor; the BN and sign after it not
counted) against the packed layer (bits in, BN + sign fused, bits out: what the engine runs, the expansion of
the compressed weights included), on the AVX-512 path and forced to AVX2. Shapes: 64->64 at 32x32, 256->256 at
8x8, and the 3x3 convs of WRN-34-2 at 224 (stride 2 where a stage starts).
Per network: MPT-1/1 tickets (random, BN statistics set) of conv4_bin (CIFAR 32x32, keep 0.5),
resnet18_cifar_bin (32x32, keep 0.25) and wide_resnet34_2_bin (224x224, 1000 classes, keep 0.4: the paper's
keep ratios), the float network (plain layers holding W_eff, as biprop_hpc.ticket.load gives) against
pack_model of it; the predictions that agree are counted. Each (case, batch, threads) times fp32 and packed in turn
(fp32, packed, fp32, ...) and reports medians, so a change in the machine's load hits both alike.
Memory: the bytes of the float network's conv/linear weights and of everything the packed network holds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import table

from biprop_hpc.models import LayerBuilder, build_model
from biprop_hpc.nn import BipropConv2d
from biprop_hpc.packed import (
    cpu_path,
    dense_ternary,
    model_bytes,
    pack_model,
    pack_sign,
    set_cpu_path,
    supported_cpu_paths,
)
from biprop_hpc.packed.layers import PackedConv

LAYERS = [  # name, in, out, size, stride
    ("3x3 64->64 @32", 64, 64, 32, 1),
    ("3x3 256->256 @8", 256, 256, 8, 1),
    ("WRN 64->64 @56", 64, 64, 56, 1),
    ("WRN 64->192 @56 s2", 64, 192, 56, 2),
    ("WRN 192->192 @28", 192, 192, 28, 1),
    ("WRN 192->384 @28 s2", 192, 384, 28, 2),
    ("WRN 384->384 @14", 384, 384, 14, 1),
    ("WRN 384->768 @14 s2", 384, 768, 14, 2),
    ("WRN 768->768 @7", 768, 768, 7, 1),
]
NETWORKS = [  # name, image size, classes, keep ratio
    ("conv4_bin", 32, 10, 0.5),
    ("resnet18_cifar_bin", 32, 10, 0.25),
    ("wide_resnet34_2_bin", 224, 1000, 0.4),
]


def interleaved(fns: dict, repeats: int, budget_s: float) -> dict:
    """Median ms of each callable, run in turn; one untimed warm-up round; fewer repeats for slow cases
    (at least 3) so that one case takes about `budget_s`."""
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    round_s = time.perf_counter() - start
    repeats = max(3, min(repeats, int(budget_s / max(round_s, 1e-9))))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()} | {"repeats": repeats}


def random_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def bench_layers(layers, batches, threads, repeats, budget, avx2: bool) -> list[dict]:
    rows = []
    for name, cin, cout, size, stride in layers:
        torch.manual_seed(0)
        biprop = BipropConv2d(cin, cout, 3, stride, 1, keep_ratio=0.5)
        conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        conv.weight.data = biprop.effective_weight().detach()
        bn = nn.BatchNorm2d(cout).eval()
        random_bn(bn)
        packed = PackedConv(conv, "bits", [bn], name=name)
        weight = conv.weight.detach()
        for batch in batches:
            x = torch.where(torch.rand(batch, cin, size, size) < 0.5, -1.0, 1.0)
            bits = pack_sign(x)
            # the packed layer's bits equal the float model's conv -> BN -> sign
            with torch.no_grad():
                assert torch.equal(packed(bits).unpack(), torch.where(bn(conv(x)) >= 0, 1.0, -1.0))
            best = supported_cpu_paths()[0]

            def run_packed(path=best, packed=packed, bits=bits):
                set_cpu_path(path)
                packed(bits)

            def run_fp32(x=x, weight=weight, stride=stride):
                F.conv2d(x, weight, None, stride, 1)

            fns = {"fp32": run_fp32, "packed": run_packed}
            if avx2 and "avx2" in supported_cpu_paths() and best != "avx2":
                fns["packed_avx2"] = lambda: run_packed("avx2")
            for t in threads:
                torch.set_num_threads(t)
                with torch.no_grad():
                    ms = interleaved(fns, repeats, budget)
                set_cpu_path("auto")
                rows.append({"layer": name, "batch": batch, "threads": t, **ms,
                             "speedup": ms["fp32"] / ms["packed"],
                             "speedup_avx2": ms["fp32"] / ms["packed_avx2"] if "packed_avx2" in ms else None})
                print(f"  {name:22s} batch {batch:3d} threads {t}: fp32 {ms['fp32']:9.3f} ms  packed "
                      f"{ms['packed']:8.3f} ms  x{rows[-1]['speedup']:.1f}", flush=True)
    return rows


def bench_networks(networks, batches, threads, repeats, budget) -> tuple[list[dict], list[dict]]:
    rows, memory = [], []
    for name, size, classes, keep in networks:
        torch.manual_seed(0)
        model = build_model(name, LayerBuilder(keep_ratio=keep), in_channels=3, num_classes=classes, image_size=size)
        random_bn(model)
        model = dense_ternary(model)
        packed = pack_model(model, example_input=torch.randn(1, 3, size, size))
        for batch in batches:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                same = int((model(x).argmax(1) == packed(x).argmax(1)).sum())
            for t in threads:
                torch.set_num_threads(t)
                with torch.no_grad():
                    ms = interleaved({"fp32": lambda m=model, x=x: m(x), "packed": lambda p=packed, x=x: p(x)},
                                     repeats, budget)
                rows.append({"network": name, "input": f"{size}x{size}", "keep": keep, "batch": batch, "threads": t,
                             **ms, "speedup": ms["fp32"] / ms["packed"], "same_predictions": same,
                             "packed_images_per_s": batch / ms["packed"] * 1e3})
                print(f"  {name:20s} batch {batch:3d} threads {t}: fp32 {ms['fp32']:9.2f} ms  packed "
                      f"{ms['packed']:8.2f} ms  x{rows[-1]['speedup']:.1f}  same predictions: {same}/{batch}",
                      flush=True)
        weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        memory.append({"network": name, "keep": keep, "weights": weights // 4, "fp32_weight_bytes": weights,
                       "fp32_model_bytes": model_bytes(model), "packed_bytes": model_bytes(packed),
                       "ratio_weights": weights / model_bytes(packed),
                       "ratio_model": model_bytes(model) / model_bytes(packed),
                       "packed_layers": len(packed.packed_layers), "float_layers": len(packed.float_layers)})
    return rows, memory


def machine() -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                     platform.processor())
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        uptime = "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "uptime": uptime,
            "cpu_paths": supported_cpu_paths(), "packed_path": cpu_path()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two layers, conv4_bin and resnet18, batch 1 and 16")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--repeats", type=int, default=1000, help="timed rounds per case at most (default 1000)")
    parser.add_argument("--budget", type=float, default=5.0,
                        help="seconds of timed rounds per case, roughly; at least 3 rounds (default 5)")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-networks", action="store_true")
    parser.add_argument("--no-avx2", action="store_true", help="do not time the forced AVX2 path per layer")
    parser.add_argument("--json", default="", help="write all rows to this file")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 16] if args.quick else [1, 64])
    layers = LAYERS[:2] if args.quick else LAYERS
    networks = NETWORKS[:2] if args.quick else NETWORKS
    info = machine()
    print(f"{info['uptime']}\n{info['cpu']}, {info['cores']} cores, torch {info['torch']}, packed path "
          f"{info['packed_path']} (this CPU: {', '.join(info['cpu_paths'])})", flush=True)
    result = {"machine": info}
    started = time.perf_counter()
    if not args.skip_layers:
        print("per layer:", flush=True)
        result["layers"] = bench_layers(layers, batches, threads, args.repeats, args.budget, not args.no_avx2)
    if not args.skip_networks:
        print("networks:", flush=True)
        result["networks"], result["memory"] = bench_networks(networks, batches, threads, args.repeats, args.budget)
    result["machine"]["uptime_after"] = machine()["uptime"]
    result["seconds"] = time.perf_counter() - started

    print(f"\n{info['uptime']}  (before)\n{result['machine']['uptime_after']}  (after, {result['seconds']:.0f} s)")
    if "layers" in result:
        avx2 = any(r["speedup_avx2"] for r in result["layers"])
        header = ["layer (3x3, BN+sign fused)", "batch", "threads", "fp32 ms", "packed ms", "speedup"]
        formats = ["s", "d", "d", ".3f", ".3f", ".1f"]
        if avx2:
            header += ["AVX2 ms", "AVX2 speedup"]
            formats += [".3f", ".1f"]
        rows = [[r["layer"], r["batch"], r["threads"], r["fp32"], r["packed"], r["speedup"]]
                + ([r.get("packed_avx2", float("nan")), r["speedup_avx2"] or float("nan")] if avx2 else [])
                for r in result["layers"]]
        print("\n" + table(header, rows, formats))
    if "networks" in result:
        rows = [[r["network"], r["input"], r["keep"], r["batch"], r["threads"], r["fp32"], r["packed"], r["speedup"],
                 r["packed_images_per_s"], f"{r['same_predictions']}/{r['batch']}"] for r in result["networks"]]
        print("\n" + table(["network", "input", "keep", "batch", "threads", "fp32 ms", "packed ms", "speedup",
                            "packed img/s", "argmax = fp32"], rows,
                           ["s", "s", ".2f", "d", "d", ".2f", ".2f", ".1f", ".1f", "s"]))
        rows = [[m["network"], m["keep"], m["weights"] / 1e6, m["fp32_weight_bytes"] / 2 ** 20,
                 m["packed_bytes"] / 2 ** 20, m["ratio_weights"], m["fp32_model_bytes"] / 2 ** 20, m["ratio_model"]]
                for m in result["memory"]]
        print("\n" + table(["network", "keep", "weights (M)", "fp32 weights MiB", "packed MiB (all)",
                            "ratio", "fp32 model MiB", "ratio"], rows,
                           ["s", ".2f", ".2f", ".2f", ".3f", ".1f", ".2f", ".1f"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
