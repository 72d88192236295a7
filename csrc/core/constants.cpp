#include "constants.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

namespace lpnorm::core {
namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kInf = std::numeric_limits<double>::infinity();

// Integrands are cut where they fall below these: far beyond double precision of the results.
constexpr double kTailMass = 1e-20;     // neglected m * P(|z| > x) beyond the upper bound
constexpr double kFlatDefect = 1e-18;   // neglected k - E[min(k, N)] below the lower bound (per k)
constexpr double kTermCutoff = 1e-30;   // binomial terms smaller than this are dropped
constexpr double kPanelTolerance = 1e-14;  // per unit length, relative to the integrand's size
constexpr int kMaxRefinement = 16;

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("lpnorm constants: ") + what);
}

// ---------------------------------------------------------------------------------------------
// Composite Gauss-Legendre quadrature. Every integrand here is analytic, so a 20-point rule per
// panel converges far faster than Simpson; panel widths follow the integrand's feature size.

struct GaussLegendre {
  static constexpr int kOrder = 20;
  double node[kOrder];    // on [-1, 1]
  double weight[kOrder];

  GaussLegendre() {
    // Newton on P_n from the usual cosine guesses; P_n and P_n' by the three-term recurrence.
    for (int i = 0; i < kOrder; ++i) {
      double x = std::cos(kPi * (i + 0.75) / (kOrder + 0.5));
      double derivative = 1.0;
      for (int iter = 0; iter < 100; ++iter) {
        double p_prev = 1.0, p = x;
        for (int n = 2; n <= kOrder; ++n) {
          const double p_next = ((2.0 * n - 1.0) * x * p - (n - 1.0) * p_prev) / n;
          p_prev = p;
          p = p_next;
        }
        derivative = kOrder * (x * p - p_prev) / (x * x - 1.0);
        const double step = p / derivative;
        x -= step;
        if (std::fabs(step) < 1e-16) break;
      }
      node[i] = x;
      weight[i] = 2.0 / ((1.0 - x * x) * derivative * derivative);
    }
  }
};

const GaussLegendre& gauss_legendre() {
  static const GaussLegendre rule;  // thread-safe one-time initialization
  return rule;
}

template <class F>
double gauss_legendre_panel(const F& f, double a, double b) {
  const GaussLegendre& rule = gauss_legendre();
  const double mid = 0.5 * (a + b), half = 0.5 * (b - a);
  double sum = 0.0;
  for (int i = 0; i < GaussLegendre::kOrder; ++i) sum += rule.weight[i] * f(mid + half * rule.node[i]);
  return half * sum;
}

// Accept a panel when its two halves agree with it to `tolerance`, else split. Needed because
// for large k the integrand min-like step E[min(k, N(x))] bends sharply where m q(x) = k, on a
// scale of about 1/(x sqrt(k)), much finer than elsewhere.
template <class F>
double refine_panel(const F& f, double a, double b, double whole, double tolerance, int depth) {
  const double mid = 0.5 * (a + b);
  const double left = gauss_legendre_panel(f, a, mid);
  const double right = gauss_legendre_panel(f, mid, b);
  if (depth == 0 || std::fabs(left + right - whole) <= tolerance) return left + right;
  return refine_panel(f, a, mid, left, 0.5 * tolerance, depth - 1) +
         refine_panel(f, mid, b, right, 0.5 * tolerance, depth - 1);
}

// Integral of f over [a, b], whose values are at most `scale`: uniform panels 0.75/b wide
// (near x the integrands change on a scale of about 1/x, as log P(|z| > x) has slope -x),
// each refined until the error estimate is ~1e-14 relative.
template <class F>
double integrate(const F& f, double a, double b, double scale) {
  if (!(b > a)) return 0.0;
  const double per_unit = std::max(2.0, b / 0.75);
  const int64_t panels = std::max<int64_t>(4, static_cast<int64_t>(std::ceil((b - a) * per_unit)));
  const double width = (b - a) / static_cast<double>(panels);
  double total = 0.0;
  for (int64_t j = 0; j < panels; ++j) {
    const double lo = a + static_cast<double>(j) * width;
    const double hi = j + 1 == panels ? b : lo + width;
    total += refine_panel(f, lo, hi, gauss_legendre_panel(f, lo, hi), kPanelTolerance * scale * (hi - lo),
                          kMaxRefinement);
  }
  return total;
}

// Largest x in [lo, hi] with pred(x) true, for pred true on a prefix of [lo, hi].
template <class Pred>
double bisect_last_true(const Pred& pred, double lo, double hi) {
  if (pred(hi)) return hi;
  if (!pred(lo)) return lo;
  for (int iter = 0; iter < 100 && hi - lo > 1e-13 * hi; ++iter) {
    const double mid = 0.5 * (lo + hi);
    (pred(mid) ? lo : hi) = mid;
  }
  return lo;
}

// Upper integration bound: where count * P(|z| > x) falls to kTailMass. The neglected part
// of the integral is below this times the Mills ratio, i.e. negligible.
double tail_bound(double count, double two_sided_factor) {
  const double log_target = std::log(kTailMass) - std::log(count) - std::log(two_sided_factor);
  return bisect_last_true(
      [&](double x) { return std::log(two_sided_factor * std::erfc(x / kSqrt2)) >= log_target; },
      0.0, 40.0);
}

// ---------------------------------------------------------------------------------------------
// Binomial probabilities in Loader's saddle-point form (the one R's dbinom uses):
//   ln P(N = i) = stirling_error(m) - stirling_error(i) - stirling_error(m - i)
//                 + ln(m / (2 pi i (m - i))) / 2 - deviance(i, m q) - deviance(m - i, m (1 - q)).
// Its parts are small near the mode. The textbook ln C(m, i) + i ln q + (m - i) ln(1 - q) has
// parts of size i ln(1/q) that cancel: ~1e-11 lost per term at m ~ 1e12, k ~ 1000, and the
// lgamma form of ln C(m, i) loses ~1e-6 at m ~ 1e9.

// ln Gamma(x) for x > 0. Not std::lgamma: glibc's writes the global `signgam`, a data race when
// kernels on several threads ask for constants at once.
double log_gamma(double x) {
  if (x < 50.0) return std::log(std::tgamma(x));
  const double inv = 1.0 / x, inv2 = inv * inv;
  // Stirling: (x - 1/2) ln x - x + ln(2 pi)/2 + 1/(12x) - 1/(360x^3) + 1/(1260x^5) - 1/(1680x^7);
  // the next term is below 1e-18 at x = 50.
  return (x - 0.5) * std::log(x) - x + 0.5 * std::log(2.0 * kPi) +
         inv * (1.0 / 12 - inv2 * (1.0 / 360 - inv2 * (1.0 / 1260 - inv2 / 1680)));
}

// stirling_error(n) = ln Gamma(n + 1) - (n ln n - n + ln(2 pi n) / 2), n >= 1.
double stirling_error(double n) {
  if (n < 16.0) {
    return log_gamma(n + 1.0) - (n * std::log(n) - n + 0.5 * std::log(2.0 * kPi * n));
  }
  const double inv = 1.0 / n, inv2 = inv * inv;
  // 1/(12n) - 1/(360n^3) + 1/(1260n^5) - 1/(1680n^7) + 1/(1188n^9); next term < 1e-16 at n = 16.
  return inv * (1.0 / 12 - inv2 * (1.0 / 360 - inv2 * (1.0 / 1260 - inv2 * (1.0 / 1680 - inv2 / 1188))));
}

// deviance(x, mu) = x ln(x / mu) + mu - x >= 0 for x > 0. Near x = mu both parts cancel, so there
// it is summed from ln(x/mu) = 2 atanh(v), v = (x - mu) / (x + mu):
//   deviance = (x - mu) v + 2x (v^3/3 + v^5/5 + ...).
double deviance(double x, double mu) {
  if (!(mu > 0.0)) return kInf;
  if (std::fabs(x - mu) < 0.1 * (x + mu)) {
    const double v = (x - mu) / (x + mu), v2 = v * v;
    double sum = (x - mu) * v;
    double power = 2.0 * x * v;
    for (int j = 1; j < 200; ++j) {
      power *= v2;
      const double next = sum + power / (2.0 * j + 1.0);
      if (next == sum) break;
      sum = next;
    }
    return sum;
  }
  return x * std::log(x / mu) + mu - x;
}

// ln P(N = i) for N ~ Binomial(m, q) as a function of q, for one fixed i.
struct BinomialLogProbability {
  int64_t m = 0, i = 0;
  double constant = 0.0;  // the Stirling and normalizing part, which does not depend on q

  BinomialLogProbability() = default;
  BinomialLogProbability(int64_t m_, int64_t i_) : m(m_), i(i_) {
    if (i == 0 || i == m) return;
    const double md = static_cast<double>(m), id = static_cast<double>(i), rest = static_cast<double>(m - i);
    constant = stirling_error(md) - stirling_error(id) - stirling_error(rest) +
               0.5 * std::log(md / (2.0 * kPi * id * rest));
  }

  // q = P(success), p = 1 - q, both accurate; log_q, log_p their logarithms.
  double operator()(double q, double p, double log_q, double log_p) const {
    const double md = static_cast<double>(m);
    if (i == 0) return md * log_p;
    if (i == m) return md * log_q;
    return constant - deviance(static_cast<double>(i), md * q) - deviance(static_cast<double>(m - i), md * p);
  }
};

// ---------------------------------------------------------------------------------------------
// Top-k of m half-normals. With q(x) = P(|z| > x) and N(x) ~ Binomial(m, q(x)) the number of the
// m values above x, the sum of the k largest is the integral over x >= 0 of min(k, N(x)), so
//   E[sum of the k largest] = integral_0^inf E[min(k, N(x))] dx.
// E[min(k, N)] is evaluated from whichever side of the binomial is the tail:
//   k <= mode:  k - sum_{i<k} (k - i) P(N = i)     (the terms fall as i goes down from k-1)
//   k >  mode:  m q - sum_{i>k} (i - k) P(N = i)   (the terms fall as i goes up from k+1)
// The first term is taken in log space (it can be ~e^-700 and still matter at m ~ 1e9), the
// rest by the ratio recurrence until the terms are negligible, so a point costs O(sqrt(var)) work.

struct TopkIntegrand {
  int64_t m, k;
  BinomialLogProbability below;  // ln P(N = k - 1)
  BinomialLogProbability above;  // ln P(N = k + 1), when k < m

  TopkIntegrand(int64_t m_, int64_t k_) : m(m_), k(k_), below(m_, k_ - 1) {
    if (k < m) above = BinomialLogProbability(m, k + 1);
  }

  // E[min(k, N(x))]; *defect = k - that, when it is computed without cancellation, else +inf.
  double evaluate(double x, double* defect) const {
    const double t = x / kSqrt2;
    const double q = std::erfc(t);
    const double kd = static_cast<double>(k), md = static_cast<double>(m);
    if (q <= 0.0) {  // every value is below x
      *defect = kd;
      return 0.0;
    }
    // 1 - q directly from erf where q is large, so log(1 - q) keeps full relative precision.
    const double p = q > 0.5 ? std::erf(t) : 1.0 - q;
    const double log_q = std::log(q);
    const double log_p = q > 0.5 ? std::log(p) : std::log1p(-q);

    if (kd <= (md + 1.0) * q) {
      int64_t i = k - 1;
      double term = std::exp(below(q, p, log_q, log_p));
      const double down = p / q;  // P(N = i-1) / P(N = i) = i / (m - i + 1) * (1 - q) / q
      double sum = 0.0;
      while (term > 0.0) {
        sum += static_cast<double>(k - i) * term;
        if (i == 0 || term < kTermCutoff) break;
        term *= static_cast<double>(i) / static_cast<double>(m - i + 1) * down;
        --i;
      }
      *defect = sum;
      return kd - sum;
    }
    *defect = kInf;
    const double mean = md * q;
    if (k == m) return mean;  // min(m, N) = N
    int64_t i = k + 1;
    double term = std::exp(above(q, p, log_q, log_p));
    const double up = q / p;  // P(N = i+1) / P(N = i) = (m - i) / (i + 1) * q / (1 - q)
    double sum = 0.0;
    while (term > 0.0) {
      sum += static_cast<double>(i - k) * term;
      if (i == m || term < kTermCutoff) break;
      term *= static_cast<double>(m - i) / static_cast<double>(i + 1) * up;
      ++i;
    }
    return mean - sum;
  }
};

double compute_topk_abs(int64_t m, int64_t k) {
  const TopkIntegrand integrand(m, k);
  const double kd = static_cast<double>(k);
  const double upper = tail_bound(static_cast<double>(m), 1.0);
  // Below `lower` the integrand equals k to ~1e-18 relative: integrate that part exactly.
  const double lower = bisect_last_true(
      [&](double x) {
        double defect;
        integrand.evaluate(x, &defect);
        return defect <= kFlatDefect * kd;
      },
      0.0, upper);
  const double curved = integrate(
      [&](double x) {
        double defect;
        return integrand.evaluate(x, &defect);
      },
      lower, upper, kd);
  return (kd * lower + curved) / kd;
}

// Range of n normals: max - min is the length of {x : min <= x < max}, and
// P(min <= x < max) = 1 - P(all > x) - P(all <= x), so
//   E[max - min] = integral_R 1 - Phi(x)^n - (1 - Phi(x))^n dx
//                = 2 integral_0^inf 1 - (1 - Q)^n - Q^n dx,   Q(x) = P(z > x) (symmetric in x).
double compute_range(int64_t n) {
  if (n == 1) return 0.0;
  const double nd = static_cast<double>(n);
  const auto integrand = [nd](double x) {
    const double Q = 0.5 * std::erfc(x / kSqrt2);
    return -std::expm1(nd * std::log1p(-Q)) - std::exp(nd * std::log(Q));
  };
  const double upper = tail_bound(nd, 0.5);
  // Where 1 - (1 - Q)^n is 1 to ~1e-18 and Q^n negligible, the integrand is exactly flat.
  const double lower = bisect_last_true(
      [&](double x) {
        const double Q = 0.5 * std::erfc(x / kSqrt2);
        return std::exp(nd * std::log1p(-Q)) + std::exp(nd * std::log(Q)) <= kFlatDefect;
      },
      0.0, upper);
  return 2.0 * (lower + integrate(integrand, lower, upper, 1.0));
}

// ---------------------------------------------------------------------------------------------
// One cache for every integral: the kernels ask for the same few (m, k) on every forward. The
// value is computed outside the lock (a duplicate computation in a race is harmless).

enum class Kind { TopkAbs, Range };

template <class Compute>
double cached(Kind kind, int64_t m, int64_t k, const Compute& compute) {
  static std::mutex mutex;
  static std::map<std::tuple<Kind, int64_t, int64_t>, double> cache;
  const auto key = std::make_tuple(kind, m, k);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  const double value = compute();
  std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, value);
  return value;
}

}  // namespace

double expected_max_abs(int64_t m) {
  require(m >= 1, "expected_max_abs: m must be >= 1");
  return expected_topk_abs(m, 1);
}

double expected_topk_abs(int64_t m, int64_t k) {
  require(m >= 1, "expected_topk_abs: m must be >= 1");
  require(k >= 1, "expected_topk_abs: k must be >= 1");
  require(k <= m, "expected_topk_abs: k must be <= m");
  return cached(Kind::TopkAbs, m, k, [m, k] { return compute_topk_abs(m, k); });
}

double expected_range(int64_t n) {
  require(n >= 1, "expected_range: n must be >= 1");
  return cached(Kind::Range, n, 0, [n] { return compute_range(n); });
}

double lp_consistency(double p) {
  require(std::isfinite(p) && p >= 1.0, "lp_consistency: p must be a finite number >= 1");
  // ln E|z|^p = (p/2) ln 2 + ln Gamma((p+1)/2) - ln(pi)/2; in log space so large p cannot overflow.
  const double log_moment = 0.5 * p * std::log(2.0) + log_gamma(0.5 * (p + 1.0)) - 0.5 * std::log(kPi);
  return std::exp(log_moment / p);
}

double paper_linf_multiplier(int64_t m) {
  require(m >= 1, "paper_linf_multiplier: m must be >= 1");
  const double numerator = 0.5 * (1.0 + std::sqrt(kPi * std::log(4.0)));
  return numerator / std::sqrt(2.0 * std::log(static_cast<double>(m)));
}

}  // namespace lpnorm::core
