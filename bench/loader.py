"""Image-loader throughput on the CPU: the NVIDIA DALI CPU pipeline vs the torch (PIL/torchvision) loader.

Both loaders read the same JPEG tree through the same sample plan and produce normalised 3x224x224 batches
with biprop_hpc.data.images.Preprocess() defaults:
  train  random-resized-crop 224 (area [0.08, 1], aspect [3/4, 4/3]) + random flip   (TrainPlan, shuffled)
  eval   resize shorter side to 256 + centre crop 224                                 (eval_steps)
DaliLoader runs with cpu_only=True on device cpu with --workers threads; TorchLoader with --workers
DataLoader worker processes (new workers each epoch, as in training). One epoch = every image once.
Each loader runs --warmup untimed epochs (pipeline build, page cache) then --repeats timed epochs back
to back (not interleaved: DALI prefetches in background threads across epoch ends); images/s is the
median over the timed epochs, and DALI/torch is the ratio of the two medians from this run.

The tree, unless --tree names an existing one, is generated in a temporary folder and deleted afterwards:
--images ImageNet-like RGB JPEGs of 500x375 (every 4th one 375x500), quality 90, about 100 KB each
(smooth random colour fields plus pixel noise, so decode work is like a photo's).

  python bench/loader.py                       # defaults: 512 images, batch 64, 2 workers, warmup 1, repeats 3
  python bench/loader.py --images 128 --batch 32 --repeats 1     # smoke test
"""
import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _timing import table
from biprop_hpc.data.batches import TrainPlan, eval_steps
from biprop_hpc.data.images import DaliLoader, Preprocess, TorchLoader, dali_available
from biprop_hpc.data.tree import scan_split


def make_jpeg_tree(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """<root>/train/c<k>/<i>.jpg: ImageNet-like 500x375 RGB JPEGs of ~100 KB."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "train" / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (375, 500) if i % 4 == 3 else (500, 375)
        base = rng.integers(0, 255, (36, 48, 3) if width > height else (48, 36, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels += rng.normal(0, 16, pixels.shape).astype(np.float32)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def make_loader(kind: str, training: bool, images, batch: int, workers: int):
    prep = Preprocess()
    if training:
        plan = TrainPlan(len(images), batch, 0, 1, seed=0)
        steps_of_epoch = plan.steps
    else:
        steps = eval_steps(len(images), batch, 0, 1)
        steps_of_epoch = lambda epoch: steps  # noqa: E731
    if kind == "dali":
        return DaliLoader(images, steps_of_epoch, training, prep, torch.device("cpu"), workers, seed=0,
                          cpu_only=True)
    return TorchLoader(images, steps_of_epoch, training, prep, workers, seed=0)


def run_epoch(loader, epoch: int) -> tuple[int, float]:
    count = 0
    start = time.perf_counter()
    for batch in loader.epoch(epoch):
        assert batch.images.shape[1:] == (3, 224, 224), batch.images.shape
        count += batch.images.shape[0]
    return count, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", default="", help="an existing tree with train/ (default: generate one)")
    parser.add_argument("--images", type=int, default=512, help="images to generate")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = torch DataLoader workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per loader and mode")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per loader and mode (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not dali_available():
        raise SystemExit("nvidia.dali is not installed")
    import nvidia.dali
    import torchvision

    temporary = None
    if args.tree:
        root = Path(args.tree)
        if not (root / "train").is_dir():
            make_jpeg_tree(root, args.images, args.classes)
    else:
        temporary = root = Path(tempfile.mkdtemp(prefix="biprop-loader-bench-"))
        make_jpeg_tree(root, args.images, args.classes)
    try:
        images = scan_split(root, "train")
        size_kb = sum(os.path.getsize(f) for f in images.files) / len(images) / 1024
        print(f"tree {root}: {len(images)} JPEGs, mean {size_kb:.0f} KB; batch {args.batch}; "
              f"{args.workers} DALI threads / torch workers; DALI {nvidia.dali.__version__} (CPU), "
              f"torch {torch.__version__}, torchvision {torchvision.__version__}; "
              f"warmup {args.warmup}, repeats {args.repeats} epochs (median)", flush=True)
        rows = []
        for mode in args.modes.split(","):
            training = mode == "train"
            rates = {}
            # One loader at a time, epochs back to back: DALI prefetches the next epoch in background
            # threads after each one, which would steal CPU from (and be hidden in) an interleaved torch epoch.
            for kind in ("torch", "dali"):
                loader = make_loader(kind, training, images, args.batch, args.workers)
                rates[kind] = []
                for epoch in range(args.warmup + args.repeats):
                    count, seconds = run_epoch(loader, epoch)
                    if epoch >= args.warmup:
                        rates[kind].append(count / seconds)
                del loader
                gc.collect()
            dali, torch_rate = (statistics.median(rates[k]) for k in ("dali", "torch"))
            label = "train (random-resized-crop 224)" if training else "eval (resize 256, centre crop 224)"
            rows.append([label, dali, torch_rate, dali / torch_rate])
            print(f"  {mode}: done", flush=True)
        print()
        print(table(["mode", "DALI CPU img/s", "torch img/s", "DALI/torch"], rows, ["s", ".1f", ".1f", ".2f"]))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
