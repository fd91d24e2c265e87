"""Local training for one round. Pure computation, no HTTP; runs in a worker process.

The worker reads the node's events straight from the node's database, so no
event ever passes through the serving process's memory or the network.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from coordinator.aggregation import compute_delta
from regional_node.store import EventStore
from shared.compression import encode_with_feedback
from shared.dp_sgd import DPSGDConfig, dp_sgd_update
from shared.dp_training import DPConfig, dp_fedavg_update
from shared.features import ItemFeatures, build_item_features
from shared.metrics import summarize_ranks
from shared.model import HybridTwoTower, ModelConfig, blend_states
from shared.schemas import CatalogItem
from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes
from shared.training import (
    TrainConfig,
    UserSequence,
    build_sequences,
    make_examples,
    rank_held_out,
    select_fine_tune_epochs,
    split_leave_last_out,
    train_soup,
)


@dataclass(frozen=True)
class TrainJob:
    database_url: str
    catalog: list[dict[str, Any]] | bytes  # CatalogItem dumps in row order (or pickled)
    base_weights: bytes
    model_config: dict[str, Any]
    train_config: TrainConfig
    holdout_eval: bool
    min_users_for_metrics: int
    threads: int = 1
    # DP-FedAvg or node-side DP-SGD (docs/privacy.md); None = plain training
    dp: DPConfig | DPSGDConfig | None = None
    dp_unit_key: bytes = b""
    nice: int = 0  # the worker's CPU niceness: serving comes first
    encoding: str = "dense"
    topk_fraction: float = 0.01
    residual: bytes | None = None  # error feedback carried from the previous round
    keep_local: bool = False  # also return the trained weights (served when personalizing)
    # Stops with FineTuneStopped between steps once the node sets the worker's stop flag
    # (plain training only: the personalization fine-tune, never a round's update).
    preemptible: bool = False
    # Share of the base (global) weights blended into the returned local weights.
    personal_base_share: float = 0.0
    # Trainings from the base weights, seeded SOUP_SEED_STRIDE apart, whose mean is the
    # result (a model soup; the personalization fine-tune only).
    soup: int = 1
    # > 0: first pick the epochs (1 to this many) on a validation split of the region's
    # own events (select_fine_tune_epochs; the personalization fine-tune only). With no
    # user to hold out, train_config.epochs.
    select_up_to: int = 0


@dataclass(frozen=True)
class TrainOutcome:
    delta: bytes  # safetensors
    sha256: str
    num_examples: int
    metrics: dict[str, float]
    encoding: str = "dense"
    residual: bytes | None = None  # what a lossy encoding held back, for the next round
    local_state: bytes | None = None  # the trained weights (TrainJob.keep_local); stay here


def users_with_examples(sequences: dict[str, UserSequence]) -> int:
    """Users whose events yield at least one training example (two distinct items)."""
    return sum(1 for seq in sequences.values() if len(seq.items) >= 2)


class FineTuneStopped(Exception):
    """A preemptible job (`TrainJob.preemptible`) stopped because the node asked it to:
    a round opened that the worker should train for instead."""


# The worker's stop flag (a multiprocessing Event shared with the node), set by
# `init_worker` when the pool starts the process.
_STOP: Any = None


def init_worker(stop: Any) -> None:
    """Pool initializer: keep the node's stop flag for preemptible jobs."""
    global _STOP
    _STOP = stop


def _stop_if_asked(_step: int, _total: int, _loss: float) -> None:
    """A training-progress hook: raise `FineTuneStopped` once the node set the flag."""
    if _STOP is not None and _STOP.is_set():
        raise FineTuneStopped


def prepare_worker(threads: int, nice: int) -> None:
    """Run once in a fresh worker: imports are done by now; set threads and priority."""
    torch.set_num_threads(threads)
    if nice and os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def run_train_job(job: TrainJob) -> TrainOutcome | None:
    """Train from the base weights on this node's events; None when there is nothing to learn."""
    prepare_worker(job.threads, job.nice)  # again: the worker is reused
    config = ModelConfig.model_validate(job.model_config)
    dumps = pickle.loads(job.catalog) if isinstance(job.catalog, bytes) else job.catalog
    items = [CatalogItem.model_validate(d) for d in dumps]
    row_of = {item.item_id: i for i, item in enumerate(items)}
    features = build_item_features(items, config.content_buckets)
    store = EventStore(job.database_url)
    try:
        sequences = build_sequences(
            (
                (user, row_of[item], etype, ts, country)
                for user, item, etype, ts, country in store.iter_events()
                if item in row_of
            ),
            country_buckets=config.country_buckets,
        )
    finally:
        store.dispose()
    base_state = bytes_to_state(job.base_weights)
    model = HybridTwoTower(config)
    model.load_state_dict(base_state)

    if job.dp is not None:
        return _run_dp_job(job, config, base_state, features, sequences)
    metrics: dict[str, float] = {}
    train_seqs = sequences
    if job.holdout_eval:
        train_seqs, held_out = split_leave_last_out(sequences)
        if len(held_out) < job.min_users_for_metrics:
            # Too few users for a metric that may be sent: train on every item instead
            # of withholding each user's last one for nothing.
            train_seqs = sequences
        else:
            # How well the *global* model (before local training) predicts this region.
            ranks = rank_held_out(model, features, train_seqs, held_out)
            summary = summarize_ranks(ranks.values(), k=10)
            metrics["hr@10"] = float(summary["hr@10"])
            metrics["ndcg@10"] = float(summary["ndcg@10"])
            metrics["eval_users"] = float(summary["users"])
    examples = make_examples(train_seqs.values(), config.max_history)
    if len(examples) == 0:
        return None
    progress = _stop_if_asked if job.preemptible else None
    tune = job.train_config
    if job.select_up_to > 0:
        longest = replace(tune, epochs=job.select_up_to)
        best, curve = select_fine_tune_epochs(
            model, base_state, features, train_seqs, longest, job.personal_base_share, progress
        )
        if curve:  # else no user could be held out: the fixed length
            tune = replace(tune, epochs=best)
            metrics["fine_tune_epochs"] = float(best)
    new_state, result = train_soup(
        model, base_state, features, examples, tune, job.soup, progress=progress
    )
    if users_with_examples(train_seqs) >= job.min_users_for_metrics and math.isfinite(result.loss):
        metrics["train_loss"] = result.loss
    delta = compute_delta(new_state, base_state)
    residual: bytes | None = None
    if job.encoding == "dense":
        data = state_to_bytes(delta)
    else:
        previous = bytes_to_state(job.residual) if job.residual else None
        payload, new_residual = encode_with_feedback(
            delta, previous, job.encoding, topk_fraction=job.topk_fraction
        )
        data = state_to_bytes(payload)
        residual = state_to_bytes(new_residual)
    return TrainOutcome(
        delta=data,
        sha256=sha256_hex(data),
        num_examples=result.num_examples,
        metrics=metrics,
        encoding=job.encoding,
        residual=residual,
        local_state=(
            state_to_bytes(blend_states(new_state, base_state, job.personal_base_share))
            if job.keep_local
            else None
        ),
    )


def timed_train_job(job: TrainJob) -> tuple[TrainOutcome | None, float]:
    """`run_train_job` and the seconds it took inside the worker (the rest of a round's
    time is the node's and the coordinator's overhead)."""
    started = time.perf_counter()
    outcome = run_train_job(job)
    return outcome, time.perf_counter() - started


def _run_dp_job(
    job: TrainJob,
    config: ModelConfig,
    base_state: dict[str, torch.Tensor],
    features: ItemFeatures,
    sequences: dict[str, UserSequence],
) -> TrainOutcome | None:
    """DP-FedAvg or DP-SGD contribution. Sends no data-dependent metric: the accountant
    covers only the noisy delta, so held-out HR@10 and the loss stay in the region."""
    assert job.dp is not None
    if isinstance(job.dp, DPSGDConfig):
        update = dp_sgd_update(config, base_state, features, sequences, job.dp, key=job.dp_unit_key)
    else:
        update = dp_fedavg_update(
            config,
            base_state,
            features,
            sequences,
            job.train_config,
            job.dp,
            seed=job.train_config.seed,
            unit_key=job.dp_unit_key,
        )
    if update is None:
        return None
    data = state_to_bytes(update.delta)
    return TrainOutcome(
        delta=data,
        sha256=sha256_hex(data),
        num_examples=update.num_units,
        metrics={"dp_noise_multiplier": job.dp.noise_multiplier},
    )
