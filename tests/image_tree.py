"""A small, real ImageNet-style tree of mixed images for tests: <root>/<split>/<class>/<image>.

Images cycle through the kinds a real tree holds: RGB, grayscale and CMYK JPEGs, RGB and RGBA PNGs,
upper-case extensions, of mixed sizes and aspect ratios. Each class has its own colour (a grayscale image
its own grey level), plus seeded noise and a random darker rectangle, so a classifier can learn the class
while no two images are equal. Deterministic for a given seed.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

# (extension, PIL mode, (width, height), save format)
IMAGE_KINDS = (
    (".jpg", "RGB", (40, 30), "JPEG"),
    (".jpeg", "L", (17, 64), "JPEG"),
    (".jpg", "CMYK", (300, 200), "JPEG"),
    (".png", "RGB", (64, 64), "PNG"),
    (".png", "RGBA", (33, 47), "PNG"),
    (".JPG", "RGB", (200, 300), "JPEG"),
    (".jpg", "L", (96, 72), "JPEG"),
)
DEFAULT_PER_CLASS = {"train": 7, "val": 3, "test": 2}


def class_colour(label: int, classes: int) -> tuple[int, int, int]:
    """Distinct, well separated hues, one per class."""
    r, g, b = colorsys.hsv_to_rgb(label / classes, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def class_folder(label: int) -> str:
    return f"class{label:03d}"   # zero-padded: sorted folder order is label order


def render(label: int, classes: int, kind: tuple, rng: np.random.Generator) -> Image.Image:
    _, mode, (width, height), _ = kind
    colour = np.array(class_colour(label, classes), dtype=np.float64)
    pixels = np.broadcast_to(colour, (height, width, 3)) + rng.normal(0, 12, (height, width, 3))
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    pixels[y0:y0 + height // 3, x0:x0 + width // 3] *= 0.6
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    if mode == "L":   # the class's own grey level rather than the luma of its hue
        grey = 30 + 200 * label / max(1, classes - 1)
        image = Image.fromarray((np.full((height, width), grey) + rng.normal(0, 8, (height, width)))
                                .clip(0, 255).astype(np.uint8))
    elif mode == "RGBA":
        alpha = np.full((height, width, 1), 255, dtype=np.uint8)
        alpha[: height // 4] = 128
        image = Image.fromarray(np.concatenate([np.asarray(image), alpha], axis=2))
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def make_image_tree(root, classes: int = 3, per_class: dict | None = None, seed: int = 0) -> dict:
    """Write the tree under `root`; return {split: [(path, label), ...]} in scan order (class, file name)."""
    root = Path(root)
    per_class = DEFAULT_PER_CLASS if per_class is None else per_class
    rng = np.random.default_rng(seed)
    written = {}
    counter = 0
    for split, count in per_class.items():
        written[split] = []
        for label in range(classes):
            folder = root / split / class_folder(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                kind = IMAGE_KINDS[counter % len(IMAGE_KINDS)]
                counter += 1
                path = folder / f"img{i:04d}{kind[0]}"
                save = {"quality": 90} if kind[3] == "JPEG" else {}
                render(label, classes, kind, rng).save(path, format=kind[3], **save)
                written[split].append((path, label))
    return written
