"""Loaders for image trees (ImageNet): NVIDIA DALI pipelines, and a torchvision fallback.

Both follow the same sample plan as the in-memory loaders (batches.TrainPlan / eval_steps): every sample
once per epoch across ranks, the same number of steps on every rank, no padded duplicates. The plan
decides which files a step reads; the loader decodes and augments them:

  train: decode with a random crop (area in [random_area_min, 1], aspect in [3/4, 4/3]) -> resize to
         crop_size -> random horizontal flip -> normalise (ImageNet mean/std) -> CHW float
  eval:  decode -> resize the shorter side to resize_size -> centre crop crop_size -> normalise

One DALI pipeline definition serves both devices: on a GPU the decoder runs as "mixed" (nvJPEG) and the
batches land on the rank's GPU; without one (or with loader dali-cpu) it is built with device_id=None and
CPU operators. Encoded files are handed to DALI through an external source that follows the plan.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from biprop_hpc.data.batches import Batch, epoch_generator
from biprop_hpc.data.tree import BadImage, ImageList

log = logging.getLogger("biprop_hpc")

PREFETCH = 2  # DALI batches prepared ahead of the one in use
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    crop_size: int = 224
    resize_size: int = 256
    random_area_min: float = 0.08
    channels_last: bool = False


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


class _PlanSource:
    """DALI external source: the encoded files and labels of each step, epoch after epoch."""

    def __init__(self, images: ImageList, steps_of_epoch, first_epoch: int):
        self.images, self.steps_of_epoch, self.first_epoch = images, steps_of_epoch, first_epoch

    def __call__(self, info):
        steps = self.steps_of_epoch(self.first_epoch + info.epoch_idx)
        if info.iteration >= len(steps):
            raise StopIteration
        index = steps[info.iteration][0].tolist()
        files = [np.fromfile(self.images.files[i], dtype=np.uint8) for i in index]
        labels = [np.array([self.images.labels[i]], dtype=np.int64) for i in index]
        return files, labels


def _dali_pipeline(source, training: bool, prep: Preprocess, gpu: bool, batch_size: int, threads: int,
                   device_id, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=PREFETCH)
    def pipeline():
        encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
        decoder = "mixed" if gpu else "cpu"
        if training:
            images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                   random_area=[prep.random_area_min, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3])
            images = fn.resize(images, resize_x=prep.crop_size, resize_y=prep.crop_size)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=prep.resize_size)
            mirror = 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, crop=(prep.crop_size, prep.crop_size),
                                          output_layout="HWC" if prep.channels_last else "CHW",
                                          mean=[255 * m for m in IMAGENET_MEAN],
                                          std=[255 * s for s in IMAGENET_STD], mirror=mirror)
        return images, (labels.gpu() if gpu else labels)

    return pipeline()


class DaliLoader:
    """Batches of one rank through a DALI pipeline; `steps_of_epoch(epoch)` is the plan."""

    def __init__(self, images: ImageList, steps_of_epoch, training: bool, prep: Preprocess,
                 device: torch.device, threads: int, seed: int, cpu_only: bool = False):
        self.images, self.steps_of_epoch, self.training, self.prep = images, steps_of_epoch, training, prep
        self.gpu = device.type == "cuda" and not cpu_only
        self.device, self.threads, self.seed = device, threads, seed
        # The largest step of the plan (a short remainder joins the last global batch), the same every epoch.
        self.batch_size = max(len(index) for index, _ in steps_of_epoch(0))
        self.iterator, self.next_epoch, self.unfinished = None, None, False

    def _start(self, epoch: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        source = _PlanSource(self.images, self.steps_of_epoch, epoch)
        pipe = _dali_pipeline(source, self.training, self.prep, self.gpu, self.batch_size, self.threads,
                              self.device.index if self.gpu else None, self.seed)
        self.iterator = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)
        self.next_epoch = epoch

    def __len__(self) -> int:
        return len(self.steps_of_epoch(0))  # the same for every epoch

    def epoch(self, epoch: int):
        if self.unfinished:  # the previous epoch's consumer stopped right after its last batch
            self._finish_epoch()
        steps = self.steps_of_epoch(epoch)
        step = 0
        try:
            if self.iterator is None:
                self._start(epoch)
            if epoch != self.next_epoch:
                raise RuntimeError(f"DALI loader: epochs run in order; expected {self.next_epoch}, got {epoch}")
            for step, (_, global_size) in enumerate(steps):
                outputs = next(self.iterator)  # not iter(): DALI's __iter__ resets a consumed iterator
                images = outputs[0]["images"]
                if self.prep.channels_last:  # NHWC data seen as an NCHW tensor in channels_last memory format
                    images = images.permute(0, 3, 1, 2)
                self.unfinished = step == len(steps) - 1
                yield Batch(images, outputs[0]["labels"].view(-1).long(), global_size)
        except RuntimeError as error:
            # DALI does not know file names: find the culprit among this step's and the prefetched steps' files.
            suspects = torch.cat([index for index, _ in steps[step:step + PREFETCH + 1]])
            raise bad_image_in(self.images, suspects, error) from None
        self._finish_epoch()

    def _finish_epoch(self):
        try:  # the source has ended the epoch: nothing is left but DALI's StopIteration
            next(self.iterator)
        except StopIteration:
            self.iterator.reset()
        else:
            raise RuntimeError("DALI loader: the pipeline returned more batches than the plan has steps")
        self.next_epoch += 1
        self.unfinished = False

    def __iter__(self):
        """Evaluation: the same steps every time."""
        epoch = 0 if self.next_epoch is None else self.next_epoch
        return self.epoch(epoch)


def bad_image_in(images: ImageList, index, error) -> Exception:
    """The decoding error of a step, named by the file that caused it (found by decoding the step's files)."""
    from biprop_hpc.data.check import decode_problem
    for i in index.tolist():
        problem = decode_problem(str(images.files[i]))
        if problem:
            return BadImage(f"{images.files[i]} {problem}; run `biprop data check DIR --skip-bad-images` "
                            "to leave such files out")
    return error


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, images: ImageList, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.images.files[i]) as image:
                return self.transform(image.convert("RGB")), self.images.labels[i]
        except OSError as error:  # PIL's UnidentifiedImageError and truncation errors
            raise BadImage(f"{self.images.files[i]} does not decode ({error}); run `biprop data check DIR "
                           "--skip-bad-images` to leave such files out") from None


def torch_transform(training: bool, prep: Preprocess):
    from torchvision import transforms as T
    if training:
        steps = [T.RandomResizedCrop(prep.crop_size, scale=(prep.random_area_min, 1.0), ratio=(3 / 4, 4 / 3)),
                 T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(prep.resize_size), T.CenterCrop(prep.crop_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TorchLoader:
    """The fallback: PIL decoding and torchvision transforms in DataLoader workers, same plan as DALI."""

    def __init__(self, images: ImageList, steps_of_epoch, training: bool, prep: Preprocess, workers: int,
                 seed: int):
        self.dataset = _FileDataset(images, torch_transform(training, prep))
        self.steps_of_epoch, self.workers, self.seed = steps_of_epoch, workers, seed

    def __len__(self) -> int:
        return len(self.steps_of_epoch(0))  # the same for every epoch

    def epoch(self, epoch: int):
        steps = self.steps_of_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[index.tolist() for index, _ in steps], num_workers=self.workers,
            generator=epoch_generator(self.seed, epoch),
            persistent_workers=False, pin_memory=False)
        for (_, global_size), (images, labels) in zip(steps, loader):
            yield Batch(images, labels, global_size)

    def __iter__(self):
        return self.epoch(0)
