"""Real photographs for the CNN benchmark: seeded random 224x224 crops, ImageNet-normalized.

The photos are those shipped inside the scikit-image wheel (``skimage/data``:
the astronaut Eileen Collins, Chelsea the cat, a coffee cup, a rocket, a
motorcycle, the Hubble deep field, ...; public domain or CC0, see
``skimage/data/README.txt``). They are found through the installed
distribution's file list, so scikit-image itself is never imported (its
dependencies need not be installed: ``pip install --no-deps scikit-image``
is enough). Decoding uses Pillow; no torchvision.

Crops: a photo chosen uniformly, a square side drawn uniformly between
``min_scale`` and 1 times the photo's shorter side, a uniform position, a coin
flip for a horizontal mirror, then a bicubic resize to ``size``. Evaluation and
calibration crops come from two independent streams of one seed and never
share a (photo, box, mirror) triple.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("benchmarks.cnn_data")

PHOTO_PACKAGE = "scikit-image"
PHOTO_DIR = "skimage/data"
# Real photographs in the scikit-image wheel. Left out: synthetic or scanned
# images (chessboard, logo, text, page, phantom, horse silhouette, color wheel),
# motorcycle_right (the stereo twin of motorcycle_left) and tiny files.
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)
# ImageNet statistics (0-255 scale); "lite" is the official EfficientNet-Lite
# preprocessing, (x - 127) / 128.
NORMALIZATIONS = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "lite": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
}


@dataclass(frozen=True)
class Crop:
    """Where a crop came from: photo name, square box (left, top, side) in pixels, mirrored or not."""

    photo: str
    left: int
    top: int
    side: int
    mirror: bool


def photo_paths(names: tuple[str, ...] = PHOTOS) -> dict[str, Path]:
    """Paths of the photos inside the installed scikit-image distribution.

    Raises:
        FileNotFoundError: scikit-image is not installed, or lacks a photo.
    """
    try:
        dist = distribution(PHOTO_PACKAGE)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"the photos come from the {PHOTO_PACKAGE} wheel: `pip install --no-deps {PHOTO_PACKAGE}`"
        ) from None
    shipped = {Path(str(f)).name: Path(dist.locate_file(f)) for f in dist.files or () if str(f).startswith(PHOTO_DIR + "/")}
    missing = [n for n in names if n not in shipped or not shipped[n].is_file()]
    if missing:
        raise FileNotFoundError(f"{PHOTO_PACKAGE} {dist.version} does not ship {missing} under {PHOTO_DIR}/")
    return {n: shipped[n] for n in names}


def photo_source(names: tuple[str, ...] = PHOTOS) -> dict:
    """Provenance to record beside results: package, version, files."""
    return {"package": PHOTO_PACKAGE, "version": distribution(PHOTO_PACKAGE).version, "dir": PHOTO_DIR, "files": list(names)}


def load_photos(names: tuple[str, ...] = PHOTOS) -> dict:
    """``name -> PIL.Image`` in RGB (grayscale photos are replicated to 3 channels)."""
    from PIL import Image

    out = {}
    for name, path in photo_paths(names).items():
        with Image.open(path) as im:
            out[name] = im.convert("RGB")
    return out


def draw_crops(sizes: dict[str, tuple[int, int]], n: int, rng: np.random.Generator, min_scale: float,
               exclude: frozenset[Crop] = frozenset()) -> list[Crop]:
    """``n`` crop boxes over photos of the given (width, height), none of them in ``exclude``."""
    names = sorted(sizes)
    crops: list[Crop] = []
    while len(crops) < n:
        name = names[int(rng.integers(len(names)))]
        width, height = sizes[name]
        short = min(width, height)
        side = max(1, int(round(short * rng.uniform(min_scale, 1.0))))
        crop = Crop(name, int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1)), side, bool(rng.integers(2)))
        if crop not in exclude:
            crops.append(crop)
    return crops


def render(photos: dict, crops: list[Crop], size: int) -> np.ndarray:
    """Cut, mirror and resize crops: uint8 array (N, size, size, 3)."""
    from PIL import Image

    out = np.empty((len(crops), size, size, 3), dtype=np.uint8)
    for i, c in enumerate(crops):
        im = photos[c.photo].crop((c.left, c.top, c.left + c.side, c.top + c.side))
        if c.mirror:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    return out


def normalize(images: np.ndarray, mode: str = "imagenet") -> torch.Tensor:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W), ``(x - mean) / std`` per channel."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization {mode!r} is unknown: use one of {sorted(NORMALIZATIONS)}")
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in NORMALIZATIONS[mode])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return (x - mean) / std


@dataclass(frozen=True, eq=False)
class CropSets:
    """Evaluation and calibration images, (N, 3, size, size) float32, with their crop boxes."""

    eval: torch.Tensor
    calib: torch.Tensor
    eval_crops: list[Crop]
    calib_crops: list[Crop]
    source: dict


def crop_sets(n_eval: int = 256, n_calib: int = 256, *, seed: int = 0, size: int = 224,
              min_scale: float = 0.3, normalization: str = "imagenet", names: tuple[str, ...] = PHOTOS) -> CropSets:
    """Disjoint evaluation and calibration crops of the shipped photos.

    Args:
        n_eval, n_calib: number of crops in each set (> 0; ``n_calib`` may be 0).
        seed: one seed; the two sets use independent child streams of it, so
            changing ``n_calib`` never changes the evaluation crops.
        size: output side in pixels.
        min_scale: smallest crop side as a fraction of the photo's shorter side.
        normalization: ``"imagenet"`` or ``"lite"``.
    """
    if n_eval < 1 or n_calib < 0:
        raise ValueError(f"n_eval={n_eval} must be > 0 and n_calib={n_calib} >= 0")
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale={min_scale} must be in (0, 1]")
    photos = load_photos(names)
    sizes = {name: im.size for name, im in photos.items()}
    eval_rng, calib_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    eval_crops = draw_crops(sizes, n_eval, eval_rng, min_scale)
    calib_crops = draw_crops(sizes, n_calib, calib_rng, min_scale, exclude=frozenset(eval_crops))
    log.info("%d evaluation and %d calibration crops of %d photos from %s", n_eval, n_calib, len(photos), PHOTO_PACKAGE)
    empty = torch.empty(0, 3, size, size)
    return CropSets(
        eval=normalize(render(photos, eval_crops, size), normalization),
        calib=normalize(render(photos, calib_crops, size), normalization) if calib_crops else empty,
        eval_crops=eval_crops,
        calib_crops=calib_crops,
        source=photo_source(names),
    )
