"""Is our DP accountant (privacy.py) measurably better than Opacus's RDP accountant? Epsilon and time, side by side.

For each setting (the published DP-SGD budgets that tests/test_privacy.py checks, Abadi et al.'s example, and a few
federated ones), epsilon at delta from our PrivacyAccountant and from Opacus's RDP analysis with its default orders
(what opacus.accountants.RDPAccountant computes), and the median time of each. Lower epsilon at the same (sampling
rate, noise multiplier, rounds, delta) is the tighter, better bound; both are valid upper bounds.

A second table splits any gap into its two causes: the RDP-to-(epsilon, delta) conversion (ours: Mironov 2017,
Proposition 3; Opacus: Balle et al. 2020, Theorem 21) and the grid of orders (ours: integers 2-64 and 80-256;
Opacus: 1.1-10.9 in steps of 0.1, then integers 12-63), and checks that the two RDP formulas agree where the orders
coincide.

Opacus is not one of the project's requirements: `pip install opacus` first.

    python -m bench.accountant
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench import provenance
from privacy import DEFAULT_ORDERS, PrivacyAccountant, epsilon_from_rdp, rdp_sampled_gaussian

DELTA = 1e-5
REPEATS = 5  # timed calls per accountant and setting; the median is reported
DISAGREEMENT = 0.01  # relative epsilon gap worth a mention

# The TensorFlow Privacy MNIST DP-SGD tutorial (tutorials/README.md): N = 60000, batch 256, delta 1e-5.
MNIST_EXAMPLES = 60_000
MNIST_BATCH = 256


@dataclass(frozen=True)
class Setting:
    """One run of the sampled Gaussian mechanism, and the epsilon published for it where there is one."""

    name: str
    sampling_rate: float
    noise_multiplier: float
    rounds: int
    published: float | None = None
    delta: float = DELTA


def mnist(noise_multiplier: float, epochs: int, published: float) -> Setting:
    """A row of the TensorFlow Privacy MNIST DP-SGD table: ceil(epochs * N / batch) steps at q = batch / N."""
    steps = math.ceil(epochs * MNIST_EXAMPLES / MNIST_BATCH)
    return Setting(
        f"TF Privacy MNIST, z={noise_multiplier}, {epochs} epochs", MNIST_BATCH / MNIST_EXAMPLES, noise_multiplier, steps, published
    )


def federated(sampling_rate: float, noise_multiplier: float, rounds: int) -> Setting:
    """A DP-FedAvg run: a fraction sampling_rate of the clients in each of `rounds` rounds."""
    return Setting(f"FL q={sampling_rate}, z={noise_multiplier}, {rounds:,} rounds", sampling_rate, noise_multiplier, rounds)


SETTINGS: tuple[Setting, ...] = (
    mnist(1.1, 60, 3.01),
    mnist(0.7, 45, 7.10),
    mnist(1.3, 15, 1.19),
    # Abadi et al. 2016, Section 3.1: q = 0.01, sigma = 4, T = 10000, delta 1e-5, "eps ~ 1.26" (moments accountant).
    Setting("Abadi et al. q=0.01, z=4, 10,000 steps", 0.01, 4.0, 10_000, 1.26),
    federated(0.01, 1.0, 1_000),
    federated(0.01, 4.0, 10),
    federated(0.05, 2.0, 10_000),
    federated(0.1, 1.0, 100),
    federated(0.1, 0.5, 10),
    federated(0.5, 1.0, 1_000),
    federated(1.0, 4.0, 10),
    federated(1.0, 2.0, 100),
)


@dataclass(frozen=True)
class Result:
    """Epsilon, the order it was reached at, and the median seconds per computation."""

    epsilon: float
    order: float
    seconds: float


def median_seconds(compute: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of `repeats` calls of compute()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compute()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(setting: Setting) -> tuple[float, float]:
    """(epsilon, best order) from privacy.PrivacyAccountant, as a DP-FedAvg run would ask for it."""
    accountant = PrivacyAccountant(setting.noise_multiplier, setting.sampling_rate, setting.delta)
    accountant.step(setting.rounds)
    # What accountant.epsilon() returns, with the order it was reached at kept for the table.
    epsilon, order = epsilon_from_rdp(accountant.rdp(), accountant.orders, setting.delta)
    return epsilon, float(order)


def opacus_epsilon(setting: Setting, orders: Sequence[float] | None = None) -> tuple[float, float]:
    """(epsilon, best order) from Opacus's RDP analysis, at its RDPAccountant's default orders unless given others."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS if orders is None else orders
    rdp = compute_rdp(q=setting.sampling_rate, noise_multiplier=setting.noise_multiplier, steps=setting.rounds, orders=orders)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the order column shows it
        warnings.simplefilter("ignore")
        epsilon, order = get_privacy_spent(orders=orders, rdp=rdp, delta=setting.delta)
    return float(epsilon), float(order)


def measure(compute: Callable[[Setting], tuple[float, float]], setting: Setting) -> Result:
    """Epsilon and best order of one accountant at one setting, and its median time."""
    epsilon, order = compute(setting)
    return Result(epsilon, order, median_seconds(lambda: compute(setting)))


def ours_rdp_opacus_conversion(setting: Setting) -> float:
    """Epsilon from our RDP at our orders, converted by Opacus's (Balle et al.) formula: isolates the conversion."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = [value * setting.rounds for value in rdp_sampled_gaussian(setting.sampling_rate, setting.noise_multiplier, DEFAULT_ORDERS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_privacy_spent(orders=list(DEFAULT_ORDERS), rdp=rdp, delta=setting.delta)[0])


def rdp_disagreement(setting: Setting) -> float:
    """Largest relative difference between our per-round RDP and Opacus's at the integer orders both use."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    shared = sorted({order for order in RDPAccountant.DEFAULT_ALPHAS if float(order).is_integer()} & set(DEFAULT_ORDERS))
    mine = rdp_sampled_gaussian(setting.sampling_rate, setting.noise_multiplier, shared)
    theirs = compute_rdp(q=setting.sampling_rate, noise_multiplier=setting.noise_multiplier, steps=1, orders=shared)
    return max(abs(a - b) / abs(b) for a, b in zip(mine, theirs, strict=True) if b != 0)


def order_text(order: float) -> str:
    """An order as 6 or 3.5."""
    return f"{order:g}"


def comparison_table(rows: Sequence[tuple[Setting, Result, Result]]) -> list[str]:
    """The main table: epsilon and time of each accountant at each setting."""
    lines = [
        f"| setting (delta {DELTA:g}) | published eps | ours eps (order) | Opacus eps (order) | Opacus - ours | ours ms | Opacus ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, mine, theirs in rows:
        published = "" if setting.published is None else f"{setting.published:.2f}"
        gap = (theirs.epsilon - mine.epsilon) / mine.epsilon
        lines.append(
            f"| {setting.name} | {published} | {mine.epsilon:.3f} ({order_text(mine.order)}) | "
            f"{theirs.epsilon:.3f} ({order_text(theirs.order)}) | {gap:+.1%} | "
            f"{mine.seconds * 1e3:.2f} | {theirs.seconds * 1e3:.2f} |"
        )
    return lines


def attribution_table(rows: Sequence[tuple[Setting, Result, Result]]) -> list[str]:
    """Where each gap comes from: the conversion (ours -> ours + Balle) and the orders (that -> Opacus)."""
    lines = [
        "| setting | ours | our RDP + Opacus's conversion | Opacus (its orders) | RDP max rel. diff, shared orders |",
        "|---|---|---|---|---|",
    ]
    for setting, mine, theirs in rows:
        lines.append(
            f"| {setting.name} | {mine.epsilon:.3f} | {ours_rdp_opacus_conversion(setting):.3f} | "
            f"{theirs.epsilon:.3f} | {rdp_disagreement(setting):.1e} |"
        )
    return lines


def main() -> None:
    """Measure both accountants at every setting and print the two tables."""
    try:
        import opacus
    except ImportError:
        print("Opacus is not installed (it is not a project requirement): pip install opacus, then run this again.")
        return
    rows = [(setting, measure(ours, setting), measure(opacus_epsilon, setting)) for setting in SETTINGS]
    print(f"# Our DP accountant (privacy.py) against Opacus {opacus.__version__}'s RDP accountant")
    print(f"machine: {provenance.machine()}; commit {provenance.commit()}; time: median of {REPEATS} calls")
    print()
    print("\n".join(comparison_table(rows)))
    print()
    print("Opacus - ours < 0: Opacus's bound is tighter. Orders: ours integers 2-64, 80, 96, 128, 256; Opacus 1.1-10.9 by 0.1, 12-63.")
    print()
    print("\n".join(attribution_table(rows)))
    print()
    wide = [setting.name for setting, mine, theirs in rows if abs(theirs.epsilon - mine.epsilon) > DISAGREEMENT * mine.epsilon]
    print(f"Settings where the two differ by more than {DISAGREEMENT:.0%}: {len(wide)} of {len(rows)}.")


if __name__ == "__main__":
    main()
