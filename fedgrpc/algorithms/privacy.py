"""Differential-privacy accounting for DP-FedAvg: Opacus's RDP accountant for the sampled Gaussian mechanism, over rounds.

Opacus computes the Rényi DP of a sampled Gaussian round at fractional and integer orders and converts it to
(epsilon, delta) with the conversion of Balle et al. (2020), which gives a lower epsilon for the same
guarantee than the plain one (Mironov 2017) that this project computed by hand before: 2.60 where
TensorFlow Privacy published 3.01 for its MNIST DP-SGD example (bench/accountant.py compares the two).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Rényi orders tracked: Opacus's defaults (1.1 to 63, fractional below 11) and a few large ones, which few
# rounds with much noise need (at q = 0.01, sigma 4, 10 rounds the best order is 128).
EXTRA_ORDERS: tuple[float, ...] = (64.0, 80.0, 96.0, 128.0, 256.0)


def default_orders() -> list[float]:
    """Opacus's default Rényi orders plus EXTRA_ORDERS."""
    from opacus.accountants import RDPAccountant  # imported only when DP is on: Opacus brings much with it

    return [*RDPAccountant.DEFAULT_ALPHAS, *EXTRA_ORDERS]


def gaussian_noise_std(clip_norm: float, noise_multiplier: float, num_updates: int) -> float:
    """Standard deviation of the Gaussian noise for the plain mean of num_updates clipped updates: z * C / n."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier}")
    if num_updates < 1:
        raise ValueError(f"num_updates must be positive, got {num_updates}")
    # The sum of updates each clipped to norm C has sensitivity C, so the sum gets noise z*C; the mean divides by n.
    return noise_multiplier * clip_norm / num_updates


class PrivacyAccountant:
    """Privacy spent by DP-FedAvg so far: every round is the same sampled Gaussian mechanism, composed by Opacus."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float, orders: Sequence[float] | None = None) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if not 0 <= sampling_rate <= 1:
            raise ValueError(f"sampling_rate must lie in [0, 1], got {sampling_rate}")
        if not 0 < noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.orders = list(orders) if orders is not None else default_orders()
        if any(not order > 1 for order in self.orders):
            raise ValueError(f"Rényi orders must exceed 1, got {min(self.orders)}")
        self.rounds = 0

    def step(self, rounds: int = 1) -> None:
        """Record `rounds` more rounds of the mechanism."""
        if rounds < 0:
            raise ValueError(f"rounds must be non-negative, got {rounds}")
        self.rounds += rounds

    def rdp(self) -> list[float]:
        """RDP spent so far at each of self.orders."""
        from opacus.accountants.analysis import rdp

        return list(rdp.compute_rdp(q=self.sampling_rate, noise_multiplier=self.noise_multiplier, steps=self.rounds, orders=self.orders))

    def epsilon(self) -> float:
        """Epsilon spent so far at self.delta; 0.0 before any round."""
        if self.rounds == 0 or self.sampling_rate == 0:  # nothing released yet
            return 0.0
        from opacus.accountants.analysis import rdp

        epsilon, _ = rdp.get_privacy_spent(orders=self.orders, rdp=self.rdp(), delta=self.delta)
        return float(epsilon)
