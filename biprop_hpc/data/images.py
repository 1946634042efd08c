"""Loaders for image trees (ImageNet): NVIDIA DALI pipelines, and a torchvision fallback.

Both follow the same sample plan as the in-memory loaders (batches.TrainPlan / eval_steps): every sample
once per epoch across ranks, the same number of steps on every rank, no padded duplicates. The plan
decides which files a step reads; the loader decodes and augments them:

  train: decode with a random crop (area in [random_area_min, 1], aspect in [3/4, 4/3]) -> resize to
         crop_size -> random horizontal flip -> normalise (ImageNet mean/std) -> CHW float
  eval:  decode -> resize the shorter side to resize_size -> centre crop crop_size -> normalise

The crop window and the flip of a training sample are a function of (seed, epoch, sample index) alone
(`crop_window`), computed on the host and handed to either loader: a sample gets the same augmentation
whatever the loader, the number of ranks or workers, and wherever a run was stopped and resumed.

One DALI pipeline definition serves both devices: on a GPU the decoder runs as "mixed" (nvJPEG) and the
batches land on the rank's GPU; without one (or with loader dali-cpu) it is built with device_id=None and
CPU operators. Encoded files, crop windows and flips reach DALI through an external source that follows
the plan. Both loaders ignore EXIF orientation (as PIL does by default), so they see the same pixels.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from biprop_hpc.data.augment import Augmentation, augment_batch
from biprop_hpc.data.batches import Batch
from biprop_hpc.data.tree import BadImage, ImageList

log = logging.getLogger("biprop_hpc")

PREFETCH = 2  # DALI batches prepared ahead of the one in use
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RATIOS = (3 / 4, 4 / 3)


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


def crop_window(seed: int, epoch: int, sample: int, width: int, height: int, area_min: float):
    """(x, y, w, h, flip) for one training sample, drawn from a generator seeded by (seed, epoch, sample).

    The window covers an area fraction in [area_min, 1] with an aspect ratio log-uniform in [3/4, 4/3]; after
    ten misses it is the largest centred window within those ratios (torchvision's RandomResizedCrop rule).
    The flip has probability 1/2.
    """
    rng = np.random.default_rng([seed, epoch, sample])
    flip = bool(rng.random() < 0.5)
    log_ratios = (math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1]))
    for _ in range(10):
        target = width * height * rng.uniform(area_min, 1.0)
        ratio = math.exp(rng.uniform(*log_ratios))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h, flip
    ratio = width / height
    w, h = width, height
    if ratio < ASPECT_RATIOS[0]:
        h = min(height, round(width / ASPECT_RATIOS[0]))
    elif ratio > ASPECT_RATIOS[1]:
        w = min(width, round(height * ASPECT_RATIOS[1]))
    return (width - w) // 2, (height - h) // 2, w, h, flip


def _bad_file(images: ImageList, i: int, error) -> BadImage:
    return BadImage(f"{images.files[i]} does not decode ({error}); run `biprop data check DIR "
                    "--skip-bad-images` to leave such files out")


def encoded_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) read from an encoded image's header, without decoding the pixels."""
    from PIL import Image
    with Image.open(io.BytesIO(data.tobytes())) as image:
        return image.size


class _PlanSource:
    """DALI external source: each step's encoded files and labels (and, for training, crop windows and
    flips), epoch after epoch; the first epoch may start at a later step (a resumed run)."""

    def __init__(self, images: ImageList, steps_of_epoch, first_epoch: int, first_step: int, training: bool,
                 seed: int, area_min: float):
        self.images, self.steps_of_epoch = images, steps_of_epoch
        self.first_epoch, self.first_step = first_epoch, first_step
        self.training, self.seed, self.area_min = training, seed, area_min

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        step = info.iteration + (self.first_step if info.epoch_idx == 0 else 0)
        steps = self.steps_of_epoch(epoch)
        if step >= len(steps):
            raise StopIteration
        index = steps[step][0].tolist()
        files = [np.fromfile(self.images.files[i], dtype=np.uint8) for i in index]
        labels = [np.array([self.images.labels[i]], dtype=np.int64) for i in index]
        if not self.training:
            return files, labels
        windows = []
        for i, data in zip(index, files):
            try:
                width, height = encoded_size(data)
            except OSError as error:  # not an image at all: name it here, DALI could not
                raise _bad_file(self.images, i, error) from None
            windows.append(crop_window(self.seed, epoch, i, width, height, self.area_min))
        return (files, labels, [np.array(w[:2], dtype=np.int32) for w in windows],
                [np.array(w[2:4], dtype=np.int32) for w in windows],
                [np.array(int(w[4]), dtype=np.int32) for w in windows])


def _dali_pipeline(source, training: bool, prep: Preprocess, gpu: bool, batch_size: int, threads: int,
                   device_id):
    from nvidia.dali import fn, pipeline_def, types

    # The seed is fixed: every random choice comes from the source, so the pipeline draws nothing itself.
    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=0,
                  prefetch_queue_depth=PREFETCH)
    def pipeline():
        decoder = "mixed" if gpu else "cpu"
        if training:
            encoded, labels, anchor, shape, mirror = fn.external_source(
                source=source, num_outputs=5, batch=True, batch_info=True)
            images = fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB,
                                             axis_names="WH", adjust_orientation=False)
            images = fn.resize(images, resize_x=prep.crop_size, resize_y=prep.crop_size)
        else:
            encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, resize_shorter=prep.resize_size)
            mirror = 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, crop=(prep.crop_size, prep.crop_size),
                                          output_layout="HWC" if prep.channels_last else "CHW",
                                          mean=[255 * m for m in IMAGENET_MEAN],
                                          std=[255 * s for s in IMAGENET_STD], mirror=mirror)
        return images, (labels.gpu() if gpu else labels)

    return pipeline()


class DaliLoader:
    """Batches of one rank through a DALI pipeline; `steps_of_epoch(epoch)` is the plan.

    Epochs run in order on one pipeline; the first one may start at a later step (a resumed run). A rank
    whose share of a split is empty gets no batches and builds no pipeline.
    """

    def __init__(self, images: ImageList, steps_of_epoch, training: bool, prep: Preprocess,
                 device: torch.device, threads: int, seed: int, cpu_only: bool = False):
        self.images, self.steps_of_epoch, self.training, self.prep = images, steps_of_epoch, training, prep
        self.gpu = device.type == "cuda" and not cpu_only
        self.device, self.threads, self.seed = device, threads, seed
        # The largest step of the plan (a short remainder joins the last global batch), the same every epoch.
        self.batch_size = max((len(index) for index, _ in steps_of_epoch(0)), default=0)
        self.iterator, self.next_epoch, self.unfinished = None, None, False

    def _start(self, epoch: int, step: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        source = _PlanSource(self.images, self.steps_of_epoch, epoch, step, self.training, self.seed,
                             self.prep.random_area_min)
        pipe = _dali_pipeline(source, self.training, self.prep, self.gpu, self.batch_size, self.threads,
                              self.device.index if self.gpu else None)
        self.iterator = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)
        self.next_epoch = epoch

    def __len__(self) -> int:
        return len(self.steps_of_epoch(0))  # the same for every epoch

    def steps(self, epoch: int):
        return self.steps_of_epoch(epoch)

    def epoch(self, epoch: int, start: int = 0):
        steps = self.steps_of_epoch(epoch)[start:]
        if not steps:
            return
        if self.unfinished:  # the previous epoch's consumer stopped right after its last batch
            self._finish_epoch()
        if self.iterator is None:
            self._start(epoch, start)
        elif epoch != self.next_epoch or start:
            raise RuntimeError(f"DALI loader: epochs run in order, from their first step after the first one; "
                               f"expected epoch {self.next_epoch}, got epoch {epoch} from step {start}")
        step = 0
        try:
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


def torch_transform(prep: Preprocess, training: bool):
    """After decoding: training resizes the crop window to crop_size (flip aside); evaluation resizes the
    shorter side and centre-crops. Both then normalise."""
    from torchvision import transforms as T
    steps = [] if training else [T.Resize(prep.resize_size), T.CenterCrop(prep.crop_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _FileDataset(torch.utils.data.Dataset):
    """Item i (evaluation) or (i, epoch) (training) -> (image tensor, label), or with AugMix's consistency
    loss (image tensor, 2 x C x H x W views, label)."""

    def __init__(self, images: ImageList, training: bool, prep: Preprocess, seed: int,
                 augmentation: Augmentation = Augmentation()):
        self.images, self.training, self.prep, self.seed = images, training, prep, seed
        self.augmentation = augmentation
        self.transform = torch_transform(prep, training)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF
        i, epoch = item if self.training else (item, None)
        try:
            with Image.open(self.images.files[i]) as image:
                image = image.convert("RGB")
        except OSError as error:  # PIL's UnidentifiedImageError and truncation errors
            raise _bad_file(self.images, i, error) from None
        if self.training:
            x, y, w, h, flip = crop_window(self.seed, epoch, i, *image.size, self.prep.random_area_min)
            image = TF.resized_crop(image, y, x, h, w, [self.prep.crop_size] * 2, InterpolationMode.BILINEAR,
                                    antialias=True)
            if flip:
                image = TF.hflip(image)
            if self.augmentation.kind != "none":  # AugMix or noise on the crop (data.augment)
                return self._augmented(TF.pil_to_tensor(image), i, epoch)
        return self.transform(image), self.images.labels[i]

    def _augmented(self, image: torch.Tensor, i: int, epoch: int):
        from torchvision.transforms import functional as TF
        images, views = augment_batch(image[None], [i], epoch, self.seed, self.augmentation)
        normalised = TF.normalize(images[0], IMAGENET_MEAN, IMAGENET_STD)
        if views is None:
            return normalised, self.images.labels[i]
        return normalised, TF.normalize(views[:, 0], IMAGENET_MEAN, IMAGENET_STD), self.images.labels[i]


class TorchLoader:
    """The fallback: PIL decoding and torchvision transforms in DataLoader workers, same plan as DALI."""

    def __init__(self, images: ImageList, steps_of_epoch, training: bool, prep: Preprocess, workers: int,
                 seed: int, pin_memory: bool = False, augmentation: Augmentation = Augmentation()):
        self.dataset = _FileDataset(images, training, prep, seed, augmentation)
        self.steps_of_epoch, self.training = steps_of_epoch, training
        self.workers, self.pin_memory = workers, pin_memory

    def __len__(self) -> int:
        return len(self.steps_of_epoch(0))  # the same for every epoch

    def steps(self, epoch: int):
        return self.steps_of_epoch(epoch)

    def epoch(self, epoch: int, start: int = 0):
        steps = self.steps_of_epoch(epoch)[start:]
        batches = [[(i, epoch) if self.training else i for i in index.tolist()] for index, _ in steps]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                             persistent_workers=False, pin_memory=self.pin_memory)
        for (_, global_size), items in zip(steps, loader):
            if len(items) == 3:  # the views come B x 2 x C x H x W out of the collation
                yield Batch(items[0], items[2], global_size, items[1].transpose(0, 1))
            else:
                yield Batch(items[0], items[1], global_size)

    def __iter__(self):
        return self.epoch(0)
