"""Rényi-DP accounting of DP-FedAvg against hand-computed values and a direct numerical integral."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privacy import DEFAULT_ORDERS, PrivacyAccountant, epsilon_from_rdp, gaussian_noise_std, rdp_sampled_gaussian

DELTA = 1e-5


def test_full_sampling_is_the_plain_gaussian_mechanism():
    # q = 1: only the k = alpha term survives, log A = (alpha^2 - alpha) / (2 sigma^2), so RDP = alpha / (2 sigma^2).
    assert rdp_sampled_gaussian(1.0, 1.0, [2]) == [1.0]
    orders = [2, 3, 10, 64, 256]
    assert rdp_sampled_gaussian(1.0, 2.0, orders) == pytest.approx([order / 8 for order in orders], rel=1e-12)


def test_no_sampling_releases_nothing():
    assert rdp_sampled_gaussian(0.0, 1.0, DEFAULT_ORDERS) == [0.0] * len(DEFAULT_ORDERS)


def test_order_2_and_3_by_hand():
    # alpha = 2: A = (1-q)^2 + 2q(1-q) + q^2 e^(1/sigma^2) = 1 + q^2 (e^(1/sigma^2) - 1).
    # q = 0.1, sigma = 1: log(1 + 0.01 (e - 1)) = log(1.0171828...) = 0.0170368632...
    # alpha = 3: A = 0.9^3 + 3 (0.81)(0.1) + 3 (0.9)(0.01) e + 0.001 e^3 = 0.729 + 0.243 + 0.027 e + 0.001 e^3
    #          = 1.0654791463..., RDP = log(A) / 2 = 0.0317123003...
    rdp_2, rdp_3 = rdp_sampled_gaussian(0.1, 1.0, [2, 3])
    assert rdp_2 == pytest.approx(math.log1p(0.01 * (math.e - 1)), rel=1e-12)
    assert rdp_2 == pytest.approx(0.01703686323617655, rel=1e-12)
    assert rdp_3 == pytest.approx(0.03171230030337643, rel=1e-12)


def test_tiny_sampling_rates_keep_their_digits():
    # q = 1e-8, sigma = 1, alpha = 2: log(1 + 1e-16 (e - 1)) = 1.7182818...e-16; summing 1 + 2e-8 + ... in doubles
    # before the log would leave one correct digit.
    (rdp,) = rdp_sampled_gaussian(1e-8, 1.0, [2])
    assert rdp == pytest.approx(1.718281828459045e-16, rel=1e-6)


@pytest.mark.parametrize("noise_multiplier, epochs, published", [(1.1, 60, 3.01), (1.3, 15, 1.19)])
def test_matches_tensorflow_privacy_published_dp_sgd_budgets(noise_multiplier, epochs, published):
    # tensorflow/privacy tutorials/README.md: MNIST DP-SGD, N = 60000, batch 256, delta = 1e-5, steps
    # ceil(epochs * 60000 / 256); eps 3.01 (sigma 1.1, 60 epochs) and 1.19 (sigma 1.3, 15 epochs), both at integer
    # best orders. (Its third row, 7.10, has a fractional best order that integer orders can only bound: 7.12.)
    accountant = PrivacyAccountant(noise_multiplier, 256 / 60000, DELTA)
    accountant.step(math.ceil(epochs * 60000 / 256))
    assert accountant.epsilon() == pytest.approx(published, abs=0.005)


@pytest.mark.parametrize("order", [2, 8, 32])
def test_matches_the_renyi_divergence_integrated_numerically(order):
    # A_alpha = E_{z ~ N(0, s^2)} [((1-q) + q exp((2z - 1) / (2 s^2)))^alpha], integrated on a fine grid in log space:
    # an independent route to the binomial sum, which it must agree with.
    q, sigma = 0.05, 0.8
    step = 1e-3
    z = np.arange(-40.0, order + 40.0, step)
    log_normal = -z**2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_integrand = log_normal + order * log_ratio
    largest = log_integrand.max()
    log_a = largest + math.log(np.exp(log_integrand - largest).sum() * step)
    (rdp,) = rdp_sampled_gaussian(q, sigma, [order])
    assert rdp == pytest.approx(log_a / (order - 1), rel=1e-8)


def test_large_orders_stay_finite_and_grow_with_the_order():
    rdp = rdp_sampled_gaussian(0.5, 0.5, DEFAULT_ORDERS)
    assert all(math.isfinite(value) for value in rdp)
    # Rényi divergence never decreases with the order.
    small = rdp_sampled_gaussian(0.01, 1.1, DEFAULT_ORDERS)
    assert all(a <= b for a, b in zip(small, small[1:], strict=False))


@pytest.mark.parametrize("q, sigma, orders", [(-0.1, 1.0, [2]), (1.1, 1.0, [2]), (0.5, 0.0, [2]), (0.5, -1.0, [2]),
                                              (0.5, 1.0, [1]), (0.5, 1.0, [2.5])])
def test_rdp_refuses_bad_arguments(q, sigma, orders):
    with pytest.raises(ValueError):
        rdp_sampled_gaussian(q, sigma, orders)


def test_epsilon_of_one_full_gaussian_round():
    # q = 1, sigma = 1: RDP = alpha / 2, so eps = min_alpha alpha/2 + log(1e5)/(alpha - 1); log(1e5) = 11.5129...
    # alpha = 5: 5.378, alpha = 6: 3 + 11.5129/5 = 5.30259, alpha = 7: 5.419, so the best order is 6.
    epsilon, order = epsilon_from_rdp(rdp_sampled_gaussian(1.0, 1.0, DEFAULT_ORDERS), DEFAULT_ORDERS, DELTA)
    brute = min((alpha / 2 + math.log(1 / DELTA) / (alpha - 1), alpha) for alpha in DEFAULT_ORDERS)
    assert (epsilon, order) == (pytest.approx(brute[0], rel=1e-12), brute[1])
    assert (epsilon, order) == (pytest.approx(5.302585092994046, rel=1e-12), 6)


def test_epsilon_refuses_bad_arguments():
    with pytest.raises(ValueError, match="one RDP value per order"):
        epsilon_from_rdp([1.0], [2, 3], DELTA)
    with pytest.raises(ValueError, match="one RDP value per order"):
        epsilon_from_rdp([], [], DELTA)
    for delta in (0.0, 1.0):
        with pytest.raises(ValueError, match="delta"):
            epsilon_from_rdp([1.0], [2], delta)


def test_accountant_composes_by_summing_rdp():
    accountant = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.01, delta=DELTA)
    assert accountant.rounds == 0 and accountant.epsilon() == 0.0
    per_round = rdp_sampled_gaussian(0.01, 1.1, DEFAULT_ORDERS)
    for _ in range(10):
        accountant.step()
    assert accountant.rounds == 10
    assert accountant.rdp() == pytest.approx([10 * value for value in per_round], rel=1e-12)
    assert accountant.epsilon() == pytest.approx(
        epsilon_from_rdp([10 * value for value in per_round], DEFAULT_ORDERS, DELTA)[0], rel=1e-12)
    at_once = PrivacyAccountant(1.1, 0.01, DELTA)
    at_once.step(10)
    assert at_once.epsilon() == pytest.approx(accountant.epsilon(), rel=1e-12)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    def spent(sigma: float, rounds: int) -> float:
        accountant = PrivacyAccountant(sigma, 0.1, DELTA)
        accountant.step(rounds)
        return accountant.epsilon()

    assert 0 < spent(1.1, 10) < spent(1.1, 100) < spent(1.1, 1000)
    assert spent(4.0, 100) < spent(2.0, 100) < spent(1.1, 100)


def test_accountant_refuses_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant(1.1, 0.1, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyAccountant(0.0, 0.1, DELTA)
    with pytest.raises(ValueError, match="integers >= 2"):
        PrivacyAccountant(1.1, 0.1, DELTA, orders=(2, 2.5))
    with pytest.raises(ValueError, match="rounds"):
        PrivacyAccountant(1.1, 0.1, DELTA).step(-1)


def test_noise_std_for_the_mean_of_clipped_updates():
    # z C / n = 1.1 * 1.0 / 4 = 0.275.
    assert gaussian_noise_std(1.0, 1.1, 4) == 0.275
    assert gaussian_noise_std(2.0, 0.0, 3) == 0.0
    with pytest.raises(ValueError):
        gaussian_noise_std(0.0, 1.1, 4)
    with pytest.raises(ValueError):
        gaussian_noise_std(1.0, 1.1, 0)
