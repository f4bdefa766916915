"""The blog's utils.py: CIFAR-10 loading and splitting (the code lives in fedgrpc/data.py)."""

from fedgrpc.config.choices import DATASETS, PARTITIONS
from fedgrpc.data import (
    DataError,
    Examples,
    ImageData,
    load_dataset,
    split_by,
    split_dirichlet,
    split_iid,
    split_shards,
)

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "DataError",
    "Examples",
    "ImageData",
    "load_dataset",
    "split_by",
    "split_dirichlet",
    "split_iid",
    "split_shards",
]
