"""The node's round loop: follow the active model, train on open rounds, push deltas.

Training runs in a separate worker process (one at a time), so the serving
process's event loop and GIL stay free for `/v1/recommend`. Failures to reach
the coordinator never take serving down: the node keeps its last model and
retries with exponential backoff plus jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import multiprocessing
import os
import pickle
import random
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import httpx

from regional_node.client import CoordinatorClient, CoordinatorError, Weights
from regional_node.insights import compute_report
from regional_node.models import ServedSnapshot
from regional_node.privacy_budget import PrivacyAccountant
from regional_node.recommender import CatalogIndex, ServingModel, build_serving_model
from regional_node.secagg_agent import SecAggAborted, SecureAggregationAgent
from regional_node.settings import NodeSettings
from regional_node.store import EventStore
from regional_node.trainer import (
    FineTuneStopped,
    TrainJob,
    TrainOutcome,
    init_worker,
    prepare_worker,
    timed_train_job,
)
from shared.aio import wait_event
from shared.compression import default_topk_fraction
from shared.dp_sgd import DPSGDConfig
from shared.dp_training import DPConfig
from shared.insights_schemas import RegionReport
from shared.model import ModelConfig
from shared.schemas import CatalogOut, RoundOut
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
    # Open rounds this node left without an update (left out of the secure-aggregation
    # cohort, or its masking gave up): not retried, and not counted as joined.
    rounds_skipped: set[int] = field(default_factory=set)
    last_round_skipped: tuple[int, str] | None = None  # (round, why), for /v1/status
    dp_epsilon: float | None = None
    dp_releases: int = 0
    dp_steps: int = 0
    training_refused: str | None = None
    insights_pushed_at: datetime | None = None
    update_residual: bytes | None = None  # error feedback of lossy update encodings
    personalize_tried: tuple[int, str | None] | None = None  # (version, catalog etag)
    # (catalog, its active item ids in catalog order, the same as a set): for answers
    # before the first model.
    _active_ids: tuple[CatalogOut, list[str], frozenset[str]] | None = None

    def active_catalog_ids(self) -> tuple[list[str], frozenset[str]] | None:
        """The catalog's active item ids (list and set; computed once per catalog), or
        None before the node has a catalog."""
        catalog, cached = self.catalog, self._active_ids
        if catalog is None:
            return None
        if cached is None or cached[0] is not catalog:
            inactive = set(catalog.inactive_item_ids)
            ids = [i.item_id for i in catalog.items if i.item_id not in inactive]
            cached = self._active_ids = (catalog, ids, frozenset(ids))
        return cached[1], cached[2]


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
        self._mp = multiprocessing.get_context("spawn")  # the training worker's
        self._stop_flag = self._mp.Event()  # set: the worker stops a preemptible job
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
        self._catalog_cache: tuple[CatalogOut, bytes] | None = None
        self._serving_catalog: CatalogOut | None = None  # the catalog `serving` was built on
        self._catalog_index: CatalogIndex | None = None
        self._downloads: dict[int, asyncio.Task[Weights]] = {}
        self._round_seen: int | None = None  # newest open round seen (long-poll `after`)
        self._insights_refresh = asyncio.Event()
        self._insights_events: tuple[int | None, int] | None = None  # at the last report
        # (base version, fine-tuned weights) of the last round's training, to serve.
        self._personal_pending: tuple[int, bytes] | None = None
        # (round, events marker, catalog etag) of a training that found no example:
        # not rerun for the same round until events or a new catalog arrive.
        self._nothing_to_train: tuple[int, tuple[int | None, int], str | None] | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=self._mp,
                initializer=init_worker,
                initargs=(self._stop_flag,),
            )
        return self._pool

    def _warm_worker(self) -> None:
        """Start the training worker now, so the first round does not pay for its start-up
        (a spawned interpreter importing torch)."""
        s = self.settings
        future = self._executor().submit(prepare_worker, s.train_threads, s.train_nice)
        future.add_done_callback(lambda f: f.exception())  # a failure shows at the first job

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_forever(self) -> None:
        rt = self.runtime
        rt.rounds_joined = await asyncio.to_thread(self.store.joined_rounds)
        rt.last_round_joined = max(rt.rounds_joined) if rt.rounds_joined else None
        await self.restore_serving()
        await self._refresh_privacy_status()
        self._warm_worker()
        insights = (
            asyncio.create_task(self.run_insights_forever())
            if self.settings.insights_enabled
            else None
        )
        fresh: RoundOut | None = None
        try:
            while True:
                try:
                    await self.step(fresh)
                    rt.coordinator_reachable = True
                    rt.last_error = None
                    rt.consecutive_failures = 0
                    rt.next_retry_seconds = None
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
                    fresh = None
                    await asyncio.sleep(delay)
                    continue
                fresh = await self.wait_for_next_round(self.settings.poll_seconds)
        finally:
            if insights is not None:
                insights.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await insights

    async def wait_for_next_round(self, seconds: float) -> RoundOut | None:
        """Wait up to `seconds` for the next poll; returns at once with a newer open round.

        A long poll on the coordinator (`GET /v1/rounds/current?after=..&wait=..`): a
        node that has sent its update starts the next round as soon as it opens instead
        of at its next poll. Any failure here just falls back to sleeping; the next
        step reports it.
        """
        started = time.monotonic()
        seen = self._round_seen or 0
        try:
            # The coordinator waits at most 30 s per call; the rest is slept below.
            rnd = await self.client.current_round(after=seen, wait=min(seconds, 30.0))
        except (httpx.HTTPError, CoordinatorError):
            rnd = None
        if rnd is not None and rnd.round_id > seen:
            return rnd
        remaining = seconds - (time.monotonic() - started)
        if remaining > 0:  # an older coordinator answers at once: keep the poll interval
            await asyncio.sleep(remaining)
        return None

    def _wants(self, rnd: RoundOut | None) -> bool:
        rt = self.runtime
        return (
            rnd is not None
            and rnd.state == "open"
            and rnd.round_id not in rt.rounds_joined
            and rnd.round_id not in rt.rounds_skipped
        )

    async def step(self, fresh: RoundOut | None = None) -> None:
        """One pass: sync the catalog; train if a round needs us, while the serving model
        catches up with the active version beside it (never before it)."""
        if self.secagg is not None:
            await self.secagg.answer_reveals()
        await self.sync_catalog()
        rnd = fresh if fresh is not None else await self.client.current_round()
        if rnd is not None:
            self._round_seen = max(self._round_seen or 0, rnd.round_id)
        if rnd is None or not self._wants(rnd):
            await self.sync_serving()
            await self.personalize(round_open=rnd is not None and rnd.state == "open")
            return
        if self.settings.id in rnd.participants:
            self._mark_joined(rnd.round_id)
            await self.sync_serving()
            return
        encoding = self.settings.update_encoding
        if encoding not in rnd.supported_encodings:
            log.warning("coordinator does not take %s updates; sending dense", encoding)
            encoding = "dense"
        # Training starts as soon as the base weights are here; the serving model for the
        # new version is built in a thread of this process meanwhile (the worker trains in
        # its own process), and swapped in when ready.
        serving = asyncio.create_task(self.sync_serving())
        try:
            await self.train_and_submit(rnd.round_id, rnd.base_version, encoding, rnd.deadline)
        except asyncio.CancelledError:
            serving.cancel()
            raise
        except Exception:
            # The round failed; the serving model still catches up (its own error, if
            # any, is the next step's to report).
            with contextlib.suppress(Exception):
                await serving
            raise
        await serving
        # The round's own local model is served at once (no extra work); the node's own
        # fine-tune replaces it once no round is open (`personalize`).
        pending, self._personal_pending = self._personal_pending, None
        if pending is not None:
            await self._serve_personalized(*pending)

    def _skip_round(self, round_id: int, why: str) -> None:
        log.info("skipping round %s: %s", round_id, why)
        self.runtime.rounds_skipped.add(round_id)
        self.runtime.last_round_skipped = (round_id, why)
        if self.secagg is not None:
            self.secagg.forget(round_id)

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
        await self.sync_catalog()
        await self.sync_serving()

    async def sync_serving(self) -> None:
        """Rebuild the serving model when the active version or the catalog changed."""
        catalog = self.runtime.catalog
        active = await self.client.active_model()
        if active is None or catalog is None:
            return
        serving = self.runtime.serving
        if (
            serving is not None
            and serving.version == active.version
            and catalog is self._serving_catalog
        ):
            return
        weights = await self.weights(active.version)
        new_serving = await self._build_serving(
            active.version,
            weights.sha256,
            ModelConfig.model_validate(active.config),
            weights.data,
            catalog,
        )
        self._swap_in(new_serving, catalog, "")
        snapshot = ServedSnapshot(
            version=active.version,
            sha256=weights.sha256,
            config=ModelConfig.model_validate(active.config).model_dump_json(),
            weights=weights.data,
            catalog=catalog.model_dump_json().encode(),
            catalog_etag=self.runtime.catalog_etag,
            saved_at=datetime.now(UTC),
        )
        try:
            await asyncio.to_thread(self.store.save_snapshot, snapshot)
        except Exception:  # serving goes on; only a restart without the coordinator loses
            log.exception("could not store the served version for restarts")

    async def restore_serving(self) -> None:
        """Serve the version and catalog the node served before it stopped, until the
        coordinator answers (a restart during an outage would otherwise serve unfiltered
        popularity). The round loop then moves on from there as usual."""
        try:
            snapshot = await asyncio.to_thread(self.store.load_snapshot)
            if snapshot is None or self.runtime.serving is not None:
                return
            if sha256_hex(snapshot.weights) != snapshot.sha256:
                log.warning("stored served version %s fails its sha256: not used", snapshot.version)
                return
            catalog = CatalogOut.model_validate_json(snapshot.catalog)
            serving = await self._build_serving(
                snapshot.version,
                snapshot.sha256,
                ModelConfig.model_validate_json(snapshot.config),
                snapshot.weights,
                catalog,
            )
        except Exception:
            log.exception("could not restore the served version; waiting for the coordinator")
            return
        if self.runtime.serving is not None:  # the coordinator was quicker
            return
        self.runtime.catalog, self.runtime.catalog_etag = catalog, snapshot.catalog_etag
        self.runtime.weights = Weights(snapshot.version, snapshot.sha256, snapshot.weights)
        self._swap_in(serving, catalog, " as stored before the restart")

    def _swap_in(self, serving: ServingModel, catalog: CatalogOut, how: str) -> None:
        """Serve `serving`, built on `catalog`, from the next request on."""
        self._serving_catalog = catalog
        self._catalog_index = serving.catalog_index
        self.runtime.serving = serving  # atomic reference swap
        log.info(
            "serving model version %s%s",
            serving.version,
            how,
            extra={"model_version": serving.version},
        )

    async def _build_serving(
        self,
        version: int,
        sha256: str,
        config: ModelConfig,
        state: bytes,
        catalog: CatalogOut,
        *,
        personalized: bool = False,
    ) -> ServingModel:
        """A serving model for these weights (off the event loop), reusing the catalog's
        index when the catalog is the one the current serving model was built on."""
        s = self.settings
        return await asyncio.to_thread(
            build_serving_model,
            version,
            sha256,
            config,
            bytes_to_state(state),
            catalog.items,
            catalog.inactive_item_ids,
            self._catalog_index if catalog is self._serving_catalog else None,
            ivf_clusters=s.ivf_clusters if s.recommend_search == "ivf" else None,
            ivf_candidates=s.ivf_candidates,
            personalized=personalized,
        )

    async def _run_training(self, job: TrainJob) -> tuple[TrainOutcome | None, float]:
        """Run a job in the worker process, flagged as training in /v1/status meanwhile.
        -> (outcome, seconds the worker spent on it)"""
        self.runtime.training = True
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor(), timed_train_job, job)
        except BrokenProcessPool:
            # The worker died (killed for memory, a crash): the pool never recovers, so
            # the next try starts a fresh worker instead of failing for good.
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            self.runtime.training = False

    async def weights(self, version: int) -> Weights:
        """A version's weights: the last download when it is that version (versions are
        immutable), else one download shared by every caller asking at the same time."""
        cached = self.runtime.weights
        if cached is not None and cached.version == version:
            return cached
        task = self._downloads.get(version)
        if task is None:
            task = asyncio.create_task(self.client.weights(version, cached))
            self._downloads[version] = task
            task.add_done_callback(lambda _t: self._downloads.pop(version, None))
        weights = await asyncio.shield(task)
        self.runtime.weights = weights
        return weights

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
        self,
        round_id: int,
        base_version: int,
        encoding: str = "dense",
        round_deadline: datetime | None = None,
    ) -> None:
        catalog = self.runtime.catalog
        if catalog is None:
            return
        meta, base = await asyncio.gather(
            self.client.model(base_version), self.weights(base_version)
        )
        s = self.settings
        if self.secagg is not None or s.dp_enabled:
            # Masking and DP noise work on the dense delta; lossy encodings would break them.
            encoding = "dense"
        job = self._train_job(
            await self._catalog_blob(catalog),
            base.data,
            meta.config,
            seed=round_id,
            dp=self._dp_config(),
            encoding=encoding,
            residual=self.runtime.update_residual if encoding != "dense" else None,
            # Served until the node's own fine-tune has run (`personalize`); a DP node's
            # round model carries noise, so it waits for that job.
            keep_local=s.personalize and not s.dp_enabled,
            holdout_eval=s.holdout_eval,
        )
        if not await self._within_budget(round_id):
            return
        attempt = (
            round_id,
            await asyncio.to_thread(self.store.events_marker),
            self.runtime.catalog_etag,
        )
        if self._nothing_to_train == attempt:
            return  # the last try found no example: again once events or items arrive
        log.info(
            "training round %s on version %s",
            round_id,
            base_version,
            extra={"round_id": round_id, "node_id": s.id},
        )
        started = time.perf_counter()
        outcome, worker_seconds = await self._run_training(job)
        job_seconds = time.perf_counter() - started
        if outcome is None:
            # Not skipped: the round stays open until enough nodes sent, and this node
            # joins it once its events give an example.
            self._nothing_to_train = attempt
            log.info("no training examples yet; round %s waits for events", round_id)
            return
        metrics = dict(outcome.metrics)
        payload, sha, encoding = outcome.delta, outcome.sha256, outcome.encoding
        if self.secagg is not None:
            try:
                # After training: a key in the cohort promises an update, so a node
                # without examples never sits in a cohort the others wait on.
                await self.secagg.join(round_id)
            except CoordinatorError as exc:
                if exc.status_code != 409:
                    raise
                # Sealed without this node, or closed: the round goes on without it.
                self._skip_round(round_id, exc.detail)
                return
            try:
                payload = await self.secagg.mask(
                    round_id, outcome.delta, outcome.num_examples, round_deadline
                )
            except SecAggAborted as exc:
                self._skip_round(round_id, str(exc))
                return
            sha, encoding = sha256_hex(payload), SECAGG_ENCODING
        if self.accountant is not None:
            # Written before anything leaves the node, and only for what will be sent: a
            # masking that gave up released nothing and spends nothing.
            await asyncio.to_thread(
                self.accountant.record,
                round_id,
                s.dp_noise_multiplier,
                s.dp_sampling_rate,
                self._dp_steps(),
            )
            await self._refresh_privacy_status()
            assert self.runtime.dp_epsilon is not None
            metrics["dp_epsilon"] = self.runtime.dp_epsilon
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
        self._insights_refresh.set()  # refresh the regional report if events arrived
        if outcome.local_state is not None:
            # Served by `step` after the upload and after the serving model caught up
            # with this version, so it never delays the round and is never replaced
            # by the plain global version built beside the training.
            self._personal_pending = (base_version, outcome.local_state)
        log.info(
            "submitted update to round %s (%d examples; trained in %.2fs, %.2fs with the "
            "hand-over to the worker)",
            round_id,
            outcome.num_examples,
            worker_seconds,
            job_seconds,
            extra={"round_id": round_id, "node_id": s.id},
        )

    def _train_job(
        self,
        catalog: bytes,
        base_weights: bytes,
        model_config: dict[str, object],
        *,
        seed: int,
        dp: DPConfig | DPSGDConfig | None,
        encoding: str,
        keep_local: bool,
        holdout_eval: bool,
        residual: bytes | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        soup: int = 1,
        select_up_to: int = 0,
    ) -> TrainJob:
        s = self.settings
        return TrainJob(
            database_url=s.database_url,
            catalog=catalog,
            base_weights=base_weights,
            model_config=model_config,
            train_config=TrainConfig(
                epochs=epochs or s.local_epochs,
                lr=lr or (s.dp_learning_rate if dp is not None else s.learning_rate),
                batch_size=s.batch_size,
                num_negatives=s.num_negatives,
                fedprox_mu=s.fedprox_mu,
                seed=seed,
                optimizer=s.dp_optimizer if dp is not None else "adam",
            ),
            holdout_eval=holdout_eval,
            min_users_for_metrics=s.min_users_for_metrics,
            threads=s.train_threads,
            dp=dp,
            dp_unit_key=os.urandom(32),
            nice=s.train_nice,
            encoding=encoding,
            topk_fraction=s.update_topk_fraction or default_topk_fraction(encoding),
            residual=residual,
            keep_local=keep_local,
            personal_base_share=s.personalize_global_share,
            soup=soup,
            select_up_to=select_up_to,
        )

    # Personalization (docs/evaluation.md) -------------------------------------------------

    async def personalize(self, round_open: bool = False) -> None:
        """Fine-tune the served global version on this region's events, once per version
        (and catalog), with its own schedule: NODE_PERSONALIZE_EPOCHS (a DP node:
        NODE_DP_PERSONALIZE_EPOCHS) at NODE_PERSONALIZE_LEARNING_RATE, gentler than a
        round's training (docs/evaluation.md, item 5); the mean of NODE_PERSONALIZE_SOUP
        (NODE_DP_PERSONALIZE_SOUP) such fine-tunes; with NODE_PERSONALIZE_SELECT
        (NODE_DP_PERSONALIZE_SELECT) their length, up to NODE_PERSONALIZE_MAX_EPOCHS
        (NODE_DP_PERSONALIZE_MAX_EPOCHS), is picked on a validation split first.

        Right after a round the node serves that round's local model; this replaces it
        once no round is open (`round_open`: one is, and this node already sent its
        update), so a federation running rounds back to back keeps its round models and
        spends nothing on fine-tunes. A version served as published (one this node did
        not train on, or any version on a DP node, whose round model carries noise) is
        fine-tuned whenever no round wants the node. The job is preemptible: when a round
        opens that wants the node, the worker stops it between two steps and the round
        trains at once; the fine-tune is tried again at the next pause. The fine-tuned
        weights never leave the node.
        """
        rt, s = self.runtime, self.settings
        serving, weights, catalog = rt.serving, rt.weights, rt.catalog
        if not s.personalize or serving is None or weights is None or catalog is None:
            return
        if serving.fine_tuned or weights.version != serving.version:
            return
        if round_open and serving.personalized:
            return  # the round's own model serves until the rounds pause
        attempt = (serving.version, rt.catalog_etag)
        if rt.personalize_tried == attempt:
            return  # nothing to learn from yet, or it failed: wait for new data or a version
        rt.personalize_tried = attempt
        epochs, soup, select_up_to = self._fine_tune_recipe()
        job = self._train_job(
            await self._catalog_blob(catalog),
            weights.data,
            serving.model.config.model_dump(),
            seed=serving.version,
            dp=None,
            encoding="dense",
            keep_local=True,
            holdout_eval=False,  # nothing is reported: train on every event
            lr=s.personalize_learning_rate,
            epochs=epochs,
            soup=soup,
            select_up_to=select_up_to,
        )
        try:
            outcome, _seconds = await self._run_preemptible(replace(job, preemptible=True))
        except FineTuneStopped:
            rt.personalize_tried = None  # again at the next pause
            log.info(
                "fine-tune of version %s stopped: a round wants this node",
                serving.version,
                extra={"model_version": serving.version},
            )
            return
        if outcome is not None and outcome.local_state is not None:
            picked = outcome.metrics.get("fine_tune_epochs")
            if picked is not None:
                log.info(
                    "fine-tune of version %s: %d epochs, picked on this region's validation split",
                    serving.version,
                    int(picked),
                    extra={"model_version": serving.version},
                )
            await self._serve_personalized(serving.version, outcome.local_state, fine_tuned=True)

    def _fine_tune_recipe(self) -> tuple[int, int, int]:
        """The personalization fine-tune's (epochs, soup, select_up_to: the most epochs it
        may pick on a validation split, 0 to run its fixed length). A DP node's global
        model carries noise: its own data (which stays here) gets more passes, the mean of
        several fine-tunes (a model soup) evens out more of it, and how long to fine-tune
        is picked per region (docs/privacy.md, "A soup of fine-tunes")."""
        s = self.settings
        if s.dp_enabled:
            pick = s.dp_personalize_max_epochs if s.dp_personalize_select else 0
            return s.dp_personalize_epochs, s.dp_personalize_soup, pick
        pick = s.personalize_max_epochs if s.personalize_select else 0
        return s.personalize_epochs, s.personalize_soup, pick

    async def _run_preemptible(self, job: TrainJob) -> tuple[TrainOutcome | None, float]:
        """`_run_training`, stopped (FineTuneStopped) as soon as a round wants this node."""
        self._stop_flag.clear()
        training = asyncio.ensure_future(self._run_training(job))
        watch = asyncio.ensure_future(self._round_wanting_this_node())
        try:
            done, _pending = await asyncio.wait(
                {training, watch}, return_when=asyncio.FIRST_COMPLETED
            )
            if watch in done and watch.exception() is None:
                self._stop_flag.set()  # the worker stops between two steps
        except asyncio.CancelledError:
            self._stop_flag.set()  # the worker stops; nobody waits for its outcome
            training.cancel()
            raise
        finally:
            watch.cancel()
            try:
                await watch
            except asyncio.CancelledError:
                pass
            except Exception:  # the fine-tune just runs to its end unwatched
                log.warning("watching for a round during the fine-tune failed", exc_info=True)
        return await training

    async def _round_wanting_this_node(self) -> RoundOut:
        """The round loop's own poll (`wait_for_next_round`), until a round is open that
        this node has not joined. Leaves `_round_seen` alone, so the round loop's next
        poll finds the round at once. Seed reveals are answered meanwhile: a DP node
        fine-tunes while its secure round is still open, and a dropped peer's round
        waits for this node's reveal."""
        while True:
            if self.secagg is not None:
                try:
                    await self.secagg.answer_reveals()
                except (httpx.HTTPError, CoordinatorError) as exc:  # the watch goes on
                    log.warning("answering seed reveals failed: %s", exc)
            rnd = await self.wait_for_next_round(self.settings.poll_seconds)
            if rnd is not None and self._wants(rnd):
                return rnd

    async def _serve_personalized(
        self, version: int, local_state: bytes, *, fine_tuned: bool = False
    ) -> None:
        """Swap in the fine-tuned weights if `version` is still the one being served."""
        rt = self.runtime
        current, catalog = rt.serving, rt.catalog
        if current is None or catalog is None or current.version != version:
            return  # a newer global version arrived meanwhile
        new_serving = await self._build_serving(
            version,
            sha256_hex(local_state),
            current.model.config,
            local_state,
            catalog,
            personalized=True,
        )
        new_serving = replace(new_serving, fine_tuned=fine_tuned)
        if rt.serving is current:
            rt.serving = new_serving  # atomic reference swap
            log.info(
                "serving version %s fine-tuned on this region's events",
                version,
                extra={"model_version": version},
            )

    # Privacy (docs/privacy.md) ------------------------------------------------------------

    def _dp_steps(self) -> int:
        """Noisy releases (subsampled Gaussian mechanisms) one DP round makes."""
        s = self.settings
        return s.dp_sgd_steps if s.dp_algorithm == "dpsgd" else 1

    def _dp_config(self) -> DPConfig | DPSGDConfig | None:
        s = self.settings
        if not s.dp_enabled:
            return None
        if s.dp_algorithm == "dpsgd":
            return DPSGDConfig(
                clip_norm=s.dp_sgd_clip_norm,
                noise_multiplier=s.dp_noise_multiplier,
                sampling_rate=s.dp_sampling_rate,
                steps=s.dp_sgd_steps,
                lr=s.dp_sgd_learning_rate,
                optimizer=s.dp_sgd_optimizer,
                num_negatives=s.num_negatives,
                noise_share=1 / math.sqrt(s.dp_noise_nodes),
            )
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
        self.runtime.dp_steps = sum(steps for _z, _q, steps in releases)
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
                self.accountant.after_one_more,
                s.dp_noise_multiplier,
                s.dp_sampling_rate,
                self._dp_steps(),
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
            noise_secret=self._insights_secret,
        )

    @functools.cached_property
    def _insights_secret(self) -> bytes:
        """The key of the insights noise: made once, kept in the node's database, read
        once per process (not a database transaction per report)."""
        return self.store.secret("insights-noise")

    async def run_insights_forever(self) -> None:
        """Push the regional report every NODE_INSIGHTS_INTERVAL_SECONDS, and after a round
        when events arrived since the last report. Its own task: computing the report
        reads every event, and must never hold up a round."""
        s = self.settings
        while True:
            try:
                pushed = await self.push_insights()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # best effort: retried at the next poll
                log.warning("insights push failed: %s: %s", type(exc).__name__, exc)
                pushed = False
            timeout = s.insights_interval_seconds if pushed else s.poll_seconds
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                self._insights_refresh.clear()
                await wait_event(self._insights_refresh, remaining)
                if not self._insights_refresh.is_set():
                    break  # the interval is over
                newest = await asyncio.to_thread(self.store.events_marker)
                if newest != self._insights_events:
                    break  # a round ended and the report is out of date

    async def push_insights(self) -> bool:
        """Compute the regional report here and push only the aggregate to the coordinator."""
        newest = await asyncio.to_thread(self.store.events_marker)
        report = await asyncio.to_thread(self._report)
        if report is None:
            return False
        try:
            await self.client.push_insights(self.settings.id, report)
        except CoordinatorError as exc:
            # Insights are best effort: a refusal must not stop training or serving.
            log.warning("insights push refused: %s", exc)
            return True  # retried at the interval, not at every poll
        self._insights_events = newest
        self.runtime.insights_pushed_at = datetime.now(UTC)
        return True
