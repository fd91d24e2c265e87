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

    @property
    def grouped(self) -> bool:
        return self.groups > 0


@dataclass(frozen=True)
class DPUpdate:
    delta: StateDict  # noisy mean of clipped unit deltas
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
    """The region's DP contribution for one round; None when no unit has an example."""
    units = assign_units(list(sequences), dp.groups, unit_key)
    num_units = dp.groups if dp.grouped else len(units)
    if num_units == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    model = HybridTwoTower(config)
    total: StateDict = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in base_state.items()}
    sampled = 0
    clipped = 0
    for unit, members in sorted(units.items()):
        # Each unit's randomness depends on its own id only, so adding or removing one
        # user leaves every other unit's clipped delta exactly as it was.
        unit_seed = _unit_seed(seed, unit)
        if dp.sampling_rate < 1.0:
            coin = torch.Generator().manual_seed(unit_seed ^ 0x5EED)
            if float(torch.rand((), generator=coin)) >= dp.sampling_rate:
                continue
        examples = make_examples((sequences[u] for u in members), config.max_history)
        if len(examples) == 0:
            continue
        sampled += 1
        model.load_state_dict(base_state)
        unit_cfg = TrainConfig(
            epochs=train_config.epochs,
            lr=train_config.lr,
            batch_size=train_config.batch_size,
            num_negatives=train_config.num_negatives,
            seed=unit_seed,
            max_steps=train_config.max_steps,
        )
        train_local(model, features, examples, unit_cfg)
        delta = {k: v.detach() - base_state[k] for k, v in model.state_dict().items()}
        if l2_norm(delta) > dp.clip_norm:
            clipped += 1
        for k, v in clip_by_global_norm(delta, dp.clip_norm).items():
            total[k].add_(v.to(torch.float64))
    if sampled == 0:
        return None
    std = noise_stddev(dp.noise_multiplier, dp.clip_norm, grouped=dp.grouped)
    noisy = add_gaussian_noise(total, std, g)
    denominator = dp.sampling_rate * num_units
    mean = {k: (v / denominator).to(base_state[k].dtype) for k, v in noisy.items()}
    return DPUpdate(
        delta=mean,
        num_units=num_units,
        sampled_units=sampled,
        clipped_fraction=clipped / sampled,
        noise_stddev=std,
    )
