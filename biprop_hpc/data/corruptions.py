"""Corrupted copies of a test set, CIFAR-10-C style: nine corruptions at five severities each.

The corruptions and their severity parameters are those of Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019), as their CIFAR-10-C generator sets them
(github.com/hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py). That script needs scikit-image,
OpenCV and ImageMagick (Wand), and the `imagecorruptions` package (1.1.2, 2020) no longer runs with today's
scikit-image (`gaussian(..., multichannel=True)` is gone) or setuptools (`pkg_resources`); so the nine that
need nothing beyond numpy and Pillow are written here, each from its definition:

  gaussian_noise   x + N(0, s^2) per value                       s = .04 .06 .08 .09 .10
  shot_noise       Poisson(x * l) / l per value                  l = 500 250 100 75 50
  impulse_noise    a fraction a of the values set to 0 or 1       a = .01 .02 .03 .05 .07
                   (each value flipped with probability a, to 1 or 0 with probability 1/2, as scikit-image's
                   random_noise(mode="s&p") draws them since 0.19; the generator's call)
  speckle_noise    x + x * N(0, s^2) per value                   s = .06 .10 .12 .16 .20
  gaussian_blur    Gaussian filter per channel, sigma            sigma = .4 .6 .7 .8 1
                   (scikit-image's filters.gaussian defaults: mode "nearest", kernel radius
                   int(4 * sigma + 0.5))
  contrast         (x - m) * c + m, m the channel's mean         c = .75 .5 .4 .3 .15
  brightness       HSV value + b, clipped to 1                   b = .05 .1 .15 .2 .3
                   (in RGB: every channel scaled by V'/V, V = the pixel's max; a black pixel becomes grey V')
  pixelate         box-downscale to int(size * f), box-upscale back (Pillow)   f = .95 .9 .85 .75 .65
  jpeg_compression Pillow JPEG at quality q                      q = 80 65 58 50 40

x is the image in [0, 1]; results are clipped to [0, 1] and rounded to the nearest of the 256 levels (the
generator truncates with np.uint8; rounding keeps the mean of an unchanged image unchanged). Grey images (one
channel: MNIST, Fashion-MNIST) are corrupted as a colour image with R = G = B would be.

Random draws are deterministic per (seed, corruption, severity, sample index): each sample has its own numpy
generator seeded with those four numbers, so every rank, every batch size and every run corrupts a sample the
same way.
"""
from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

SEVERITIES = 5


def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, std, x.shape)


def shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * photons) / photons


def impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    flipped = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(flipped, salt.astype(x.dtype), x)


def speckle_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(0.0, std, x.shape)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of scipy.ndimage.gaussian_filter at truncate=4 (scikit-image's default)."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    for axis in (1, 2):  # separable: rows, then columns; the edge pixel repeated beyond the border ("nearest")
        padding = [(0, 0)] * 3
        padding[axis] = (radius, radius)
        padded = np.pad(x, padding, mode="edge")
        size = x.shape[axis]
        x = sum(weight * padded.take(np.arange(i, i + size), axis=axis) for i, weight in enumerate(kernel))
    return x


def contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * factor + means


def brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    value = x.max(axis=0, keepdims=True)
    brighter = np.minimum(value + shift, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(value > 0, x * (brighter / value), brighter)


def _pil(image: np.ndarray) -> Image.Image:
    """A C x H x W uint8 image (C = 1 or 3) as a Pillow image."""
    return Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def _from_pil(picture: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(picture, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def pixelate(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[1:]
    small = _pil(image).resize((int(width * factor), int(height * factor)), Image.Resampling.BOX)
    return _from_pil(small.resize((width, height), Image.Resampling.BOX), image.shape[0])


def jpeg_compression(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    encoded = io.BytesIO()
    _pil(image).save(encoded, format="JPEG", quality=int(quality))
    return _from_pil(Image.open(encoded), image.shape[0])


# name -> (function, its parameter at severities 1..5, whether it works on the uint8 image instead of [0, 1])
CORRUPTIONS: dict[str, tuple[Callable, tuple[float, ...], bool]] = {
    "gaussian_noise": (gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), False),
    "shot_noise": (shot_noise, (500, 250, 100, 75, 50), False),
    "impulse_noise": (impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), False),
    "speckle_noise": (speckle_noise, (0.06, 0.10, 0.12, 0.16, 0.20), False),
    "gaussian_blur": (gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), False),
    "contrast": (contrast, (0.75, 0.5, 0.4, 0.3, 0.15), False),
    "brightness": (brightness, (0.05, 0.1, 0.15, 0.2, 0.3), False),
    "pixelate": (pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), True),
    "jpeg_compression": (jpeg_compression, (80, 65, 58, 50, 40), True),
}


def check_names(names: list[str]) -> list[str]:
    """`names` if every one is a corruption this module makes; ValueError naming the unknown one otherwise."""
    for name in names:
        if name not in CORRUPTIONS:
            raise ValueError(f"corruption {name!r}: unknown; choose from {', '.join(CORRUPTIONS)}")
    return names


def sample_generator(seed: int, name: str, severity: int, index: int) -> np.random.Generator:
    """The generator of one sample's corruption: seeded by (seed, corruption, severity, sample index) alone.
    The corruption enters as the CRC-32 of its name, so adding corruptions changes no other one's draws."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity, index])


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """One C x H x W uint8 image (C = 1 or 3) with corruption `name` at `severity` (1..5), as uint8."""
    if not 1 <= severity <= SEVERITIES:
        raise ValueError(f"severity {severity}: must be 1..{SEVERITIES}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"corrupt: expected a C x H x W uint8 image with 1 or 3 channels, got "
                         f"{image.dtype} {tuple(image.shape)}")
    function, parameters, on_levels = CORRUPTIONS[name]
    if on_levels:
        return function(image, parameters[severity - 1], rng)
    result = function(image.astype(np.float64) / 255.0, parameters[severity - 1], rng)
    return np.rint(np.clip(result, 0.0, 1.0) * 255.0).astype(np.uint8)


def corrupt_samples(images: np.ndarray, indices, name: str, severity: int, seed: int) -> np.ndarray:
    """Images N x C x H x W (uint8) whose sample indices in the whole split are `indices`, each corrupted with
    its own generator (sample_generator)."""
    return np.stack([corrupt(np.ascontiguousarray(image), name, severity,
                             sample_generator(seed, name, severity, int(index)))
                     for image, index in zip(images, indices)]) if len(images) else images.copy()
