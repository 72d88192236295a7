"""A plain-PyTorch reference of the Lp batch-norm family, written from SPEC §1-§3.

Everything is computed in float64 from the (possibly half) input; gradients come from autograd
through these formulas, so they are independent of the hand-derived backward of SPEC §3.
The constants are computed here by quadrature, independently of the library's core.
"""
import functools
import math

import torch

NORMS = ("l2", "l1", "linf", "topk", "range", "p")
CHUNKED = ("linf", "topk", "range")  # the norms that accept chunks > 1 (ghost batches)


# ---------------------------------------------------------------------------------------------
# Constants of SPEC §1: expected order statistics of |z| (half-normal) and z (normal), z ~ N(0, 1)

def _integrate(f, hi=14.0, n=2 ** 17):
    """Simpson's rule of f over [0, hi] in float64; every integrand below is smooth and negligible
    (< 1e-30) beyond hi."""
    x = torch.linspace(0.0, hi, n + 1, dtype=torch.float64)
    w = torch.ones_like(x)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return float((f(x) * w).sum() * (hi / n) / 3.0)


def _log_tail_abs(x):
    """log P(|z| > x) = log erfc(x / sqrt 2), accurate far into the tail."""
    return torch.special.log_ndtr(-x) + math.log(2.0)


@functools.lru_cache(maxsize=None)
def expected_topk_abs(m, k):
    """E[mean of the k largest of m i.i.d. |z|].

    E[sum of the k largest] = integral over x > 0 of E[min(B, k)], B ~ Binomial(m, P(|z| > x)),
    since the i-th largest exceeds x exactly when B >= i.
    """
    def integrand(x):
        log_q = _log_tail_abs(x)
        log_1mq = torch.log(-torch.expm1(log_q))  # log P(|z| <= x); -inf at x = 0
        total = torch.zeros_like(x)
        for j in range(k):  # E[min(B, k)] = k - sum_{j < k} (k - j) P(B = j)
            log_binom = math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1)
            log_pmf = log_binom + j * log_q + (m - j) * log_1mq
            total = total + (k - j) * torch.exp(log_pmf)
        return k - total
    return _integrate(integrand) / k


def expected_max_abs(m):
    """E[max of m i.i.d. |z|] (= E_topk with k = 1)."""
    return expected_topk_abs(m, 1)


@functools.lru_cache(maxsize=None)
def expected_range(n):
    """E[max - min of n i.i.d. z] = integral over the real line of 1 - Phi(x)^n - (1 - Phi(x))^n,
    which is even in x."""
    def integrand(x):
        one_minus_phi_n = -torch.expm1(n * torch.log1p(-torch.special.ndtr(-x)))
        return 2.0 * (one_minus_phi_n - torch.special.ndtr(-x) ** n)
    return _integrate(integrand)


def lp_consistency(p):
    """c_p = E[|z|^p]^(1/p)."""
    return (2 ** (p / 2) * math.gamma((p + 1) / 2) / math.sqrt(math.pi)) ** (1 / p)


def paper_linf_multiplier(m):
    """The multiplier of the authors' code: sigma = max|d| * multiplier(m)."""
    return 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(m))


# ---------------------------------------------------------------------------------------------
# SPEC §1: the scale estimate sigma of each channel

def _topk_mean(v, k):
    """Mean of the k largest entries of v along the last dim; ties go to the lowest index
    (a stable descending sort), so autograd sends the gradient where the SPEC says."""
    index = torch.sort(v.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    return v.gather(-1, index).mean(-1)


def _extreme(v, largest):
    """max (or min) along the last dim, gradient to its first occurrence."""
    index = (v.detach().argmax if largest else v.detach().argmin)(dim=-1, keepdim=True)
    return v.gather(-1, index).squeeze(-1)


def sigma_of(x, norm="l1", k=10, p=2.0, chunks=1, constant="exact"):
    """x: (C, N, S) float64, one row per channel, elements in the order n * S + s.
    Returns (mu, sigma), each of shape (C,)."""
    C, N, S = x.shape
    mu = x.mean(dim=(1, 2))
    d = x - mu[:, None, None]
    if norm == "l2":
        return mu, d.pow(2).mean(dim=(1, 2)).sqrt()
    if norm == "l1":
        return mu, math.sqrt(math.pi / 2) * d.abs().mean(dim=(1, 2))
    if norm == "p":
        return mu, d.abs().pow(p).mean(dim=(1, 2)).pow(1 / p) / lp_consistency(p)

    # linf / topk / range: one estimate per chunk of N / chunks samples, then their average
    n = (N // chunks) * S  # the chunk size, in elements
    d, x = d.reshape(C, chunks, n), x.reshape(C, chunks, n)
    if norm in ("linf", "topk"):
        kk = 1 if norm == "linf" else k
        statistic = _topk_mean(d.abs(), kk)  # kk = 1: max|d|
        if constant == "paper":
            per_chunk = statistic * paper_linf_multiplier(n)
        else:
            per_chunk = statistic / expected_topk_abs(n, kk)
    elif norm == "range":
        statistic = _extreme(x, largest=True) - _extreme(x, largest=False)
        if constant == "paper":
            per_chunk = statistic * 0.35 * paper_linf_multiplier(n)
        else:
            per_chunk = statistic / expected_range(n)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    return mu, per_chunk.mean(dim=-1)


# ---------------------------------------------------------------------------------------------
# SPEC §1 and §2: the batch norm itself, with torch's F.batch_norm signature

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, norm="l1", k=10, p=2.0, chunks=1, constant="exact"):
    """Returns y in float64 (differentiable w.r.t. `input`, `weight`, `bias` when those are float64
    leaves); updates running_mean / running_var in place (in their own dtype) as SPEC §2."""
    x = input if input.dtype == torch.float64 else input.double()
    C = x.shape[1]
    shape = (1, C) + (1,) * (x.dim() - 2)  # broadcast a per-channel vector against x
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    b = torch.zeros(C, dtype=torch.float64) if bias is None else bias.double()

    if training or running_mean is None or running_var is None:  # batch statistics (as torch)
        rows = x.transpose(0, 1).reshape(C, x.shape[0], -1)  # (C, N, S)
        mu, sigma = sigma_of(rows, norm, k, p, chunks, constant)
        var = sigma.pow(2)
        if training and running_mean is not None:  # SPEC §2
            m = rows.shape[1] * rows.shape[2]
            with torch.no_grad():
                f = momentum
                running_mean.copy_((1 - f) * running_mean.double() + f * mu)
                running_var.copy_((1 - f) * running_var.double() + f * var * m / (m - 1))
    else:  # running statistics: plain batch norm, whatever the norm
        mu, var = running_mean.double(), running_var.double()

    r = 1.0 / torch.sqrt(var + eps)
    return (x - mu.view(shape)) * r.view(shape) * w.view(shape) + b.view(shape)


def forward_backward(input, running_mean, running_var, weight, bias, grad_output, **kwargs):
    """The reference output and gradients (input, weight, bias), all float64; running stats are
    updated in place. grad_output may be None (forward only)."""
    x = input.detach().double().requires_grad_()
    w = None if weight is None else weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    y = batch_norm(x, running_mean, running_var, w, b, **kwargs)
    if grad_output is None:
        return y.detach(), None, None, None
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad_output.double())
    gx, grads = grads[0], list(grads[1:])
    gw = grads.pop(0) if w is not None else None
    gb = grads.pop(0) if b is not None else None
    return y.detach(), gx, gw, gb
