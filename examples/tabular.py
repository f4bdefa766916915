"""A tabular regression task: a small MLP predicts a float target from 8 float features held by each site as CSV.

Each learner reads its own site's files (`--data-dir SITE`: SITE/train.csv and SITE/test.csv, the target in the
last column); tabular_sites.py writes such sites from a synthetic, nonlinear data set. Nothing here is an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 8


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def _site_file(data_dir: str | None, name: str) -> torch.utils.data.TensorDataset:
    if data_dir is None:
        raise FileNotFoundError("this task reads a site's CSV files: pass --data-dir SITE")
    table = np.loadtxt(Path(data_dir) / name, delimiter=",", dtype=np.float32, ndmin=2)
    features, target = torch.from_numpy(table[:, :FEATURES]), torch.from_numpy(table[:, FEATURES])
    return torch.utils.data.TensorDataset(features, target)


def train_data(data_dir: str | None) -> torch.utils.data.Dataset:
    return _site_file(data_dir, "train.csv")


def test_data(data_dir: str | None) -> torch.utils.data.Dataset:
    return _site_file(data_dir, "test.csv")


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.squeeze(-1), targets)


def metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    error = outputs.squeeze(-1) - targets
    return {"mse": float((error**2).mean()), "mae": float(error.abs().mean())}
