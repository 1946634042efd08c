"""Training augmentation from "A Winning Hand" (Diffenderfer et al., 2021): AugMix and Gaussian noise.

Both act on a training sample after the dataset's standard crop and flip (`augment`), as the original code did
(its CIFAR-10 loaders: flip and padded crop, then AugMix or noise). Evaluation never sees them.

augmix: AugMix (Hendrycks et al., 2020). A view mixes `width` chains of `depth` random operations (depth -1:
    1 to 3, drawn per chain) with Dirichlet(alpha) weights, then blends the mix with the image by m ~ Beta(alpha,
    alpha). The operations are torchvision's functional primitives with the original's magnitudes: a level
    uniform in [0.1, severity] scales each operation's maximum as level / 10 (rotation 30 degrees, shear 0.3,
    translation a third of the image, posterize 4 bits, solarize 256; with `all_ops` also colour, contrast,
    brightness and sharpness factors in [0.1, 1.9]). With the consistency loss (`jsd_weight` > 0) a sample
    gives the clean image and two AugMix views; the loss is CE(clean) + jsd_weight * JS(clean, view 1, view 2)
    (train.losses). With jsd_weight 0 a sample gives one AugMix view, trained with CE alone.
gaussian: each training image is noised with probability `noise_fraction` (a Bernoulli draw per image, as the
    original's RandomApply): N(0, noise_std^2) is added to the [0, 1] pixel values, which are then clamped to
    [0, 1], before normalisation (as the original's AddGaussianNoise).

Every random choice of a sample is drawn from a generator seeded by (seed, epoch, sample index, stream), so a
sample is augmented the same way on any number of ranks or loader workers and after a resume (mid-epoch too).
`gaussian_noise` is importable on its own (e.g. to make noise corruptions for evaluation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

AUGMIX_STREAM = 1   # the last seed word of a sample's generator, so the streams never coincide
NOISE_STREAM = 2
MAX_LEVEL = 10.0    # AugMix's PARAMETER_MAX: a level of 10 gives an operation's maximum magnitude


@dataclass(frozen=True)
class Augmentation:
    kind: str = "none"          # none | augmix | gaussian
    severity: int = 3
    width: int = 3
    depth: int = -1
    alpha: float = 1.0
    all_ops: bool = False
    jsd_weight: float = 12.0
    noise_std: float = 0.1
    noise_fraction: float = 0.5

    @classmethod
    def from_config(cls, cfg) -> "Augmentation":
        return cls(cfg.augmentation, cfg.augmix_severity, cfg.augmix_width, cfg.augmix_depth, cfg.augmix_alpha,
                   cfg.augmix_all_ops, cfg.jsd_weight, cfg.noise_std, cfg.noise_fraction)

    @property
    def views(self) -> int:
        """Augmented views per sample beside the clean image: 2 with the consistency loss, else 0."""
        return 2 if self.kind == "augmix" and self.jsd_weight > 0 else 0


def sample_generator(seed: int, epoch: int, sample: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, sample, stream])


def gaussian_noise(images: torch.Tensor, std: float, rng: np.random.Generator) -> torch.Tensor:
    """`images` (floats in [0, 1], any shape) plus N(0, std^2) noise drawn from `rng`, clamped to [0, 1]."""
    noise = torch.from_numpy(rng.standard_normal(tuple(images.shape), dtype=np.float32))
    return (images + std * noise).clamp_(0.0, 1.0)


# --- AugMix's operations: (uint8 C x H x W tensor, level in [0.1, severity], rng) -> uint8 tensor ------------

def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image, angle=0.0, translate=(0, 0), shear=(0.0, 0.0)):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    # The origin at the top-left corner, as PIL's Image.transform that the original's shears used.
    return TF.affine(image, angle=angle, translate=list(translate), scale=1.0, shear=list(shear),
                     interpolation=InterpolationMode.BILINEAR, center=[0, 0])


def _autocontrast(image, level, rng):
    from torchvision.transforms import functional as TF
    return TF.autocontrast(image)


def _equalize(image, level, rng):
    from torchvision.transforms import functional as TF
    return TF.equalize(image)


def _posterize(image, level, rng):
    from torchvision.transforms import functional as TF
    return TF.posterize(image, 4 - int(level * 4 / MAX_LEVEL))


def _solarize(image, level, rng):
    from torchvision.transforms import functional as TF
    return TF.solarize(image, 256 - int(level * 256 / MAX_LEVEL))


def _rotate(image, level, rng):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    degrees = _signed(float(int(level * 30 / MAX_LEVEL)), rng)
    return TF.rotate(image, degrees, interpolation=InterpolationMode.BILINEAR)


def _shear_x(image, level, rng):
    factor = _signed(level * 0.3 / MAX_LEVEL, rng)
    return _affine(image, shear=(math.degrees(math.atan(factor)), 0.0))


def _shear_y(image, level, rng):
    factor = _signed(level * 0.3 / MAX_LEVEL, rng)
    return _affine(image, shear=(0.0, math.degrees(math.atan(factor))))


def _translate_x(image, level, rng):
    pixels = _signed(int(level * image.shape[-1] / 3 / MAX_LEVEL), rng)
    return _affine(image, translate=(pixels, 0))


def _translate_y(image, level, rng):
    pixels = _signed(int(level * image.shape[-2] / 3 / MAX_LEVEL), rng)
    return _affine(image, translate=(0, pixels))


def _enhance(adjust):
    def operation(image, level, rng):
        return adjust(image, level * 1.8 / MAX_LEVEL + 0.1)
    return operation


def _color(image, factor):
    from torchvision.transforms import functional as TF
    return image if image.shape[0] == 1 else TF.adjust_saturation(image, factor)


def _contrast(image, factor):
    from torchvision.transforms import functional as TF
    return TF.adjust_contrast(image, factor)


def _brightness(image, factor):
    from torchvision.transforms import functional as TF
    return TF.adjust_brightness(image, factor)


def _sharpness(image, factor):
    from torchvision.transforms import functional as TF
    return TF.adjust_sharpness(image, factor)


# The original's default list leaves out the colour operations, which overlap with the corruptions of
# CIFAR-10-C / ImageNet-C that robustness is measured on; all_ops adds them (its --all-augmix-augmentations).
OPERATIONS = (_autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y, _translate_x,
              _translate_y)
ALL_OPERATIONS = OPERATIONS + tuple(_enhance(f) for f in (_color, _contrast, _brightness, _sharpness))


def augmix(image: torch.Tensor, rng: np.random.Generator, aug: Augmentation) -> torch.Tensor:
    """One AugMix view of a uint8 C x H x W image, as floats in [0, 1] (mixing is done on these, before
    normalisation: normalising is affine and the weights are convex, so the order does not matter)."""
    operations = ALL_OPERATIONS if aug.all_ops else OPERATIONS
    weights = rng.dirichlet([aug.alpha] * aug.width)
    m = rng.beta(aug.alpha, aug.alpha)
    mix = torch.zeros(image.shape, dtype=torch.float32)
    for weight in weights:
        chain = image
        for _ in range(aug.depth if aug.depth > 0 else int(rng.integers(1, 4))):
            operation = operations[int(rng.integers(len(operations)))]
            chain = operation(chain, rng.uniform(0.1, aug.severity), rng)
        mix += float(weight) * chain.float()
    return ((1 - m) * image.float() + m * mix) / 255.0


def augment_batch(images: torch.Tensor, samples: list[int], epoch: int, seed: int, aug: Augmentation):
    """(training images, views) of uint8 B x C x H x W `images` whose sample indices are `samples`, as floats
    in [0, 1]: views is 2 x B x C x H x W (clean images plus two AugMix views each) or None."""
    if aug.kind == "none":
        return images.float() / 255.0, None
    if aug.kind == "gaussian":
        out = images.float() / 255.0
        for row, sample in enumerate(samples):
            rng = sample_generator(seed, epoch, sample, NOISE_STREAM)
            if rng.random() < aug.noise_fraction:
                out[row] = gaussian_noise(out[row], aug.noise_std, rng)
        return out, None
    drawn = []
    for row, sample in enumerate(samples):
        rng = sample_generator(seed, epoch, sample, AUGMIX_STREAM)
        drawn.append([augmix(images[row], rng, aug) for _ in range(max(aug.views, 1))])
    if aug.views == 0:
        return torch.stack([views[0] for views in drawn]), None
    return images.float() / 255.0, torch.stack([torch.stack(views) for views in drawn], dim=1)
