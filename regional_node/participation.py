"""The node's round loop: follow the active model, train on open rounds, push deltas.

Training runs in a separate worker process (one at a time), so the serving
process's event loop and GIL stay free for `/v1/recommend`. Failures to reach
the coordinator never take serving down: the node keeps its last model and
retries with exponential backoff plus jitter.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from regional_node.client import CoordinatorClient, CoordinatorError, Weights
from regional_node.insights import compute_report
from regional_node.privacy_budget import PrivacyAccountant
from regional_node.recommender import ServingModel, build_serving_model
from regional_node.secagg_agent import SecAggAborted, SecureAggregationAgent
from regional_node.settings import NodeSettings
from regional_node.store import EventStore
from regional_node.trainer import TrainJob, TrainOutcome, run_train_job
from shared.dp_training import DPConfig
from shared.insights_schemas import RegionReport
from shared.model import ModelConfig
from shared.schemas import CatalogOut
from shared.secagg import SECAGG_ENCODING
from shared.serialization import bytes_to_state, sha256_hex
from shared.training import TrainConfig

log = logging.getLogger("fedjewel.node")


@dataclass
class NodeRuntime:
    """Mutable node state shared by the loop and the endpoints (swapped atomically)."""

    serving: ServingModel | None = None
    catalog: CatalogOut | None = None
    catalog_etag: str | None = None
    weights: Weights | None = None
    coordinator_reachable: bool = False
    last_error: str | None = None
    training: bool = False
    consecutive_failures: int = 0
    next_retry_seconds: float | None = None
    rounds_joined: set[int] = field(default_factory=set)
    last_round_joined: int | None = None
    dp_epsilon: float | None = None
    dp_releases: int = 0
    training_refused: str | None = None
    insights_pushed_at: datetime | None = None
    update_residual: bytes | None = None  # error feedback of lossy update encodings


def backoff_seconds(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**failures))."""
    return rng.uniform(0, min(cap, base * (2 ** min(failures, 30))))


class Participant:
    def __init__(self, settings: NodeSettings, store: EventStore, runtime: NodeRuntime) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        assert settings.coordinator_url is not None
        self.client = CoordinatorClient(settings.coordinator_url, settings.token)
        self._pool: ProcessPoolExecutor | None = None
        self._rng = random.Random()
        self.accountant = (
            PrivacyAccountant(store, settings.dp_delta) if settings.dp_enabled else None
        )
        self.secagg = (
            SecureAggregationAgent(
                self.client,
                settings.id,
                wait_seconds=settings.secagg_wait_seconds,
                poll_seconds=min(settings.poll_seconds, 1.0),
            )
            if settings.secure_aggregation
            else None
        )
        self._insights_due = 0.0  # monotonic time of the next push
        self._catalog_cache: tuple[CatalogOut, bytes] | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
        return self._pool

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_forever(self) -> None:
        rt = self.runtime
        rt.rounds_joined = await asyncio.to_thread(self.store.joined_rounds)
        rt.last_round_joined = max(rt.rounds_joined) if rt.rounds_joined else None
        await self._refresh_privacy_status()
        while True:
            try:
                await self.step()
                rt.coordinator_reachable = True
                rt.last_error = None
                rt.consecutive_failures = 0
                rt.next_retry_seconds = None
                delay = self.settings.poll_seconds
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                rt.consecutive_failures += 1
                unreachable = isinstance(exc, httpx.TransportError)
                if unreachable:
                    rt.coordinator_reachable = False
                rt.last_error = f"{type(exc).__name__}: {exc}"[:500]
                delay = backoff_seconds(
                    rt.consecutive_failures,
                    self.settings.poll_seconds,
                    self.settings.backoff_max_seconds,
                    self._rng,
                )
                rt.next_retry_seconds = delay
                log.warning(
                    "round loop failed (%s); retrying in %.1fs",
                    rt.last_error,
                    delay,
                    extra={"node_id": self.settings.id},
                )
            await asyncio.sleep(delay)

    async def step(self) -> None:
        """One pass: sync catalog and active model, then train if a round needs us."""
        await self.sync_model()
        if self.secagg is not None:
            await self.secagg.answer_reveals()
        if self.settings.insights_enabled and time.monotonic() >= self._insights_due:
            await self.push_insights()
        rnd = await self.client.current_round()
        if rnd is None or rnd.state != "open" or rnd.round_id in self.runtime.rounds_joined:
            return
        if self.settings.id in rnd.participants:
            self._mark_joined(rnd.round_id)
            return
        encoding = self.settings.update_encoding
        if encoding not in rnd.supported_encodings:
            log.warning("coordinator does not take %s updates; sending dense", encoding)
            encoding = "dense"
        await self.train_and_submit(rnd.round_id, rnd.base_version, encoding)

    def _mark_joined(self, round_id: int) -> None:
        self.runtime.rounds_joined.add(round_id)
        last = self.runtime.last_round_joined
        self.runtime.last_round_joined = round_id if last is None else max(last, round_id)

    async def sync_catalog(self) -> CatalogOut | None:
        catalog, etag = await self.client.catalog(self.runtime.catalog_etag)
        if catalog is not None:
            self.runtime.catalog = catalog
            self.runtime.catalog_etag = etag
        return self.runtime.catalog

    async def sync_model(self) -> None:
        """Serve the coordinator's active version (or the newest catalog) as soon as it exists."""
        catalog_before = self.runtime.catalog
        catalog = await self.sync_catalog()
        active = await self.client.active_model()
        if active is None or catalog is None:
            return
        serving = self.runtime.serving
        if serving is not None and serving.version == active.version and catalog is catalog_before:
            return
        weights = await self.client.weights(active.version, self.runtime.weights)
        config = ModelConfig.model_validate(active.config)
        new_serving = await asyncio.to_thread(
            build_serving_model,
            active.version,
            weights.sha256,
            config,
            bytes_to_state(weights.data),
            catalog.items,
            catalog.inactive_item_ids,
        )
        self.runtime.weights = weights
        self.runtime.serving = new_serving  # atomic reference swap
        log.info(
            "serving model version %s", active.version, extra={"model_version": active.version}
        )

    async def _catalog_blob(self, catalog: CatalogOut) -> bytes:
        """The catalog as the worker needs it, pickled once per catalog (off the event loop).

        Handing the worker a 50k-item list of dicts would be pickled again for every
        job in the serving process, holding the GIL for a good part of a second.
        """
        cached = self._catalog_cache
        if cached is not None and cached[0] is catalog:
            return cached[1]
        blob = await asyncio.to_thread(
            lambda: pickle.dumps([item.model_dump() for item in catalog.items], protocol=5)
        )
        self._catalog_cache = (catalog, blob)
        return blob

    async def train_and_submit(
        self, round_id: int, base_version: int, encoding: str = "dense"
    ) -> None:
        catalog = self.runtime.catalog
        if catalog is None:
            return
        meta = await self.client.model(base_version)
        base = await self.client.weights(base_version, self.runtime.weights)
        if self.runtime.weights is None or self.runtime.weights.version != base_version:
            self.runtime.weights = base
        s = self.settings
        if self.secagg is not None or s.dp_enabled:
            # Masking and DP noise work on the dense delta; lossy encodings would break them.
            encoding = "dense"
        job = TrainJob(
            database_url=s.database_url,
            catalog=await self._catalog_blob(catalog),
            base_weights=base.data,
            model_config=meta.config,
            train_config=TrainConfig(
                epochs=s.local_epochs,
                lr=s.dp_learning_rate if s.dp_enabled else s.learning_rate,
                batch_size=s.batch_size,
                num_negatives=s.num_negatives,
                fedprox_mu=s.fedprox_mu,
                seed=round_id,
                optimizer=s.dp_optimizer if s.dp_enabled else "adam",
            ),
            holdout_eval=s.holdout_eval,
            min_users_for_metrics=s.min_users_for_metrics,
            threads=s.train_threads,
            dp=self._dp_config(),
            dp_unit_key=os.urandom(32),
            nice=s.train_nice,
            encoding=encoding,
            topk_fraction=s.update_topk_fraction,
            residual=self.runtime.update_residual if encoding != "dense" else None,
        )
        if not await self._within_budget(round_id):
            return
        if self.secagg is not None:
            await self.secagg.join(round_id)  # before training, so the cohort can seal
        self.runtime.training = True
        log.info(
            "training round %s on version %s",
            round_id,
            base_version,
            extra={"round_id": round_id, "node_id": s.id},
        )
        try:
            loop = asyncio.get_running_loop()
            outcome: TrainOutcome | None = await loop.run_in_executor(
                self._executor(), run_train_job, job
            )
        finally:
            self.runtime.training = False
        if outcome is None:
            log.info("no training examples yet; skipping round %s", round_id)
            return
        metrics = dict(outcome.metrics)
        if self.accountant is not None:
            await asyncio.to_thread(
                self.accountant.record, round_id, s.dp_noise_multiplier, s.dp_sampling_rate
            )
            await self._refresh_privacy_status()
            assert self.runtime.dp_epsilon is not None
            metrics["dp_epsilon"] = self.runtime.dp_epsilon
        payload, sha, encoding = outcome.delta, outcome.sha256, outcome.encoding
        if self.secagg is not None:
            try:
                payload = await self.secagg.mask(round_id, outcome.delta, outcome.num_examples)
            except SecAggAborted as exc:
                log.warning("skipping round %s: %s", round_id, exc)
                self.secagg.forget(round_id)
                self._mark_joined(round_id)
                return
            sha, encoding = sha256_hex(payload), SECAGG_ENCODING
        try:
            receipt = await self.client.submit_update(
                round_id,
                base_version=base_version,
                num_examples=outcome.num_examples,
                payload=payload,
                sha256=sha,
                metrics=metrics,
                encoding=encoding,
            )
        except CoordinatorError as exc:
            if exc.status_code == 409:
                # The round moved on (closed or rebased) or we already counted: do not retry it.
                log.info("round %s refused our update: %s", round_id, exc.detail)
                self._mark_joined(round_id)
                return
            raise
        self.runtime.update_residual = outcome.residual
        await asyncio.to_thread(
            self.store.record_participation,
            round_id,
            base_version,
            receipt.sha256,
            receipt.num_examples,
        )
        self._mark_joined(round_id)
        self._insights_due = 0.0  # refresh the regional report with the round
        log.info(
            "submitted update to round %s (%d examples)",
            round_id,
            outcome.num_examples,
            extra={"round_id": round_id, "node_id": s.id},
        )

    # Privacy (docs/privacy.md) ------------------------------------------------------------

    def _dp_config(self) -> DPConfig | None:
        s = self.settings
        if not s.dp_enabled:
            return None
        return DPConfig(
            clip_norm=s.dp_clip_norm,
            noise_multiplier=s.dp_noise_multiplier,
            groups=s.dp_groups,
            sampling_rate=s.dp_sampling_rate,
            server_lr=s.dp_server_lr,
        )

    async def _refresh_privacy_status(self) -> None:
        if self.accountant is None:
            return
        releases = await asyncio.to_thread(self.accountant.releases)
        self.runtime.dp_releases = len(releases)
        self.runtime.dp_epsilon = await asyncio.to_thread(self.accountant.spent)

    async def _within_budget(self, round_id: int) -> bool:
        """Refuse to train when one more noisy release would exceed the epsilon budget."""
        s = self.settings
        if self.accountant is None:
            return True
        if await asyncio.to_thread(self.accountant.released, round_id):
            # A noisy update for this round already left (its receipt may have been lost):
            # a second, differently noised one would be a second release. Skip the round.
            log.warning("round %s already has a DP release; not training it again", round_id)
            self._mark_joined(round_id)
            return False
        if s.dp_noise_multiplier <= 0:
            self.runtime.training_refused = "NODE_DP_NOISE_MULTIPLIER is 0: no privacy guarantee"
        else:
            after = await asyncio.to_thread(
                self.accountant.after_one_more, s.dp_noise_multiplier, s.dp_sampling_rate
            )
            if after <= s.dp_epsilon_budget:
                self.runtime.training_refused = None
                return True
            self.runtime.training_refused = (
                f"privacy budget exhausted: one more round would spend epsilon {after:.3f} > "
                f"budget {s.dp_epsilon_budget} (delta {s.dp_delta})"
            )
        log.warning("not training round %s: %s", round_id, self.runtime.training_refused)
        self._mark_joined(round_id)
        return False

    def _report(self) -> RegionReport | None:
        catalog = self.runtime.catalog
        if catalog is None:
            return None
        s = self.settings
        return compute_report(
            ((u, i, k, t) for u, i, k, t, _c in self.store.iter_events()),
            catalog.items,
            region=s.region,
            weeks=s.insights_weeks,
            min_users=s.insights_min_users,
            noise_scale=s.insights_noise_scale,
        )

    async def push_insights(self) -> None:
        """Compute the regional report here and push only the aggregate to the coordinator."""
        report = await asyncio.to_thread(self._report)
        if report is None:
            return
        self._insights_due = time.monotonic() + self.settings.insights_interval_seconds
        try:
            await self.client.push_insights(self.settings.id, report)
        except CoordinatorError as exc:
            # Insights are best effort: a refusal must not stop training or serving.
            log.warning("insights push refused: %s", exc)
            return
        self.runtime.insights_pushed_at = datetime.now(UTC)
