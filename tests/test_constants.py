"""The consistency constants of SPEC §1: E_max, E_topk, E_range, c_p and the paper's multiplier.

The exact constants are checked three ways: identities that hold exactly, published tables, and
Monte Carlo within 1% at several m and k (SPEC: "Tests check the exact constants by Monte Carlo").
Every Monte Carlo check first asserts that its standard error is small enough for a 1% error to
stand out, so a pass means something.
"""

import math

import pytest
import torch

from lpnorm import _C

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # E|z|
REL_TOL = 0.01        # the SPEC's Monte Carlo tolerance
RESOLVING_POWER = 4   # the tolerance must span at least this many standard errors
AGREEMENT = 5         # and the estimate must lie within this many of the exact value
BLOCK_ELEMENTS = 1 << 21  # normals drawn per block, to bound memory


def sample_statistic(statistic, width, samples, seed):
    """Draw `samples` rows of `width` i.i.d. N(0,1) (float64, seeded) and apply `statistic` to each.

    `statistic` maps a (rows, width) block to a (rows, outputs) tensor. Returns per-output mean and
    standard error of the mean.
    """
    generator = torch.Generator().manual_seed(seed)
    rows_per_block = max(1, BLOCK_ELEMENTS // width)
    total = None
    total_sq = None
    done = 0
    while done < samples:
        rows = min(rows_per_block, samples - done)
        z = torch.randn(rows, width, generator=generator, dtype=torch.float64)
        values = statistic(z)
        block_sum, block_sq = values.sum(0), (values * values).sum(0)
        total = block_sum if total is None else total + block_sum
        total_sq = block_sq if total_sq is None else total_sq + block_sq
        done += rows
    mean = total / samples
    variance = (total_sq / samples - mean * mean) * samples / (samples - 1)
    return mean, (variance / samples).sqrt()


def assert_monte_carlo_agrees(exact, estimate, standard_error, what):
    assert RESOLVING_POWER * standard_error < REL_TOL * exact, (
        f"{what}: too few samples, standard error {standard_error:.3g} cannot resolve 1% of {exact:.6g}")
    assert abs(estimate - exact) < REL_TOL * exact, f"{what}: Monte Carlo {estimate:.6g} vs exact {exact:.6g}"
    assert abs(estimate - exact) < AGREEMENT * standard_error, (
        f"{what}: Monte Carlo {estimate:.6g} vs exact {exact:.6g} is "
        f"{abs(estimate - exact) / standard_error:.1f} standard errors off")


def topk_means(ks):
    """Statistic: the mean of the k largest |z| of each row, for each k in ks."""
    def statistic(z):
        top = z.abs().topk(max(ks), dim=1).values.cumsum(1)
        return torch.stack([top[:, k - 1] / k for k in ks], dim=1)
    return statistic


# --- exact identities ----------------------------------------------------------------------------

def test_max_of_one_is_the_half_normal_mean():
    assert _C.expected_max_abs(1) == pytest.approx(SQRT_2_OVER_PI, rel=1e-13)


@pytest.mark.parametrize("m", [1, 2, 3, 7, 10, 100, 1000, 12345])
def test_mean_of_all_m_is_the_half_normal_mean(m):
    assert _C.expected_topk_abs(m, m) == pytest.approx(SQRT_2_OVER_PI, rel=1e-12)


@pytest.mark.parametrize("m", [1, 2, 5, 64, 1000, 10**6, 10**9])
def test_topk_with_k_one_is_the_max(m):
    assert _C.expected_topk_abs(m, 1) == _C.expected_max_abs(m)


def test_max_of_two_is_two_over_sqrt_pi():
    # max(|a|, |b|) = (|a + b| + |a - b|) / 2 and a +- b ~ N(0, 2): E = sqrt(2) E|z| = 2 / sqrt(pi).
    assert _C.expected_max_abs(2) == pytest.approx(2.0 / math.sqrt(math.pi), rel=1e-13)


def test_range_of_few_normals_has_closed_forms():
    assert _C.expected_range(1) == 0.0
    assert _C.expected_range(2) == pytest.approx(2.0 / math.sqrt(math.pi), rel=1e-13)
    assert _C.expected_range(3) == pytest.approx(3.0 / math.sqrt(math.pi), rel=1e-13)


# The control-chart constant d2(n) = E[range of n normals], as published to three decimals.
D2_TABLE = {2: 1.128, 3: 1.693, 4: 2.059, 5: 2.326, 6: 2.534, 7: 2.704, 8: 2.847, 9: 2.970,
            10: 3.078, 15: 3.472, 20: 3.735, 25: 3.931}


@pytest.mark.parametrize("n", sorted(D2_TABLE))
def test_range_matches_the_published_d2_table(n):
    assert abs(_C.expected_range(n) - D2_TABLE[n]) <= 0.0005 + 1e-12


def test_lp_consistency_closed_forms():
    assert _C.lp_consistency(1.0) == pytest.approx(SQRT_2_OVER_PI, rel=1e-14)
    assert _C.lp_consistency(2.0) == pytest.approx(1.0, rel=1e-14)
    assert _C.lp_consistency(3.0) == pytest.approx((2.0 * SQRT_2_OVER_PI) ** (1.0 / 3.0), rel=1e-14)
    assert _C.lp_consistency(4.0) == pytest.approx(3.0 ** 0.25, rel=1e-14)  # E z^4 = 3


@pytest.mark.parametrize("p", [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0])
def test_lp_consistency_is_the_p_th_root_of_the_absolute_moment(p):
    # E|z|^p = 2 * integral_0^inf x^p phi(x) dx, by the trapezoid rule on a fine grid.
    x = torch.linspace(0.0, 20.0, 200_001, dtype=torch.float64)  # x^8 phi(x) < 1e-32 beyond 20
    density = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    moment = 2.0 * torch.trapezoid(x.pow(p) * density, x).item()
    assert _C.lp_consistency(p) == pytest.approx(moment ** (1.0 / p), rel=1e-7)


def test_paper_multiplier_is_the_authors_formula():
    for m in [2, 3, 10, 256, 1000, 4096, 10**6, 10**9]:
        expected = 0.5 * (1.0 + math.sqrt(math.pi * math.log(4.0))) / math.sqrt(2.0 * math.log(m))
        assert _C.paper_linf_multiplier(m) == pytest.approx(expected, rel=1e-14)
    assert _C.paper_linf_multiplier(1) == math.inf  # ln 1 = 0, as in their formula


# --- shape ---------------------------------------------------------------------------------------

def test_constants_grow_with_m_and_fall_with_k():
    ms = [1, 2, 3, 5, 10, 100, 1000, 10**4, 10**5, 10**6, 10**9, 10**12]
    maxima = [_C.expected_max_abs(m) for m in ms]
    assert all(a < b for a, b in zip(maxima, maxima[1:]))
    ranges = [_C.expected_range(n) for n in ms]
    assert all(a < b for a, b in zip(ranges, ranges[1:]))
    for k in [1, 10, 100]:
        values = [_C.expected_topk_abs(m, k) for m in ms if m >= k]
        assert all(a < b for a, b in zip(values, values[1:]))
    for m in [100, 10**6]:
        values = [_C.expected_topk_abs(m, k) for k in [1, 2, 5, 10, 50, 100]]
        assert all(a > b for a, b in zip(values, values[1:]))
        assert values[-1] > SQRT_2_OVER_PI


def test_extreme_m_gives_finite_values():
    big = 2**63 - 1
    for value in [_C.expected_max_abs(big), _C.expected_topk_abs(big, 1000), _C.expected_range(big)]:
        assert math.isfinite(value) and value > 0


def test_repeated_calls_return_the_same_value():
    first = _C.expected_topk_abs(777, 13)
    assert all(_C.expected_topk_abs(777, 13) == first for _ in range(100))


# --- Monte Carlo ---------------------------------------------------------------------------------

# (m, the k to check, rows): rows chosen so that RESOLVING_POWER standard errors stay below 1%.
DIRECT_CASES = [
    (2, [1, 2], 120_000),
    (16, [1, 10, 16], 20_000),
    (256, [1, 10, 100], 5_000),
    (4096, [1, 10, 100], 2_500),
]


@pytest.mark.parametrize("m,ks,rows", DIRECT_CASES)
def test_topk_matches_monte_carlo_of_normal_samples(m, ks, rows):
    mean, error = sample_statistic(topk_means(ks), m, rows, seed=1000 + m)
    for i, k in enumerate(ks):
        assert_monte_carlo_agrees(_C.expected_topk_abs(m, k), mean[i].item(), error[i].item(),
                                  f"E_topk(m={m}, k={k})")


def sample_top_order_statistics(m, k, rows, seed):
    """The k largest of m i.i.d. |z|, exactly in distribution, without drawing m values.

    Renyi: the uniform order statistics from the top are U_(m-j) = prod_{i<=j} V_i^(1/(m-i)), V_i
    i.i.d. uniform; so with E_i ~ Exp(1), -log U_(m-j) = sum_{i<=j} E_i / (m - i). The tail
    probability 1 - U is then mapped to |z| by the half-normal quantile, -ndtri((1 - U) / 2).
    """
    generator = torch.Generator().manual_seed(seed)
    exponentials = torch.empty(rows, k, dtype=torch.float64).exponential_(generator=generator)
    divisors = torch.arange(m, m - k, -1, dtype=torch.float64)
    log_u = -(exponentials / divisors).cumsum(1)
    tail = -torch.expm1(log_u)
    return -torch.special.ndtri(0.5 * tail)


@pytest.mark.parametrize("m", [256, 10**5, 10**6, 10**9])
def test_topk_matches_monte_carlo_of_order_statistics_at_large_m(m):
    # m values per draw is too many for a direct sample at m >= 1e5; the order-statistic sampler
    # is exact, and m = 256 cross-checks it against the direct samples above.
    ks = [1, 10, 100]
    rows = 10_000
    top = sample_top_order_statistics(m, max(ks), rows, seed=2000 + m % 9973)
    sums = top.cumsum(1)
    for k in ks:
        values = sums[:, k - 1] / k
        estimate, error = values.mean().item(), values.std().item() / math.sqrt(rows)
        assert_monte_carlo_agrees(_C.expected_topk_abs(m, k), estimate, error, f"E_topk(m={m}, k={k})")


@pytest.mark.parametrize("n,rows", [(2, 200_000), (10, 25_000), (100, 5_000), (1000, 2_000)])
def test_range_matches_monte_carlo(n, rows):
    def statistic(z):
        return (z.amax(1) - z.amin(1)).unsqueeze(1)

    mean, error = sample_statistic(statistic, n, rows, seed=3000 + n)
    assert_monte_carlo_agrees(_C.expected_range(n), mean[0].item(), error[0].item(), f"E_range(n={n})")


# --- invalid arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("call,argument", [
    (lambda: _C.expected_max_abs(0), "m"),
    (lambda: _C.expected_max_abs(-5), "m"),
    (lambda: _C.expected_topk_abs(0, 1), "m"),
    (lambda: _C.expected_topk_abs(10, 0), "k"),
    (lambda: _C.expected_topk_abs(10, 11), "k"),
    (lambda: _C.expected_range(0), "n"),
    (lambda: _C.lp_consistency(0.5), "p"),
    (lambda: _C.lp_consistency(float("nan")), "p"),
    (lambda: _C.lp_consistency(float("inf")), "p"),
    (lambda: _C.paper_linf_multiplier(0), "m"),
])
def test_invalid_arguments_raise_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"\b{argument} must be"):
        call()
