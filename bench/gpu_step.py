"""Training-step throughput on one GPU: BIPROP vs the same network trained dense, peak memory, the masks' share.

For each model (WideResNet-50-2 at keep 0.2 with signed-constant init, the paper's ImageNet MPT-1/32; ResNet-50),
each batch size and each precision (fp32; bf16 AMP; bf16 AMP + channels_last), times full training steps
(forward, backward, SGD momentum step over the trainable parameters) at 224x224 with batches already on the GPU,
BIPROP and dense in alternating blocks of --steps steps (--rounds rounds, median), so drifts hit both alike.
It also times the mask engine alone (all layers' W_eff by each method: "layerwise", the default, "graphed" and
"batched") and reports the share of the step taken by the method used (--method), and the peak memory of each
kind (see measure()). With --tree, the same for batches from the
torch loader reading a generated JPEG tree (bf16 AMP + channels_last only). Ratios are measured in this run.
A configuration that does not fit in memory prints "OOM" and the run goes on.

  python bench/gpu_step.py                                   # WRN-50-2 and ResNet-50, batch 128 and 256
  python bench/gpu_step.py --models wide_resnet50_2 --batches 128 --tree /tmp/tree   # with the torch loader
  python bench/gpu_step.py --models resnet50 --batches 32 --steps 3 --rounds 1       # smoke test
"""
import argparse
import statistics
import time

import torch
from torch import nn

from biprop_hpc.models import LayerBuilder, build_model

PRECISIONS = (("fp32", False, False), ("bf16", True, False), ("bf16+CL", True, True))
MASK_METHODS = ("layerwise", "graphed", "batched")


def make_tree(root, images=1024, classes=8):
    """A JPEG tree of 320x256 random-texture images (decode and resize cost like ImageNet's)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
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
    loader = TorchLoader(images, plan.steps, True, Preprocess(), workers, seed=0, pin_memory=True)
    epoch = 0
    while True:
        for b in loader.epoch(epoch):
            yield b.images, b.labels
        epoch += 1


def on_gpu(batch):
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    while True:
        yield x, y


class Trainer:
    """One model, optimizer and step function, built on the GPU."""

    def __init__(self, name, layer_type, amp, channels_last, method="auto"):
        torch.manual_seed(0)
        builder = LayerBuilder(keep_ratio=0.2, weight_init="sc", layer_type=layer_type)
        with torch.device("cuda"):
            model = build_model(name, builder, in_channels=3, num_classes=1000, image_size=224)
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.format)
        if getattr(self.model, "mask_engine", None):
            self.model.mask_engine.method = method
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.875, weight_decay=1 / 32768)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.amp = amp

    def step(self, x, y):
        x = x.cuda(non_blocking=True).contiguous(memory_format=self.format)
        y = y.cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            loss = self.criterion(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_steps(self, batches, steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(*next(batches))
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    def mask_ms(self, method, repeats=10):
        engine = self.model.mask_engine
        used, engine.method = engine.method, method
        engine.effective_weights()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            engine.effective_weights()
        torch.cuda.synchronize()
        engine.method = used
        return 1e3 * (time.perf_counter() - start) / repeats


def measure(name, batch, amp, channels_last, source, steps, rounds, method):
    """(BIPROP img/s, dense img/s, BIPROP GiB, dense GiB, mask ms of each of MASK_METHODS) or None (OOM).

    Peak memory of one kind: the most allocated during two steps after three warm-up steps (cuDNN's benchmark
    trials, which only the first model of a shape pays, are done by then), less what was allocated before its
    model was built (the other kind's model): its parameters, gradients, optimizer state and activations.
    """
    trainers, peaks = {}, {}
    try:
        for kind in ("biprop", "dense"):
            before = torch.cuda.memory_allocated()
            trainers[kind] = Trainer(name, kind, amp, channels_last, method)
            batches = source(batch)
            for _ in range(3):
                trainers[kind].step(*next(batches))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                trainers[kind].step(*next(batches))
            torch.cuda.synchronize()
            peaks[kind] = (torch.cuda.max_memory_allocated() - before) / 2**30
        seconds = {kind: [] for kind in trainers}
        batches = source(batch)
        for _ in range(rounds):
            for kind, trainer in trainers.items():
                seconds[kind].append(trainer.timed_steps(batches, steps))
        masks = [trainers["biprop"].mask_ms(m) for m in MASK_METHODS]
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        trainers.clear()
        torch.cuda.empty_cache()
    rate = {kind: batch / statistics.median(s) for kind, s in seconds.items()}
    return rate["biprop"], rate["dense"], peaks["biprop"], peaks["dense"], *masks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["wide_resnet50_2", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--steps", type=int, default=8, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating BIPROP/dense blocks (median)")
    parser.add_argument("--tree", default="", help="also time the torch loader on a JPEG tree generated here")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--method", default="auto", choices=("auto", *MASK_METHODS),
                        help="the mask engine's method in the timed BIPROP steps")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    sources = [("on-GPU", on_gpu)]
    if args.tree:
        make_tree(args.tree)
        sources.append(("torch loader", lambda batch: torch_loader_batches(args.tree, batch, args.workers)))
    header = (f"{'model':16} {'batch':>5} {'input':12} {'precision':9} {'BIPROP img/s':>12} {'dense img/s':>11} "
              f"{'ratio':>6} {'BIPROP GiB':>10} {'dense GiB':>9} "
              + "".join(f"{m + ' mask ms':>18}" for m in MASK_METHODS) + f" {'mask share':>10}")
    print(header + "\n" + "-" * len(header), flush=True)
    for name in args.models:
        for batch in args.batches:
            for input_name, source in sources:
                settings = PRECISIONS if input_name == "on-GPU" else PRECISIONS[-1:]
                for precision, amp, channels_last in settings:
                    row = f"{name:16} {batch:5d} {input_name:12} {precision:9}"
                    result = measure(name, batch, amp, channels_last, source, args.steps, args.rounds,
                                     args.method)
                    if result is None:
                        print(f"{row} {'OOM':>12}", flush=True)
                        continue
                    biprop, dense, biprop_gib, dense_gib, *masks = result
                    used = masks[MASK_METHODS.index("layerwise" if args.method == "auto" else args.method)]
                    share = used / (1e3 * batch / biprop)
                    print(f"{row} {biprop:12.0f} {dense:11.0f} {biprop / dense:6.2f} {biprop_gib:10.1f} "
                          f"{dense_gib:9.1f}" + "".join(f"{m:18.2f}" for m in masks) + f" {100 * share:9.1f}%",
                          flush=True)


if __name__ == "__main__":
    main()
