"""DP-FedAvg inside one region: per-user-unit local training, clipping and Gaussian noise.

McMahan et al. (2018), "Learning Differentially Private Recurrent Language
Models", with the region's users in the role of the clients: every unit (one
user, or a hashed bucket of users) trains from the round's base weights on its
own events only; each unit delta is clipped to `clip_norm`; the node adds
Gaussian noise to the sum and divides by the expected number of units. The
node sends that noisy mean as its delta with `num_examples = units`, so the
coordinator's example-weighted FedAvg is the sum of noisy sums over the total
number of units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shared.features import ItemFeatures
from shared.model import HybridTwoTower, ModelConfig
from shared.privacy import (
    StateDict,
    add_gaussian_noise,
    clip_by_global_norm,
    l2_norm,
    noise_stddev,
)
from shared.training import TrainConfig, UserSequence, make_examples, train_local


@dataclass(frozen=True)
class DPConfig:
    clip_norm: float
    noise_multiplier: float
    groups: int = 0  # 0: every user is its own unit; >0: users hashed into this many buckets
    sampling_rate: float = 1.0  # Poisson sampling of units per round
    # Parameter names (or name prefixes) that the units do not train. Their delta is
    # zero by construction, whatever the data, so they are neither clipped nor noised:
    # the release is the other parameters only (a data-independent choice, no DP cost).
    frozen: tuple[str, ...] = ()
    # Server learning rate, applied by the node to its noisy mean before sending
    # (post-processing, no privacy cost). FedAvg is linear, so the coordinator's
    # weighted mean is then exactly `server_lr x` the mean of all noisy means.
    server_lr: float = 1.0

    @property
    def grouped(self) -> bool:
        return self.groups > 0

    def is_frozen(self, name: str) -> bool:
        return is_frozen(name, self.frozen)


def is_frozen(name: str, frozen: tuple[str, ...] | list[str]) -> bool:
    """Whether parameter `name` is one of `frozen`, or inside a module named there."""
    return any(name == f or name.startswith(f + ".") for f in frozen)


@dataclass(frozen=True)
class DPUpdate:
    delta: StateDict  # noisy mean of clipped unit deltas, times the server lr
    num_units: int  # units in the region (sent as num_examples)
    sampled_units: int
    clipped_fraction: float  # share of sampled units whose delta was scaled down
    noise_stddev: float


def assign_units(users: list[str], groups: int, key: bytes) -> dict[str, list[str]]:
    """Unit id -> users. groups == 0: one unit per user; else HMAC(key, user) mod groups."""
    if groups <= 0:
        return {u: [u] for u in sorted(users)}
    units: dict[str, list[str]] = {}
    for u in sorted(users):
        digest = hmac.new(key, u.encode(), hashlib.sha256).digest()
        bucket = int.from_bytes(digest[:8], "big") % groups
        units.setdefault(f"g{bucket}", []).append(u)
    return units


def _unit_seed(seed: int, unit: str) -> int:
    digest = hashlib.sha256(f"{seed}|{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def poisson_coin(key: bytes, label: str, rate: float) -> bool:
    """A keyed Poisson coin: HMAC-SHA256(key, label) read as a uniform in [0, 1) < rate."""
    digest = hmac.new(key, label.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def _sampled(key: bytes, seed: int, unit: str, rate: float) -> bool:
    """The unit's Poisson coin for this round, keyed by the node's secret round key.

    Amplification by subsampling needs the coin to be unpredictable to whoever sees
    the update: derived from the (public) round seed and user id alone, anyone could
    tell whether a given user was in the round. The key is fresh random bytes per
    round on the node (and independent of the data), so one user's coin still does
    not depend on any other user.
    """
    return poisson_coin(key, f"coin|{seed}|{unit}", rate)


def noise_generator(key: bytes) -> torch.Generator:
    """The generator of a release's Gaussian noise, seeded from the node's secret key.

    Never from the round seed: the round id is public, and noise that whoever sees the
    update can regenerate can be subtracted, leaving the clipped sum bare. The key is
    fresh random bytes per round on the node (the experiment passes fixed ones).
    """
    digest = hmac.new(key, b"noise", hashlib.sha256).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def dp_fedavg_update(
    config: ModelConfig,
    base_state: Mapping[str, torch.Tensor],
    features: ItemFeatures,
    sequences: Mapping[str, UserSequence],
    train_config: TrainConfig,
    dp: DPConfig,
    *,
    seed: int,
    unit_key: bytes,
) -> DPUpdate | None:
    """The region's DP contribution for one round; None when the region has no unit.

    With units, there is always a release, noise alone when the Poisson coins sampled
    none (or none with an example)."""
    units = assign_units(list(sequences), dp.groups, unit_key)
    num_units = dp.groups if dp.grouped else len(units)
    if num_units == 0:
        return None
    g = noise_generator(unit_key)
    model = HybridTwoTower(config)
    for name, param in model.named_parameters():
        param.requires_grad_(not dp.is_frozen(name))
    released = [k for k in base_state if not dp.is_frozen(k)]
    total: StateDict = {k: torch.zeros_like(base_state[k], dtype=torch.float64) for k in released}
    # A unit's batches are tiny: gathering the rows a step touches is much cheaper than
    # computing every catalog row (same loss and gradients while negatives are sampled).
    rows = 0 if train_config.num_negatives < config.num_items else train_config.full_catalog_rows
    sampled = 0
    clipped = 0
    for unit, members in sorted(units.items()):
        # Each unit's randomness depends on its own id only, so adding or removing one
        # user leaves every other unit's clipped delta exactly as it was.
        unit_seed = _unit_seed(seed, unit)
        if dp.sampling_rate < 1.0 and not _sampled(unit_key, seed, unit, dp.sampling_rate):
            continue
        examples = make_examples((sequences[u] for u in members), config.max_history)
        if len(examples) == 0:
            continue
        sampled += 1
        model.load_state_dict(base_state)
        # Negatives from the whole catalog: "seen" items would be this one user's own
        # items (a unit's examples are one user's), and a pool drawn from the region's
        # data would make one unit's delta depend on the other users. No id dropout:
        # one SGD step per unit is all the id rows get (measured that way, docs/privacy.md).
        unit_cfg = dataclasses.replace(
            train_config,
            seed=unit_seed,
            fedprox_mu=0.0,
            full_catalog_rows=rows,
            negatives_from="catalog",
            id_dropout=0.0,
        )
        train_local(model, features, examples, unit_cfg)
        trained = model.state_dict()
        delta = {k: trained[k].detach() - base_state[k] for k in released}
        if l2_norm(delta) > dp.clip_norm:
            clipped += 1
        for k, v in clip_by_global_norm(delta, dp.clip_norm).items():
            total[k].add_(v.to(torch.float64))
    # Released even when no unit was sampled (noise alone): whether an update exists
    # must not depend on the data, or the release itself would tell (the accountant
    # covers the noisy sum, not that choice).
    std = noise_stddev(dp.noise_multiplier, dp.clip_norm, grouped=dp.grouped)
    noisy = add_gaussian_noise(total, std, g)
    denominator = dp.sampling_rate * num_units / dp.server_lr
    mean = {
        k: (noisy[k] / denominator).to(v.dtype) if k in noisy else torch.zeros_like(v)
        for k, v in base_state.items()
    }
    return DPUpdate(
        delta=mean,
        num_units=num_units,
        sampled_units=sampled,
        clipped_fraction=clipped / sampled if sampled else 0.0,
        noise_stddev=std,
    )


@dataclass
class ServerMomentum:
    """DP-FedAvgM's server step (McMahan et al. 2018, Alg. 1 with momentum).

    `v <- momentum * v + mean_delta; step = lr * v`. It only reads the released noisy
    means, so it is post-processing: it costs no privacy and the accountant does not
    change. FedAvg is linear, so a node that applies it to its own noisy delta (with
    its constant unit count as weight) makes the coordinator's weighted mean exactly
    the global momentum step of the averaged deltas, as long as every node takes part
    in every round. lr 1, momentum 0 is plain FedAvg.
    """

    lr: float = 1.0
    momentum: float = 0.0
    velocity: StateDict | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("server lr must be positive")
        if not 0 <= self.momentum < 1:
            raise ValueError("server momentum must be in [0, 1)")

    @property
    def plain(self) -> bool:
        return self.lr == 1.0 and self.momentum == 0.0

    def step(self, delta: Mapping[str, torch.Tensor]) -> StateDict:
        """The delta to apply this round, given this round's (noisy) mean delta."""
        if self.velocity is None or self.momentum == 0.0:
            velocity = {k: v.detach().clone() for k, v in delta.items()}
        else:
            velocity = {k: self.velocity[k] * self.momentum + v for k, v in delta.items()}
        self.velocity = velocity
        return {k: v * self.lr for k, v in velocity.items()}


@dataclass
class ServerAdam:
    """FedAdam's server step (Reddi et al. 2021, "Adaptive Federated Optimization").

    `m <- b1 m + (1 - b1) d; v <- b2 v + (1 - b2) d^2; step = lr m / (sqrt(v) + tau)`
    per coordinate, on the round's (noisy) mean delta `d`, without bias correction as
    in the paper. Like `ServerMomentum` it reads only released means: post-processing,
    no privacy cost. It is not linear, so unlike momentum a node cannot apply it to its
    own mean in the coordinator's place; the experiment runs it where the coordinator
    would (`python -m shared.dp_experiment --server-optimizer adam`).
    """

    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-2
    m: StateDict | None = None
    v: StateDict | None = None
    # Known variance of the DP noise on each coordinate of the mean (z C / (q U))^2. Set,
    # `v` less the noise's share of it, (1 - b2^t) noise_variance, floored at 0, takes the
    # place of `v` in the step (DP-AdamBC, Tang et al. 2024: without it the noise
    # dominates `v` and Adam is scaled SGD). Experiment flag; the coordinator keeps 0.
    noise_variance: float = 0.0
    steps: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.tau <= 0:
            raise ValueError("server lr and tau must be positive")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("server betas must be in [0, 1)")
        if self.noise_variance < 0:
            raise ValueError("noise variance must be >= 0")

    def step(self, delta: Mapping[str, torch.Tensor]) -> StateDict:
        m_prev = self.m or {k: torch.zeros_like(v) for k, v in delta.items()}
        v_prev = self.v or {k: torch.zeros_like(v) for k, v in delta.items()}
        self.steps += 1
        self.m = {k: m_prev[k] * self.beta1 + d * (1 - self.beta1) for k, d in delta.items()}
        self.v = {k: v_prev[k] * self.beta2 + d * d * (1 - self.beta2) for k, d in delta.items()}
        noise = self.noise_variance * (1 - self.beta2**self.steps)
        return {
            k: self.lr * self.m[k] / ((self.v[k] - noise).clamp(min=0).sqrt() + self.tau)
            for k in delta
        }
