"""Data sets as uint8 tensors: CIFAR-10, image folders and synthetic data; splitting and augmentation."""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fedgrpc.config.choices import DATASETS

logger = logging.getLogger(__name__)

# Per-channel statistics of the CIFAR-10 training set, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SHAPE = (3, 32, 32)
CROP_PADDING = 4  # pixels of zero padding before the random 32x32 crop
SYNTHETIC_TRAIN_SIZE = 2000
SYNTHETIC_TEST_SIZE = 500
SYNTHETIC_CLASSES = 10
# Decoded image folders are kept here, beside the split directories, so that the next start skips decoding.
DECODED_CACHE_DIR = ".decoded"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


class DataError(Exception):
    """A data set cannot be loaded; the message says what to do."""


class Examples:
    """A data set as whole tensors with one entry per example: the inputs, then the targets (the last tensor).

    `num_classes` is the number of classes of integer targets (0 for other targets: regression, sequences).
    """

    names: tuple[str, ...] | None = None  # what GetData calls the tensors; None: input0.., target

    def __init__(self, tensors: tuple[torch.Tensor, ...], num_classes: int = 0) -> None:
        self.tensors = tuple(tensors)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self.tensors[-1].shape[0])

    @property
    def targets(self) -> torch.Tensor:
        """The last tensor: what the model learns to predict."""
        return self.tensors[-1]

    def tensor_names(self) -> tuple[str, ...]:
        """Each tensor's name on the wire."""
        if self.names is not None:
            return self.names
        return (*(f"input{index}" for index in range(len(self.tensors) - 1)), "target")

    def subset(self, indices: torch.Tensor) -> Examples:
        """The examples at `indices`, in a data set of the same kind."""
        part = copy.copy(self)
        part.tensors = tuple(tensor[indices] for tensor in self.tensors)
        return part


class ImageData(Examples):
    """Images as one uint8 tensor [N, C, H, W] with int64 labels [N]."""

    names = ("images", "labels")

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__((images, labels), num_classes)

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]


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
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    cache = _cache_path(directory, files)
    cached = _read_cache(cache, len(files))
    if cached is not None:
        logger.info("loaded %d images in %d classes from %s (decoded earlier: %s)", len(files), len(classes), directory, cache)
        return ImageData(cached, labels, len(classes))
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
    logger.info("loaded %d images in %d classes from %s", len(files), len(classes), directory)
    _write_cache(cache, images)
    return ImageData(images, labels, len(classes))


def _cache_path(directory: Path, files: list[tuple[str, int]]) -> Path:
    """Where the decoded images of these exact files are kept: named by a hash of their paths, sizes and times."""
    digest = hashlib.sha256()
    for path, label in files:
        status = os.stat(path)
        digest.update(f"{os.path.relpath(path, directory)}\0{label}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    digest.update(repr(IMAGE_SHAPE).encode())
    return directory.parent / DECODED_CACHE_DIR / f"{directory.name}-{digest.hexdigest()[:24]}.npy"


def _read_cache(path: Path, count: int) -> torch.Tensor | None:
    """The cached uint8 images, or None when there is no usable cache (any doubt means decoding again)."""
    try:
        array = np.load(path, allow_pickle=False)  # a plain array file we wrote; never pickles
    except (OSError, ValueError):
        return None
    if array.dtype != np.uint8 or array.shape != (count, *IMAGE_SHAPE):
        return None
    return torch.from_numpy(array)


def _write_cache(path: Path, images: torch.Tensor) -> None:
    """Keep decoded images for the next start (written whole, then renamed); a read-only data set just goes without."""
    try:
        path.parent.mkdir(exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            np.save(file, images.numpy(), allow_pickle=False)
        os.replace(temporary, path)
    except OSError as error:
        logger.info("not caching decoded images in %s: %s", path.parent, error.strerror)


def synthetic_dataset(size: int, seed: int, train: bool = True) -> ImageData:
    """Learnable synthetic images: each class is a fixed smooth random pattern (so crops and flips keep it) plus noise."""
    return _synthetic_images(size, seed, torch.Generator().manual_seed(seed * 2 + (0 if train else 1) + 1))


def synthetic_shard(size: int, seed: int, index: int) -> ImageData:
    """Learner `index`'s own `size` synthetic examples: the classes of synthetic_dataset(seed), labels and noise drawn for it alone."""
    return _synthetic_images(size, seed, torch.Generator().manual_seed(derive_seed(seed, "synthetic-learner", index)))


@functools.lru_cache(maxsize=4)
def synthetic_prototypes(seed: int) -> torch.Tensor:
    """The synthetic classes' fixed smooth patterns, float [classes, C, H, W] (kept: a pool makes many learners' data from them)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = 96 + torch.rand((SYNTHETIC_CLASSES, IMAGE_SHAPE[0], 4, 4), generator=generator) * 64
    return torch.nn.functional.interpolate(coarse, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)


def _synthetic_images(size: int, seed: int, draws: torch.Generator) -> ImageData:
    """`size` images of the class patterns that `seed` fixes, with labels and noise from `draws`."""
    prototypes = synthetic_prototypes(seed)
    labels = torch.randint(0, SYNTHETIC_CLASSES, (size,), generator=draws)
    noise = torch.randn((size, *IMAGE_SHAPE), generator=draws) * 60
    images = (prototypes[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ImageData(images, labels, SYNTHETIC_CLASSES)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed determined by `parts`, so that separate random streams never share a seed by accident."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
    """Random crop with zero padding and random horizontal flip, on a whole batch at once.

    Both are one gather from the padded batch: each output pixel's position in its padded image, with
    a flipped image's columns read right to left. (Indexing with one tensor per dimension, then
    flipping, computes the same and took about eight times longer for a batch of 128 on one core.)
    """
    batch, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)
    shifts = torch.randint(0, 2 * CROP_PADDING + 1, (2, batch), generator=generator).to(images.device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
    rows = torch.arange(height, device=images.device).view(1, -1) + shifts[0].view(-1, 1)
    ahead = torch.arange(width, device=images.device)
    columns = torch.where(flip.view(-1, 1), ahead.flip(0), ahead) + shifts[1].view(-1, 1)
    positions = rows.view(batch, height, 1) * padded.shape[3] + columns.view(batch, 1, width)
    index = positions.view(batch, 1, height * width).expand(batch, channels, height * width)
    return padded.reshape(batch, channels, -1).gather(2, index).view(batch, channels, height, width)


def training_inputs(
    images: torch.Tensor,
    indices: torch.Tensor,
    generator: torch.Generator | None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """One training batch: images[indices], cropped and flipped when a generator is given, normalized, in memory_format.

    Everything happens where `images` lives, so a split kept on the GPU never goes through the host.
    """
    batch = images[indices.to(images.device)]
    if generator is not None:
        batch = augment(batch, generator)
    return normalize(batch).contiguous(memory_format=memory_format)


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


# Redraws of the Dirichlet proportions before giving up on a split where every part is non-empty: enough that
# a feasible but unlucky draw almost never fails, few enough that an infeasible request fails fast.
MAX_DIRICHLET_ATTEMPTS = 1000


def split_dirichlet(labels: torch.Tensor, num_parts: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Label-skewed split after Hsu et al. 2019: each class shared out by Dirichlet(alpha); parts sorted, non-empty."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be positive, got {num_parts}")
    if not alpha > 0:  # written this way so that NaN is refused too
        raise ValueError(f"alpha must be positive, got {alpha}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(labels.shape)}")
    if num_parts > len(labels):
        raise ValueError(f"cannot give each of {num_parts} parts an example: there are only {len(labels)} examples")
    # NumPy, not torch: torch has no Dirichlet sampler that takes a Generator, and the global RNG is shared state.
    rng = np.random.default_rng(seed)
    label_array = labels.cpu().numpy()
    # Each class's indices are shuffled once; a redraw only changes where they are cut.
    members = [rng.permutation(np.flatnonzero(label_array == label)) for label in np.unique(label_array)]
    # Proportions are drawn per class over the parts (the form of Yurochkin et al. 2019 and NIID-Bench), not per part
    # over the classes as in Hsu et al.; both skew labels, and this one keeps every example without resampling.
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        cuts = []
        sizes = np.zeros(num_parts, dtype=np.int64)
        for indices in members:
            proportions = rng.dirichlet(np.full(num_parts, alpha))
            # The last boundary is left out, so rounding can never drop the class's final examples.
            bounds = (np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
            cuts.append(bounds)
            sizes += np.diff(bounds, prepend=0, append=len(indices))
        if sizes.min() > 0:
            chunks = [np.split(indices, bounds) for indices, bounds in zip(members, cuts, strict=False)]
            return [
                torch.from_numpy(np.sort(np.concatenate([chunk[part] for chunk in chunks]))).to(torch.int64) for part in range(num_parts)
            ]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} examples in {len(members)} classes gave all {num_parts} "
        f"parts an example in {MAX_DIRICHLET_ATTEMPTS} draws: use a larger alpha or fewer parts"
    )


def split_shards(labels: torch.Tensor, num_parts: int, classes_per_part: int, seed: int) -> list[torch.Tensor]:
    """McMahan et al. 2017's pathological split: label-sorted shards, classes_per_part per part at random; parts sorted."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be positive, got {num_parts}")
    if classes_per_part < 1:
        raise ValueError(f"classes_per_part must be positive, got {classes_per_part}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(labels.shape)}")
    num_shards = num_parts * classes_per_part
    if num_shards > len(labels):
        raise ValueError(f"{num_parts} parts x {classes_per_part} shards need {num_shards} examples, there are only {len(labels)}")
    # Stable, so that ties keep index order and the shards do not depend on the sort implementation.
    by_label = torch.sort(labels.cpu(), stable=True).indices
    shards = torch.tensor_split(by_label, num_shards)  # sizes differ by at most 1
    owners = torch.randperm(num_shards, generator=torch.Generator().manual_seed(seed)).view(num_parts, classes_per_part)
    return [torch.sort(torch.cat([shards[shard] for shard in row.tolist()])).values for row in owners]


def label_histogram(labels: torch.Tensor, indices: torch.Tensor, num_classes: int) -> list[int]:
    """Number of examples of each class 0..num_classes-1 among labels[indices]."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    selected = labels[indices].cpu()
    if selected.numel() and (int(selected.min()) < 0 or int(selected.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(selected.min())}..{int(selected.max())}")
    return torch.bincount(selected, minlength=num_classes).tolist()


def split_by(partition: str, data: Examples, num_parts: int, alpha: float, classes_per_part: int, seed: int) -> list[torch.Tensor]:
    """Each part's indices into `data` by --partition (iid, dirichlet or shards); logs every part's size (and label histogram)."""
    labels = data.targets
    if partition != "iid" and (data.num_classes < 1 or labels.dim() != 1):
        raise DataError(
            f"--partition {partition} splits by class: it needs one integer class per example; this data set's targets are not: use --partition iid"
        )
    if partition == "dirichlet":
        parts = split_dirichlet(labels, num_parts, alpha, seed)
    elif partition == "shards":
        parts = split_shards(labels, num_parts, classes_per_part, seed)
    else:
        parts = split_iid(len(data), num_parts, seed)
    for index, part in enumerate(parts):
        if data.num_classes > 0 and labels.dim() == 1:
            logger.info(
                "split %d (%s): %d examples, per class %s", index, partition, len(part), label_histogram(labels, part, data.num_classes)
            )
        else:
            logger.info("split %d (%s): %d examples", index, partition, len(part))
    return parts
