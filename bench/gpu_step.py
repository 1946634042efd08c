"""WideResNet-50-2 training-step throughput on one GPU: BIPROP vs the same network trained dense.

Times full training steps (forward, backward, optimizer step) at 224x224, batch --batch, for fp32, AMP
(bf16) and channels_last, with (a) batches already on the GPU (the model's own speed) and (b) batches
from the torch loader reading a generated JPEG tree (what a run without DALI gets). Prints one table;
ratios are BIPROP / dense images per second measured in this run.

  python bench/gpu_step.py --batch 64 --steps 20 --tree /tmp/jpeg-tree
"""
import argparse
import time

import torch
from torch import nn

from biprop_hpc.models import LayerBuilder, build_model


def make_tree(root, images=2048, classes=8):
    """A JPEG tree of 320x256 random-texture images (decode and resize cost like ImageNet's)."""
    import numpy as np
    from PIL import Image
    from pathlib import Path
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = Path(root) / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)
        Image.fromarray(base).resize((320, 256), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)


def torch_loader_batches(root, batch, workers):
    from biprop_hpc.data.batches import TrainPlan
    from biprop_hpc.data.images import Preprocess, TorchLoader
    from biprop_hpc.data.tree import scan_split
    images = scan_split(root, "train")
    plan = TrainPlan(len(images), batch, 0, 1, seed=0)
    loader = TorchLoader(images, plan.steps, True, Preprocess(), workers, seed=0)
    epoch = 0
    while True:
        for b in loader.epoch(epoch):
            yield b.images, b.labels
        epoch += 1


def step_rate(layer_type, amp, channels_last, batch, steps, source):
    torch.manual_seed(0)
    builder = LayerBuilder(keep_ratio=0.2, weight_init="sc", layer_type=layer_type)
    model = build_model("wide_resnet50_2", builder, in_channels=3, num_classes=1000, image_size=224).cuda()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.875, weight_decay=1 / 32768)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(x, y):
        x = x.cuda(non_blocking=True).contiguous(memory_format=memory_format)
        y = y.cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = source()
    for _ in range(3):
        step(*next(batches))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return rate, memory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tree", default="")
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch}")

    def on_gpu():
        x = torch.randn(args.batch, 3, 224, 224, device="cuda")
        y = torch.randint(0, 1000, (args.batch,), device="cuda")
        while True:
            yield x, y

    sources = [("on-GPU tensors", on_gpu)]
    if args.tree:
        make_tree(args.tree)
        sources.append(("torch loader", lambda: torch_loader_batches(args.tree, args.batch, args.workers)))
    print(f"{'input':16} {'precision':10} {'layout':14} {'BIPROP img/s':>13} {'dense img/s':>12} "
          f"{'ratio':>6} {'BIPROP GiB':>10}")
    for name, source in sources:
        settings = [(False, False), (True, False), (True, True)] if name.startswith("on") else [(True, True)]
        for amp, channels_last in settings:
            biprop, memory = step_rate("biprop", amp, channels_last, args.batch, args.steps, source)
            dense, _ = step_rate("dense", amp, channels_last, args.batch, args.steps, source)
            print(f"{name:16} {'bf16 AMP' if amp else 'fp32':10} {'channels_last' if channels_last else 'NCHW':14} "
                  f"{biprop:13.0f} {dense:12.0f} {biprop / dense:6.2f} {memory:10.1f}", flush=True)


if __name__ == "__main__":
    main()
