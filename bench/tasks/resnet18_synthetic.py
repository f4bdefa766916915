"""bench.round's workload written as a user's task file: the blog's ResNet-18 on the synthetic images, as float tensors.

A user's task holds its data as it likes; here the images are normalized once into float32, so each batch is plain
indexing (the built-in task keeps uint8 and normalizes each batch instead).
"""

from __future__ import annotations

import torch

from fedgrpc.data import normalize, synthetic_dataset
from fedgrpc.model import resnet18


def model() -> torch.nn.Module:
    return resnet18(10)


def _data(train: bool) -> torch.utils.data.TensorDataset:
    data = synthetic_dataset(2000 if train else 500, seed=0, train=train)
    return torch.utils.data.TensorDataset(normalize(data.images), data.labels)


def train_data(data_dir: str | None) -> torch.utils.data.Dataset:
    return _data(train=True)


def test_data(data_dir: str | None) -> torch.utils.data.Dataset:
    return _data(train=False)
