"""bench.personal's task: a small BatchNorm CNN on CIFAR-10, each learner holding two classes of its own.

A learner's --data-dir is a folder with site.json: {"root": CIFAR-10 in image-folder layout, "classes": [i, j]}.
train_data reads the first PER_CLASS training images of each of its classes, test_data all their test images; a
folder without site.json stands for every class (the whole test set, for evaluating a global model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fedgrpc.data import normalize

PER_CLASS = 500  # training images per class and learner


class SmallCNN(nn.Module):
    """Three convolutions with BatchNorm (the features) and one linear head over their pooled channels."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for inputs, outputs in ((3, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]
            if outputs < 128:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def model() -> nn.Module:
    return SmallCNN()


def _site(data_dir: str | None) -> tuple[Path, list[int]]:
    folder = Path(data_dir or ".")
    spec_file = folder / "site.json"
    if not spec_file.is_file():
        return folder, list(range(10))
    spec = json.loads(spec_file.read_text())
    return Path(spec["root"]), list(spec["classes"])


def _images(root: Path, split: str, classes: list[int], limit: int | None) -> torch.utils.data.TensorDataset:
    names = sorted(entry.name for entry in (root / split).iterdir() if entry.is_dir())
    if len(names) != 10:
        raise FileNotFoundError(f"{root / split}: expected CIFAR-10's 10 class folders (extract cifar10-jpg.tar.gz there)")
    images, labels = [], []
    for label in classes:
        files = sorted((root / split / names[label]).iterdir())[:limit]
        images += [np.asarray(Image.open(file).convert("RGB")) for file in files]
        labels += [label] * len(files)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return torch.utils.data.TensorDataset(normalize(pixels), torch.tensor(labels))


def train_data(data_dir: str | None) -> torch.utils.data.Dataset:
    root, classes = _site(data_dir)
    return _images(root, "train", classes, PER_CLASS)


def test_data(data_dir: str | None) -> torch.utils.data.Dataset:
    root, classes = _site(data_dir)
    return _images(root, "test", classes, None)
