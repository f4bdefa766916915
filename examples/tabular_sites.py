"""Write the tabular example's sites: OUT/site<i>/train.csv and test.csv, each site's features shifted a little.

python examples/tabular_sites.py /tmp/sites --sites 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FEATURES = 8
NOISE = 0.1  # the target's noise: the best possible test MSE is about NOISE**2


def target(features: np.ndarray) -> np.ndarray:
    """A nonlinear function of the features: no linear model fits it well, a small MLP does."""
    return np.sin(2 * features[:, 0]) + features[:, 1] * features[:, 2] + 0.5 * features[:, 3] - 0.3 * features[:, 4] ** 2


def make_site(rng: np.random.Generator, shift: float, count: int) -> np.ndarray:
    features = rng.normal(shift, 1.0, size=(count, FEATURES))
    values = target(features) + rng.normal(0, NOISE, size=count)
    return np.column_stack([features, values]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the sites into")
    parser.add_argument("--sites", type=int, default=2, help="number of sites (default: 2)")
    parser.add_argument("--train", type=int, default=2000, help="training rows per site (default: 2000)")
    parser.add_argument("--test", type=int, default=500, help="test rows per site (default: 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for site in range(args.sites):
        directory = args.out / f"site{site}"
        directory.mkdir(parents=True, exist_ok=True)
        shift = 0.25 * (site - (args.sites - 1) / 2)  # sites differ a little, as real sites do
        for name, count in (("train.csv", args.train), ("test.csv", args.test)):
            np.savetxt(directory / name, make_site(rng, shift, count), delimiter=",", fmt="%.6f")
        print(directory)


if __name__ == "__main__":
    main()
