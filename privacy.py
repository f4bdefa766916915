"""Differential-privacy accounting for DP-FedAvg: Rényi DP of the sampled Gaussian mechanism, composed over rounds."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Integer Rényi orders at which privacy is tracked: every small order, where the best epsilon lies for the usual
# budgets, and a few large ones for few rounds or small deltas, where the optimum moves up.
DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 256)


def rdp_sampled_gaussian(sampling_rate: float, noise_multiplier: float, orders: Sequence[int]) -> list[float]:
    """Rényi DP of one sampled Gaussian round at each integer order (Mironov, Talwar, Zhang 2019, Section 3.3)."""
    if not 0 <= sampling_rate <= 1:
        raise ValueError(f"sampling_rate must lie in [0, 1], got {sampling_rate}")
    if not 0 < noise_multiplier < math.inf:
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    _check_orders(orders)
    if sampling_rate == 0:  # nothing is released about anyone; log(q) below would be log(0)
        return [0.0 for _ in orders]
    return [_log_a(sampling_rate, noise_multiplier, int(order)) / (order - 1) for order in orders]


def _log_a(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha = log sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2-k) / (2 sigma^2)), by log-sum-exp."""
    log_q = math.log(q)
    log_1mq = math.log1p(-q) if q < 1 else -math.inf
    terms = []
    for k in range(alpha + 1):
        log_binomial = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        # (alpha-k) log(1-q) is 0 at k = alpha even when q = 1: 0 * -inf would be NaN.
        log_rest = (alpha - k) * log_1mq if k < alpha else 0.0
        terms.append(log_binomial + log_rest + k * log_q + (k * k - k) / (2 * sigma**2))
    top = max(range(alpha + 1), key=terms.__getitem__)  # finite: the k = alpha term always is
    # log1p of the other terms, not log of the whole sum: at small q, A is 1 + O(q^2), and rounding 1 + O(q) to a
    # double first would lose the RDP itself (at q = 1e-8 only one digit survived; with log1p, seven).
    rest = math.fsum(math.exp(term - terms[top]) for k, term in enumerate(terms) if k != top)
    return terms[top] + math.log1p(rest)


def epsilon_from_rdp(rdp: Sequence[float], orders: Sequence[int], delta: float) -> tuple[float, int]:
    """(epsilon, best order) at delta: min over orders of rdp + log(1/delta)/(alpha-1) (Mironov 2017, Proposition 3)."""
    if len(rdp) != len(orders) or not orders:
        raise ValueError(f"need one RDP value per order, got {len(rdp)} values for {len(orders)} orders")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    _check_orders(orders)
    epsilon, order = min((value + math.log(1 / delta) / (order - 1), order) for value, order in zip(rdp, orders, strict=False))
    return epsilon, int(order)


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
    """Privacy spent by DP-FedAvg so far: per-round RDP of the sampled Gaussian mechanism, summed over rounds."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float,
                 orders: Sequence[int] = DEFAULT_ORDERS) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        _check_orders(orders)  # before int(), which would quietly turn an order of 2.5 into 2
        self.orders = tuple(int(order) for order in orders)
        # Every round is the same mechanism, so its RDP is computed once; composition is then a multiplication.
        self.round_rdp = rdp_sampled_gaussian(sampling_rate, noise_multiplier, self.orders)
        self.rounds = 0

    def step(self, rounds: int = 1) -> None:
        """Record `rounds` more rounds of the mechanism."""
        if rounds < 0:
            raise ValueError(f"rounds must be non-negative, got {rounds}")
        self.rounds += rounds

    def rdp(self) -> list[float]:
        """RDP spent so far at each of self.orders."""
        return [value * self.rounds for value in self.round_rdp]

    def epsilon(self) -> float:
        """Epsilon spent so far at self.delta; 0.0 before any round."""
        if self.rounds == 0:  # nothing released yet; the conversion would still add log(1/delta)/(alpha-1)
            return 0.0
        return epsilon_from_rdp(self.rdp(), self.orders, self.delta)[0]


def _check_orders(orders: Sequence[int]) -> None:
    """Refuse orders that are not integers >= 2: the exact binomial formula holds only for those."""
    for order in orders:
        if int(order) != order or order < 2:
            raise ValueError(f"Rényi orders must be integers >= 2, got {order}")
