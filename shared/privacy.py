"""Differential privacy math: clipping, Gaussian noise, and a Rényi-DP accountant.

Pure functions over `dict[str, Tensor]` and floats; the node's DP trainer and
`python -m shared.dp_experiment` use these, and tests check them exactly.

Unit of privacy (see docs/privacy.md): one *user* of a region. The node splits
its users into disjoint units (one unit per user, or `groups` buckets chosen by
a keyed hash of the user id); each unit's model delta is trained from the base
weights on that unit's events only and clipped to L2 norm `clip_norm`. The sum
of clipped unit deltas then has L2 sensitivity `clip_norm` to adding or removing
one user when every user is its own unit (the user's term appears or vanishes),
and `2 * clip_norm` when users share hashed buckets (the user's bucket changes
from one clipped vector to another). Gaussian noise with standard deviation
`noise_multiplier * sensitivity` per coordinate makes one round the Gaussian
mechanism; rounds compose in the RDP accountant below.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]

# Orders at which the accountant evaluates RDP (the usual grid, as in Opacus/TF Privacy).
DEFAULT_ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    2.0,
    2.25,
    2.5,
    3.0,
    3.5,
    4.0,
    4.5,
    *[float(a) for a in range(5, 64)],
    *[float(a) for a in (64, 80, 96, 128, 160, 192, 256, 384, 512, 1024)],
)


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over every tensor (float64 accumulation)."""
    total = 0.0
    for t in state.values():
        total += float(t.to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def clip_by_global_norm(state: Mapping[str, torch.Tensor], clip_norm: float) -> StateDict:
    """Scale the whole update by min(1, clip_norm / ||update||); the result has norm <= clip."""
    if clip_norm <= 0:
        raise ValueError("clip_norm must be positive")
    norm = l2_norm(state)
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: v * factor for k, v in state.items()}


def sensitivity(clip_norm: float, *, grouped: bool) -> float:
    """L2 sensitivity of the sum of clipped unit deltas to adding/removing one user."""
    return (2.0 if grouped else 1.0) * clip_norm


def noise_stddev(noise_multiplier: float, clip_norm: float, *, grouped: bool) -> float:
    """Per-coordinate standard deviation of the Gaussian noise added to the sum."""
    return noise_multiplier * sensitivity(clip_norm, grouped=grouped)


def add_gaussian_noise(
    state: Mapping[str, torch.Tensor], stddev: float, generator: torch.Generator
) -> StateDict:
    """state + N(0, stddev^2) independently on every coordinate."""
    if stddev < 0:
        raise ValueError("stddev must be >= 0")
    out: StateDict = {}
    for name in sorted(state):
        v = state[name]
        if stddev == 0:
            out[name] = v.clone()
            continue
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float64) * stddev
        out[name] = (v.to(torch.float64) + noise).to(v.dtype)
    return out


def sum_states(states: Iterable[Mapping[str, torch.Tensor]]) -> StateDict:
    total: StateDict | None = None
    for s in states:
        if total is None:
            total = {k: v.to(torch.float64).clone() for k, v in s.items()}
        else:
            for k, v in s.items():
                total[k].add_(v.to(torch.float64))
    if total is None:
        raise ValueError("no states to sum")
    return total


# --- Rényi differential privacy of the (subsampled) Gaussian mechanism ----------------


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _rdp_subsampled_int(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer order alpha (Mironov et al. 2019).

    log( sum_k C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)) ) / (alpha - 1)
    """
    log_a = -math.inf
    for k in range(alpha + 1):
        term = (
            _log_comb(alpha, k)
            + k * math.log(q)
            + (alpha - k) * math.log1p(-q)
            + (k * k - k) / (2 * sigma**2)
        )
        log_a = _log_add(log_a, term)
    return log_a / (alpha - 1)


def rdp_gaussian(
    *, noise_multiplier: float, sampling_rate: float, steps: int, orders: Sequence[float]
) -> list[float]:
    """RDP epsilons of `steps` compositions of the (subsampled) Gaussian mechanism.

    sampling_rate 1.0: exactly steps * alpha / (2 sigma^2) for every order.
    sampling_rate < 1: the integer-order bound of Mironov, Talwar and Zhang (2019) for
    Poisson subsampling; fractional orders are skipped (reported as +inf).
    """
    if noise_multiplier <= 0:
        return [math.inf for _ in orders]
    if not 0 < sampling_rate <= 1:
        raise ValueError("sampling_rate must be in (0, 1]")
    out: list[float] = []
    for alpha in orders:
        if alpha <= 1:
            raise ValueError("orders must be > 1")
        if sampling_rate == 1.0:
            out.append(steps * alpha / (2 * noise_multiplier**2))
        elif float(alpha).is_integer():
            out.append(steps * _rdp_subsampled_int(sampling_rate, noise_multiplier, int(alpha)))
        else:
            out.append(math.inf)
    return out


def epsilon_from_rdp(rdp: Sequence[float], orders: Sequence[float], delta: float) -> float:
    """(epsilon, delta)-DP from RDP, minimized over orders.

    Uses the conversion of Balle et al. (2020), Thm 21 (as Opacus and TF Privacy do):
    eps = rdp + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1).
    """
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    best = math.inf
    for r, a in zip(rdp, orders, strict=True):
        if math.isinf(r):
            continue
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, max(eps, 0.0))
    return best


def dp_epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """epsilon after `steps` rounds at the given delta; 0 before any round."""
    if steps == 0:
        return 0.0
    rdp = rdp_gaussian(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        steps=steps,
        orders=orders,
    )
    return epsilon_from_rdp(rdp, orders, delta)


def noise_multiplier_for_epsilon(
    *,
    epsilon: float,
    delta: float,
    steps: int,
    sampling_rate: float = 1.0,
    tolerance: float = 1e-4,
) -> float:
    """The smallest noise multiplier (bisection) whose epsilon after `steps` is <= epsilon."""
    if math.isinf(epsilon):
        return 0.0
    lo, hi = 1e-3, 1.0
    while dp_epsilon(noise_multiplier=hi, sampling_rate=sampling_rate, steps=steps, delta=delta) > (
        epsilon
    ):
        hi *= 2
        if hi > 1e6:
            raise ValueError("epsilon unreachable")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        eps = dp_epsilon(
            noise_multiplier=mid, sampling_rate=sampling_rate, steps=steps, delta=delta
        )
        if eps > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def epsilon_of_releases(
    releases: Sequence[tuple[float, float] | tuple[float, float, int]],
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """epsilon of a sequence of (noise_multiplier, sampling_rate[, steps]) releases.

    A release of `steps` subsampled Gaussian mechanisms (a round of DP-SGD) counts as
    that many; RDP adds up over all of them.
    """
    if not releases:
        return 0.0
    total = [0.0 for _ in orders]
    for release in releases:
        sigma, q = release[0], release[1]
        steps = int(release[2]) if len(release) > 2 else 1
        rdp = rdp_gaussian(noise_multiplier=sigma, sampling_rate=q, steps=steps, orders=orders)
        total = [a + b for a, b in zip(total, rdp, strict=True)]
    return epsilon_from_rdp(total, orders, delta)
