"""CPU training-step time: global pruning vs layerwise, on one model in one run.

Target: a global-pruning step takes within a few % of the layerwise step (the same model, batch, threads).

Times full training steps (forward, backward, SGD with momentum over the scores) of the same model built twice
from one seed, one layerwise and one global step per round (interleaved, so drifts in machine load hit both),
--repeats rounds after --warmup; the step ratio is the median over rounds of global / layerwise. Then the mask
work alone: all layers' W_eff as one forward computes them (MaskEngine.effective_weights), layerwise and global
(the global one includes the threshold over all scores and the per-layer counts: nn/global_prune.py). Medians
and minima are printed: on a shared machine the minimum is the least disturbed figure. The process CPU time of
each step (all its threads) is printed too: unlike wall time it leaves out the time spent waiting for cores that
other processes hold, so its ratio is the steadier one on a loaded machine (same work, same ratio).
Both models keep the same total fraction of weights (--keep-ratio); the global one at its final kept fraction.

  python bench/global_step.py                                       # conv4, batch 128, 2 threads, 15 rounds
  python bench/global_step.py --model resnet18_cifar --batch 64
  python bench/global_step.py --repeats 2 --batch 8 --mask-repeats 2  # smoke test
"""
import argparse
import platform
import statistics
import time

import torch
from torch import nn

from _timing import interleaved_times_ms, table
from biprop_hpc.models import LayerBuilder, build_model


def make_step(model_name: str, keep_ratio: float, batch: int, pruning: str):
    torch.manual_seed(0)
    model = build_model(model_name, LayerBuilder(keep_ratio=keep_ratio), in_channels=3, num_classes=10,
                        image_size=32)
    if pruning == "global":
        model.mask_engine.set_global_keep_ratio(keep_ratio)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    return step, model


def interleaved_step_times_ms(steps: dict, repeats: int, warmup: int) -> tuple[dict, dict]:
    """({name: wall ms per round}, {name: process CPU ms per round}), the steps run in turn each round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            cpu[name].append(1e3 * (time.process_time() - start_cpu))
            wall[name].append(1e3 * (time.perf_counter() - start))
    return wall, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="conv4")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--keep-ratio", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--mask-repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    layerwise_step, layerwise = make_step(args.model, args.keep_ratio, args.batch, "layerwise")
    global_step, global_model = make_step(args.model, args.keep_ratio, args.batch, "global")
    steps, cpu = interleaved_step_times_ms({"layerwise": layerwise_step, "global": global_step}, args.repeats,
                                           args.warmup)
    ratios = [g / l for g, l in zip(steps["global"], steps["layerwise"])]
    cpu_ratios = [g / l for g, l in zip(cpu["global"], cpu["layerwise"])]
    with torch.no_grad():
        masks = interleaved_times_ms({"layerwise": layerwise.mask_engine.effective_weights,
                                      "global": global_model.mask_engine.effective_weights},
                                     args.mask_repeats, 1)
    scores = sum(layer.scores.numel() for layer in layerwise.mask_engine.layers)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
          f"{args.model}, batch {args.batch}, keep ratio {args.keep_ratio}, {scores} scores in "
          f"{len(layerwise.mask_engine.layers)} layers; {args.repeats} rounds")
    rows = [[name, statistics.median(steps[name]), min(steps[name]), statistics.median(masks[name]), min(masks[name])]
            for name in ("layerwise", "global")]
    print(table(["pruning", "step ms", "min", "mask ms", "min"], rows, ["s", ".2f", ".2f", ".2f", ".2f"]))
    mask_ratio = statistics.median(masks["global"]) / statistics.median(masks["layerwise"])
    print(f"global / layerwise step: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}); masks: global / layerwise {mask_ratio:.2f}x")
    print(f"process CPU time per step, ms: layerwise median {statistics.median(cpu['layerwise']):.2f} (min "
          f"{min(cpu['layerwise']):.2f}), global {statistics.median(cpu['global']):.2f} (min {min(cpu['global']):.2f}); "
          f"global / layerwise median {statistics.median(cpu_ratios):.3f} (min {min(cpu_ratios):.3f}, "
          f"max {max(cpu_ratios):.3f})")


if __name__ == "__main__":
    main()
