"""CPU training-step time: BIPROP (keep ratio k) vs the same architecture trained dense; cost of the masks.

Target: a BIPROP training step takes at most 1.05x the dense step (same model, batch, threads, device).

For each model (Conv4 at batch 128, ResNet-18 for CIFAR at batch 64; 3x32x32 inputs, 10 classes), times
full training steps (forward, backward, SGD with momentum over the trainable parameters only: the scores
for BIPROP, weights and BN affine parameters for dense), one BIPROP and one dense step per round, --repeats
rounds after --warmup; the ratio is the median over rounds of the two steps' ratio. Then, on the BIPROP model's
layers:
  mask ms      all layers' effective_weight() with grad enabled, i.e. what one forward pays for the masks
               (the C++ kernels of biprop_hpc/nn/csrc/masks.cpp where built: selection, alpha and
               sign(W) * alpha * M in two passes; autograd node)
  torch ms     the same by the torch code the kernels replace (layers.torch_binary_masked_weight)
  select ms    the top-k masks alone (biprop_hpc.nn.layers.topk_mask, selection)
  sort ms      reference: the original sort-based mask (torch.sort of |scores| per layer, threshold at the
               n_keep-th largest), timed on the same layers
Ratios (BIPROP/dense, mask share of the BIPROP step, sort/select) use numbers measured in this run.

  python bench/cpu_step.py                                  # defaults: 2 threads, warmup 1, repeats 15
  python bench/cpu_step.py --repeats 2 --mask-repeats 3 --batch-conv4 16 --batch-resnet 8   # smoke test
"""
import argparse
import platform
import statistics

import torch
from torch import nn

from _timing import interleaved_times_ms, median_ms, table
from biprop_hpc.models import LayerBuilder, build_model
from biprop_hpc.nn.layers import biprop_layers, topk_mask, torch_binary_masked_weight


def sort_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """reference: original sort-based mask -- sort all of |scores|, keep those >= the n_keep-th largest."""
    magnitude = scores.detach().abs().flatten()
    ordered = torch.sort(magnitude).values
    threshold = ordered[magnitude.numel() - n_keep]
    return (magnitude >= threshold).view_as(scores)


def make_step(model_name, layer_type, keep_ratio, batch, seed=0):
    torch.manual_seed(seed)
    builder = LayerBuilder(keep_ratio=keep_ratio, layer_type=layer_type)
    model = build_model(model_name, builder, in_channels=3, num_classes=10, image_size=32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

    return model, step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="conv4,resnet18_cifar", help="comma-separated registry names")
    parser.add_argument("--batch-conv4", type=int, default=128, help="batch for conv* models")
    parser.add_argument("--batch-resnet", type=int, default=64, help="batch for the other models")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds of one step of each (median)")
    parser.add_argument("--mask-repeats", type=int, default=10, help="timed repeats of the mask timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {platform.processor() or platform.machine()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  keep_ratio {args.keep_ratio}  "
          f"warmup {args.warmup}  repeats {args.repeats} (median)", flush=True)

    rows = []
    for name in args.models.split(","):
        batch = args.batch_conv4 if name.startswith("conv") else args.batch_resnet
        biprop_model, biprop_step = make_step(name, "biprop", args.keep_ratio, batch)
        _, dense_step = make_step(name, "dense", args.keep_ratio, batch)
        times = interleaved_times_ms({"biprop": biprop_step, "dense": dense_step}, args.repeats, args.warmup)
        steps = {name: statistics.median(t) for name, t in times.items()}
        # The ratio of each round's pair of steps, then the median: load drifts between rounds cancel.
        ratio = statistics.median(b / d for b, d in zip(times["biprop"], times["dense"]))

        layers = [layer for _, layer in biprop_layers(biprop_model)]
        sizes = [layer.n_keep for layer in layers]

        def all_effective_weights():
            with torch.enable_grad():
                for layer in layers:
                    layer.effective_weight()

        def all_torch_effective_weights():
            for layer, n_keep in zip(layers, sizes):
                torch_binary_masked_weight(layer.scores, layer.weight, n_keep)

        def all_select_masks():
            for layer, n_keep in zip(layers, sizes):
                topk_mask(layer.scores, n_keep)

        def all_sort_masks():
            for layer, n_keep in zip(layers, sizes):
                sort_mask(layer.scores, n_keep)

        # The reference must pick the same weights (it can differ only on exact ties in |scores|).
        differ = sum(int((sort_mask(l.scores, n) != topk_mask(l.scores, n)).sum()) for l, n in zip(layers, sizes))
        if differ:
            print(f"  note: {name}: sort-based and selection masks differ in {differ} entries (ties)")
        mask = median_ms(all_effective_weights, args.mask_repeats, warmup=2)
        torch_mask = median_ms(all_torch_effective_weights, args.mask_repeats, warmup=2)
        select = median_ms(all_select_masks, args.mask_repeats, warmup=2)
        sort = median_ms(all_sort_masks, max(3, args.mask_repeats // 4), warmup=1)
        scores = sum(layer.scores.numel() for layer in layers)
        rows.append([name, batch, f"{scores / 1e6:.2f}M", steps["dense"], steps["biprop"], ratio,
                     "yes" if ratio <= 1.05 else "NO", mask, f"{100 * mask / steps['biprop']:.1f}%",
                     torch_mask, select, sort, sort / select])
        print(f"  {name}: done", flush=True)

    print()
    print(table(["model", "batch", "scores", "dense ms", "BIPROP ms", "ratio", "<=1.05", "mask ms",
                 "mask share", "torch ms", "select ms", "sort-mask ms", "sort/select"],
                rows, ["s", "d", "s", ".1f", ".1f", ".3f", "s", ".2f", "s", ".2f", ".2f", ".2f", ".1f"]))
    print("\nratio = median over rounds of BIPROP / dense step (forward + backward + SGD momentum step); mask = all layers' "
          "effective_weight() with grad\n(C++ kernels); mask share = mask / BIPROP step; torch = the same by the "
          "torch code they replace;\nselect = topk_mask (selection); sort-mask = reference: original sort-based mask.")

if __name__ == "__main__":
    main()
