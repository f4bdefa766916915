"""Data sets as uint8 tensors: CIFAR-10, image folders and synthetic data; splitting and augmentation."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "imagefolder", "synthetic")
# Per-channel statistics of the CIFAR-10 training set, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SHAPE = (3, 32, 32)
CROP_PADDING = 4  # pixels of zero padding before the random 32x32 crop
SYNTHETIC_TRAIN_SIZE = 2000
SYNTHETIC_TEST_SIZE = 500
SYNTHETIC_CLASSES = 10
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


class DataError(Exception):
    """A data set cannot be loaded; the message says what to do."""


@dataclass
class ImageData:
    """Images as one uint8 tensor [N, C, H, W] with int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ImageData:
        """The examples at `indices`, as a new ImageData."""
        return ImageData(self.images[indices], self.labels[indices], self.num_classes)


def load_dataset(kind: str, data_dir: str | os.PathLike | None, train: bool, seed: int = 0) -> ImageData:
    """Load the train or test split of a data set kind from DATASETS."""
    if kind == "synthetic":
        return synthetic_dataset(SYNTHETIC_TRAIN_SIZE if train else SYNTHETIC_TEST_SIZE, seed, train)
    if data_dir is None:
        raise DataError(f"--dataset {kind} needs --data-dir; use --dataset synthetic for an offline demo")
    if kind == "cifar10":
        return _load_cifar10(Path(data_dir), train)
    if kind == "imagefolder":
        return load_image_folder(Path(data_dir) / ("train" if train else "test"))
    raise DataError(f"unknown dataset {kind!r}; choose one of {', '.join(DATASETS)}")


def _load_cifar10(root: Path, train: bool) -> ImageData:
    """CIFAR-10 through torchvision, downloading into `root` when it is missing and the network allows."""
    from torchvision.datasets import CIFAR10  # imported here: torchvision is slow to import

    if (root / "train").is_dir() and (root / "test").is_dir() and not (root / "cifar-10-batches-py").exists():
        raise DataError(f"{root} holds an image-folder layout: pass --dataset imagefolder --data-dir {root}")
    try:
        dataset = CIFAR10(str(root), train=train, download=True)
    except (OSError, RuntimeError) as error:
        raise DataError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({error.__class__.__name__}): "
            "put it there with --data-dir, or use --dataset synthetic for an offline demo"
        ) from None
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(dataset.targets, dtype=torch.int64)
    return ImageData(images, labels, len(dataset.classes))


def load_image_folder(directory: Path) -> ImageData:
    """Decode `directory/<class>/<image>` files into one uint8 tensor; classes in sorted order."""
    if not directory.is_dir():
        raise DataError(f"no image folder at {directory}: expected {directory}/<class>/<image> files")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = directory / name
        names = sorted(entry.name for entry in os.scandir(class_dir) if entry.is_file())
        files.extend((str(class_dir / file), label) for file in names if Path(file).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images under {directory}: expected {directory}/<class>/<image> files")
    images = torch.empty((len(files), *IMAGE_SHAPE), dtype=torch.uint8)
    target = images.permute(0, 2, 3, 1)  # HWC view, so each decoded image lands in place

    def decode(index: int) -> None:
        from PIL import Image

        with Image.open(files[index][0]) as image:
            image = image.convert("RGB")
            if image.size != (IMAGE_SHAPE[2], IMAGE_SHAPE[1]):
                image = image.resize((IMAGE_SHAPE[2], IMAGE_SHAPE[1]), Image.BILINEAR)
            target[index] = torch.from_numpy(np.array(image))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(decode, range(len(files)), chunksize=256))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    logger.info("loaded %d images in %d classes from %s", len(files), len(classes), directory)
    return ImageData(images, labels, len(classes))


def synthetic_dataset(size: int, seed: int, train: bool = True) -> ImageData:
    """Learnable synthetic images: each class is a fixed smooth random pattern (so crops and flips keep it) plus noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = 96 + torch.rand((SYNTHETIC_CLASSES, IMAGE_SHAPE[0], 4, 4), generator=generator) * 64
    prototypes = torch.nn.functional.interpolate(coarse, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)
    split_generator = torch.Generator().manual_seed(seed * 2 + (0 if train else 1) + 1)
    labels = torch.randint(0, SYNTHETIC_CLASSES, (size,), generator=split_generator)
    noise = torch.randn((size, *IMAGE_SHAPE), generator=split_generator) * 60
    images = (prototypes[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ImageData(images, labels, SYNTHETIC_CLASSES)


def split_iid(num_examples: int, num_parts: int, seed: int) -> list[torch.Tensor]:
    """Split indices 0..num_examples-1 into disjoint, complete, seeded random parts (sizes differ by at most 1)."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be positive, got {num_parts}")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(order, num_parts))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] to float32 normalized with the CIFAR-10 statistics."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, on a whole batch at once."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)
    shifts = torch.randint(0, 2 * CROP_PADDING + 1, (2, batch), generator=generator).to(images.device)
    rows = (torch.arange(height, device=images.device).view(1, -1) + shifts[0].view(-1, 1)).view(batch, 1, height, 1)
    cols = (torch.arange(width, device=images.device).view(1, -1) + shifts[1].view(-1, 1)).view(batch, 1, 1, width)
    channels = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    samples = torch.arange(batch, device=images.device).view(-1, 1, 1, 1)
    cropped = padded[samples, channels, rows, cols]
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, cropped.flip(3), cropped)


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; other names are checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available: use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for but MPS is not available: use --device auto or cpu")
    return device
