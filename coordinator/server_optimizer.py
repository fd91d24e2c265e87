"""The coordinator's server optimizer: FedAdam on the round's aggregate (optional).

With COORDINATOR_SERVER_OPTIMIZER=adam the round's aggregate delta `d` (whatever
COORDINATOR_AGGREGATION computed, or the secure sum) is not applied as it is: the
new version is `base + ServerAdam.step(d)` (Reddi et al. 2021, "Adaptive Federated
Optimization"; `shared.dp_training.ServerAdam`, the same step the DP experiment
measures). Its moments are stored per version (`ServerOptimizerState`), so a round
continues from its base version's moments, a restart loses nothing, and promoting
an older version rolls the moments back with the weights. It reads only the
aggregate, so with DP on the nodes it is post-processing: no privacy cost.

Its main use is DP-FedSGD (docs/privacy.md): nodes send one noisy mean gradient a
round (NODE_DP_ALGORITHM=dpsgd, NODE_DP_SGD_STEPS=1, NODE_DP_SGD_OPTIMIZER=sgd),
and Adam on the coordinator takes the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import torch
from sqlalchemy.orm import Session

from coordinator.models import ServerOptimizerState
from coordinator.settings import CoordinatorSettings
from shared.dp_training import ServerAdam
from shared.serialization import bytes_to_state, state_to_bytes

StateDict = dict[str, torch.Tensor]


def _fit(moment: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A stored moment resized to the tensor it belongs to: zeros for rows added since
    (the item table grows with the catalog), none when there is no moment yet."""
    if moment is None:
        return torch.zeros_like(like, dtype=torch.float32)
    if moment.shape == like.shape:
        return moment
    out = torch.zeros_like(like, dtype=torch.float32)
    rows = min(moment.shape[0], like.shape[0])
    out[:rows] = moment[:rows]
    return out


def load_adam(session: Session, settings: CoordinatorSettings, base_version: int) -> ServerAdam:
    adam = ServerAdam(lr=settings.server_lr, tau=settings.server_adam_tau)
    row = session.get(ServerOptimizerState, base_version)
    if row is not None and row.optimizer == "adam":
        stored = bytes_to_state(row.state)
        adam.m = {k[2:]: v for k, v in stored.items() if k.startswith("m.")}
        adam.v = {k[2:]: v for k, v in stored.items() if k.startswith("v.")}
    return adam


def server_step(
    session: Session,
    settings: CoordinatorSettings,
    base_version: int,
    base_state: Mapping[str, torch.Tensor],
    new_state: Mapping[str, torch.Tensor],
) -> tuple[StateDict, ServerAdam]:
    """The version the server optimizer makes of an aggregate `new_state` (= base + d)."""
    adam = load_adam(session, settings, base_version)
    delta = {
        k: (new_state[k].to(torch.float32) - base_state[k].to(torch.float32))
        for k in new_state
        if new_state[k].is_floating_point()
    }
    m, v = adam.m or {}, adam.v or {}
    adam.m = {k: _fit(m.get(k), d) for k, d in delta.items()}
    adam.v = {k: _fit(v.get(k), d) for k, d in delta.items()}
    step = adam.step(delta)
    out = {
        k: (base_state[k] + step[k].to(base_state[k].dtype)) if k in step else t
        for k, t in new_state.items()
    }
    return out, adam


def save_adam(session: Session, version: int, adam: ServerAdam, now: datetime) -> None:
    assert adam.m is not None and adam.v is not None
    tensors = {f"m.{k}": t.contiguous() for k, t in adam.m.items()}
    tensors |= {f"v.{k}": t.contiguous() for k, t in adam.v.items()}
    session.add(
        ServerOptimizerState(
            version=version, optimizer="adam", state=state_to_bytes(tensors), created_at=now
        )
    )
