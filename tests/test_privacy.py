"""Differential privacy: clipping, noise, the RDP accountant, DP-FedAvg units, the budget."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from regional_node.participation import NodeRuntime, Participant
from regional_node.privacy_budget import PrivacyAccountant
from regional_node.settings import NodeSettings
from regional_node.store import EventStore
from regional_node.trainer import TrainJob, run_train_job
from shared.dp_training import DPConfig, assign_units, dp_fedavg_update
from shared.features import build_item_features
from shared.model import ModelConfig, init_state
from shared.privacy import (
    add_gaussian_noise,
    clip_by_global_norm,
    dp_epsilon,
    epsilon_of_releases,
    l2_norm,
    noise_multiplier_for_epsilon,
    noise_stddev,
    rdp_gaussian,
)
from shared.schemas import CatalogItem, EventIn
from shared.serialization import bytes_to_state, state_to_bytes
from shared.training import SOUP_SEED_STRIDE, TrainConfig, UserSequence
from tests.conftest import tiny_catalog, tiny_events


def test_clip_scales_the_whole_update_to_the_clip_norm() -> None:
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # norm 5
    clipped = clip_by_global_norm(update, 1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([[0.8]]))
    assert l2_norm(clipped) == pytest.approx(1.0)
    small = clip_by_global_norm(update, 10.0)
    assert torch.equal(small["a"], update["a"]) and torch.equal(small["b"], update["b"])


def test_noise_stddev_is_multiplier_times_sensitivity() -> None:
    assert noise_stddev(1.5, 0.4, grouped=False) == pytest.approx(0.6)
    # A hashed bucket changes from one clipped vector to another: sensitivity 2C.
    assert noise_stddev(1.5, 0.4, grouped=True) == pytest.approx(1.2)


def test_gaussian_noise_has_the_requested_stddev() -> None:
    zeros = {"w": torch.zeros(200_000)}
    noisy = add_gaussian_noise(zeros, 2.0, torch.Generator().manual_seed(0))
    assert float(noisy["w"].std()) == pytest.approx(2.0, rel=0.01)
    assert abs(float(noisy["w"].mean())) < 0.02
    assert torch.equal(add_gaussian_noise(zeros, 0.0, torch.Generator())["w"], zeros["w"])


def test_rdp_matches_tensorflow_privacy_reference_values() -> None:
    # Values from TF Privacy's rdp_accountant tests (Mironov et al. 2019 bound).
    rdp = rdp_gaussian(noise_multiplier=2.5, sampling_rate=0.01, steps=50, orders=[5, 50, 100])
    assert rdp == pytest.approx([0.00218075, 0.023846, 167.416307], abs=1e-5)
    assert rdp_gaussian(noise_multiplier=2, sampling_rate=0.1, steps=10, orders=[5]) == (
        pytest.approx([0.07737], abs=1e-5)
    )
    # No subsampling: exactly steps * alpha / (2 sigma^2).
    assert rdp_gaussian(noise_multiplier=10, sampling_rate=1.0, steps=3, orders=[20, 2.5]) == (
        pytest.approx([0.3, 0.0375])
    )


def _exact_gaussian_delta(eps: float, sigma: float) -> float:
    """delta(eps) of the Gaussian mechanism with sensitivity 1 (Balle and Wang 2018)."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (2.0, 10), (5.0, 30)])
def test_accountant_is_a_tight_upper_bound_of_the_exact_gaussian(sigma: float, steps: int) -> None:
    delta = 1e-5
    eps = dp_epsilon(noise_multiplier=sigma, sampling_rate=1.0, steps=steps, delta=delta)
    # T Gaussian releases with multiplier sigma are one Gaussian with sigma / sqrt(T).
    effective = sigma / math.sqrt(steps)
    assert _exact_gaussian_delta(eps, effective) <= delta  # a valid guarantee
    assert _exact_gaussian_delta(eps * 0.8, effective) > delta  # and not loose by > 25%


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    e1 = dp_epsilon(noise_multiplier=1.0, sampling_rate=1.0, steps=1, delta=1e-5)
    e4 = dp_epsilon(noise_multiplier=1.0, sampling_rate=1.0, steps=4, delta=1e-5)
    e4_noisy = dp_epsilon(noise_multiplier=2.0, sampling_rate=1.0, steps=4, delta=1e-5)
    assert 0 < e1 < e4 and e4_noisy < e4
    assert dp_epsilon(noise_multiplier=1.0, sampling_rate=1.0, steps=0, delta=1e-5) == 0.0
    assert epsilon_of_releases([(1.0, 1.0)] * 4, 1e-5) == pytest.approx(e4)


def test_noise_multiplier_for_epsilon_hits_the_target() -> None:
    sigma = noise_multiplier_for_epsilon(epsilon=8.0, delta=1e-5, steps=10)
    assert dp_epsilon(noise_multiplier=sigma, sampling_rate=1.0, steps=10, delta=1e-5) <= 8.0
    assert dp_epsilon(noise_multiplier=sigma - 0.01, sampling_rate=1.0, steps=10, delta=1e-5) > 8
    assert noise_multiplier_for_epsilon(epsilon=math.inf, delta=1e-5, steps=10) == 0.0


def test_units_partition_users() -> None:
    users = [f"u{i}" for i in range(50)]
    per_user = assign_units(users, 0, b"k")
    assert sorted(per_user) == sorted(users) and all(per_user[u] == [u] for u in users)
    grouped = assign_units(users, 4, b"k")
    assert len(grouped) <= 4
    assert sorted(u for members in grouped.values() for u in members) == sorted(users)


def _setup(users: int = 6):  # type: ignore[no-untyped-def]
    catalog = [CatalogItem.model_validate(c) for c in tiny_catalog()]
    config = ModelConfig(num_items=len(catalog), embedding_dim=8, content_buckets=64)
    features = build_item_features(catalog, config.content_buckets)
    base = init_state(config)
    seqs = {
        f"u{u}": UserSequence(items=[u, u + 7, u + 13, u + 21], types=[1, 2, 1, 4], country=0)
        for u in range(users)
    }
    train = TrainConfig(epochs=1, lr=0.05, batch_size=8, num_negatives=16)
    return config, features, base, seqs, train


def test_one_user_moves_the_clipped_sum_by_at_most_the_clip_norm() -> None:
    config, features, base, seqs, train = _setup()
    dp = DPConfig(clip_norm=0.05, noise_multiplier=0.0)
    with_all = dp_fedavg_update(config, base, features, seqs, train, dp, seed=1, unit_key=b"k")
    without = {k: v for k, v in seqs.items() if k != "u3"}
    fewer = dp_fedavg_update(config, base, features, without, train, dp, seed=1, unit_key=b"k")
    assert with_all is not None and fewer is not None
    assert with_all.num_units == 6 and fewer.num_units == 5
    assert with_all.clipped_fraction == 1.0  # every unit's update was larger than 0.05
    sum_all = {k: v.double() * with_all.num_units for k, v in with_all.delta.items()}
    sum_less = {k: v.double() * fewer.num_units for k, v in fewer.delta.items()}
    diff = {k: sum_all[k] - sum_less[k] for k in sum_all}
    assert l2_norm(diff) <= 0.05 * (1 + 1e-4)
    assert l2_norm(with_all.delta) <= 0.05 + 1e-6  # mean of vectors of norm <= C


def test_noise_is_calibrated_to_the_clip_and_divided_by_units() -> None:
    config, features, base, seqs, train = _setup()
    dp = DPConfig(clip_norm=0.05, noise_multiplier=2.0)
    out = dp_fedavg_update(config, base, features, seqs, train, dp, seed=3, unit_key=b"k")
    quiet = dp_fedavg_update(
        config, base, features, seqs, train, DPConfig(0.05, 0.0), seed=3, unit_key=b"k"
    )
    assert out is not None and quiet is not None and out.noise_stddev == pytest.approx(0.1)
    noise = torch.cat([(out.delta[k] - quiet.delta[k]).flatten() for k in out.delta])
    # Per coordinate: N(0, (sigma * C)^2) / units.
    assert float(noise.std()) == pytest.approx(0.1 / 6, rel=0.05)


def _job(
    tmp_path: Path, min_users: int, dp: DPConfig | None = None, two_item_users: int = 0
) -> TrainJob:
    """A train job over a real node store of 12 users with >= 3 distinct items each, plus
    `two_item_users` users with exactly 2 (held out: 1 item left, no training example)."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    store = EventStore(url)
    store.migrate()
    events = tiny_events("t", users=40, material="gold", seed=1)
    distinct: dict[str, set[str]] = {}
    for e in events:
        distinct.setdefault(str(e["user_id"]), set()).add(str(e["item_id"]))
    rich = sorted(u for u, items in distinct.items() if len(items) >= 3)[:12]
    assert len(rich) == 12
    chosen = [e for e in events if e["user_id"] in rich]
    for u in range(two_item_users):
        for i, item in enumerate(("I001", "I002")):
            chosen.append(
                {
                    "user_id": f"t-two-{u}",
                    "item_id": item,
                    "event_type": "view",
                    "timestamp": f"2026-10-0{i + 1}T10:00:00+00:00",
                    "country": "DE",
                }
            )
    store.add_events([EventIn.model_validate(e) for e in chosen])
    store.dispose()
    catalog = tiny_catalog()
    config = ModelConfig(num_items=len(catalog), embedding_dim=8, content_buckets=64)
    return TrainJob(
        database_url=url,
        catalog=catalog,
        base_weights=state_to_bytes(init_state(config)),
        model_config=config.model_dump(),
        train_config=TrainConfig(epochs=1, batch_size=32, num_negatives=16),
        holdout_eval=True,
        min_users_for_metrics=min_users,
        dp=dp,
        dp_unit_key=b"key",
    )


@pytest.mark.parametrize(("min_users", "sent"), [(10, True), (13, False)])
def test_metrics_from_fewer_users_than_the_threshold_are_not_sent(
    tmp_path: Path, min_users: int, sent: bool
) -> None:
    outcome = run_train_job(_job(tmp_path, min_users))
    assert outcome is not None and outcome.num_examples > 0
    if sent:
        assert outcome.metrics["eval_users"] == 12 and "hr@10" in outcome.metrics
        assert "train_loss" in outcome.metrics
    else:
        assert outcome.metrics == {}


def test_each_metric_counts_the_users_it_was_computed_from(tmp_path: Path) -> None:
    # 17 users are held out (12 + 5), but only 12 contribute training examples.
    outcome = run_train_job(_job(tmp_path, 15, two_item_users=5))
    assert outcome is not None
    assert outcome.metrics["eval_users"] == 17 and "hr@10" in outcome.metrics
    assert "train_loss" not in outcome.metrics


def test_dp_job_sends_only_data_independent_metrics(tmp_path: Path) -> None:
    outcome = run_train_job(_job(tmp_path, 1, DPConfig(clip_norm=0.1, noise_multiplier=1.0)))
    assert outcome is not None
    assert outcome.num_examples == 12  # units (users), not examples
    assert outcome.metrics == {"dp_noise_multiplier": 1.0}


def test_accountant_refuses_past_the_budget(tmp_path: Path) -> None:
    store = EventStore(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.migrate()
    acc = PrivacyAccountant(store, delta=1e-5)
    assert acc.spent() == 0.0
    budget = 8.0
    rounds = 0
    while acc.after_one_more(2.0, 1.0) <= budget:
        acc.record(rounds + 1, 2.0, 1.0)
        rounds += 1
    assert acc.spent() <= budget < acc.after_one_more(2.0, 1.0)
    assert rounds == max(
        t
        for t in range(1, 100)
        if dp_epsilon(noise_multiplier=2.0, sampling_rate=1.0, steps=t, delta=1e-5) <= budget
    )
    acc.record(1, 2.0, 1.0)  # recording a round twice charges it once
    assert len(acc.releases()) == rounds
    store.dispose()


@pytest.mark.parametrize("share", [0.0, 0.2, 1.0])
def test_personalized_weights_blend_the_fine_tuned_and_the_global_ones(
    tmp_path: Path, share: float
) -> None:
    job = dataclasses.replace(_job(tmp_path, 1), keep_local=True, personal_base_share=share)
    outcome = run_train_job(job)
    assert outcome is not None and outcome.local_state is not None
    base = bytes_to_state(job.base_weights)
    tuned = {k: base[k] + d for k, d in bytes_to_state(outcome.delta).items()}
    served = bytes_to_state(outcome.local_state)
    for name, b in base.items():
        expected = (1 - share) * tuned[name] + share * b
        assert torch.allclose(served[name], expected, atol=1e-6), name
    # The fine-tune moved the weights, so the share visibly matters.
    assert any(not torch.equal(tuned[k], base[k]) for k in base)


def _node_settings(tmp_path: Path, **overrides: object) -> NodeSettings:
    """A node's settings with its own database and an unreachable coordinator."""
    return NodeSettings(
        database_url=f"sqlite:///{tmp_path / 'n.db'}",
        coordinator_url="http://127.0.0.1:9",
        allow_anonymous=True,
        **overrides,  # type: ignore[arg-type]
    )


def test_node_setting_reaches_the_train_job(tmp_path: Path) -> None:
    """NODE_PERSONALIZE_GLOBAL_SHARE is what the node's train jobs blend with."""
    settings = _node_settings(tmp_path, personalize_global_share=0.35)
    store = EventStore(settings.database_url)
    try:
        participant = Participant(settings, store, NodeRuntime())
        job = participant._train_job(
            b"",
            b"",
            {},
            seed=1,
            dp=None,
            encoding="dense",
            keep_local=True,
            holdout_eval=False,
        )
        assert job.personal_base_share == 0.35 and job.keep_local
    finally:
        store.dispose()


def _personalize_jobs(
    tmp_path: Path, serving: dict[str, object], round_open: bool = False, **settings: object
) -> list[TrainJob]:
    """The train jobs one `Participant.personalize()` starts, with version 4 served."""
    import asyncio
    from types import SimpleNamespace

    from shared.schemas import CatalogOut

    node = _node_settings(tmp_path, **settings)
    store = EventStore(node.database_url)
    jobs: list[TrainJob] = []
    try:
        runtime = NodeRuntime()
        config = ModelConfig(num_items=3)
        runtime.serving = SimpleNamespace(  # type: ignore[assignment]
            version=4, model=SimpleNamespace(config=config), **serving
        )
        runtime.weights = SimpleNamespace(version=4, data=b"weights")  # type: ignore[assignment]
        runtime.catalog = CatalogOut(catalog_version=1, items=tiny_catalog()[:3])
        participant = Participant(node, store, runtime)

        async def captured(job: TrainJob) -> tuple[None, float]:
            jobs.append(job)
            return None, 0.0

        participant._run_training = captured  # type: ignore[method-assign]
        asyncio.run(participant.personalize(round_open=round_open))
    finally:
        store.dispose()
    return jobs


@pytest.mark.parametrize("dp_enabled", [False, True])
def test_a_dp_node_personalizes_with_its_dp_epochs(tmp_path: Path, dp_enabled: bool) -> None:
    """The fine-tune of the served version runs NODE_DP_PERSONALIZE_EPOCHS and averages
    NODE_DP_PERSONALIZE_SOUP fine-tunes on a DP node (its global model carries noise),
    NODE_PERSONALIZE_EPOCHS and NODE_PERSONALIZE_SOUP otherwise, both at
    NODE_PERSONALIZE_LEARNING_RATE (not the rounds' epochs and rate); the job trains
    without DP (nothing of it leaves the node) and keeps the weights to serve."""
    [job] = _personalize_jobs(
        tmp_path,
        {"personalized": False, "fine_tuned": False},
        local_epochs=2,
        learning_rate=0.01,
        personalize_epochs=3,
        personalize_learning_rate=0.004,
        dp_enabled=dp_enabled,
        dp_personalize_epochs=7,
        personalize_soup=2,
        dp_personalize_soup=4,
        personalize_select=True,
        personalize_max_epochs=9,
        dp_personalize_select=False,
        dp_personalize_max_epochs=11,
    )
    assert job.train_config.epochs == (7 if dp_enabled else 3)
    assert job.soup == (4 if dp_enabled else 2)
    assert job.select_up_to == (0 if dp_enabled else 9)  # 0: the fixed length
    assert job.train_config.lr == 0.004 and job.train_config.optimizer == "adam"
    assert job.dp is None and job.keep_local and job.base_weights == b"weights"


def test_a_dp_node_picks_its_fine_tune_s_length_by_default(tmp_path: Path) -> None:
    [job] = _personalize_jobs(
        tmp_path, {"personalized": False, "fine_tuned": False}, dp_enabled=True
    )
    assert job.select_up_to == 20 and job.train_config.epochs == 10 and job.soup == 3


@pytest.mark.parametrize(
    ("personalized", "fine_tuned", "round_open", "jobs"),
    [
        (True, False, False, 1),  # the round's model, rounds paused: fine-tune it
        (True, True, False, 0),  # already its own fine-tune
        (True, False, True, 0),  # a round is open: the round's model serves meanwhile
        (False, False, True, 1),  # served as published (a DP node, a version it skipped)
    ],
)
def test_the_round_model_a_node_serves_is_replaced_by_its_own_fine_tune(
    tmp_path: Path, personalized: bool, fine_tuned: bool, round_open: bool, jobs: int
) -> None:
    """Right after a round a node serves the round's local model (personalized, not its
    own fine-tune); once no round is open its fine-tune job replaces it, once per
    version. A version served as published is fine-tuned whenever no round wants the
    node. Either job is preemptible."""
    started = _personalize_jobs(
        tmp_path, {"personalized": personalized, "fine_tuned": fine_tuned}, round_open
    )
    assert len(started) == jobs
    assert all(job.preemptible and job.keep_local for job in started)


def test_a_soup_job_keeps_the_mean_of_fine_tunes_seeded_apart(tmp_path: Path) -> None:
    """TrainJob.soup: the kept (served) weights are the blend of the mean of that many
    trainings from the base, seeded SOUP_SEED_STRIDE apart."""
    job = dataclasses.replace(_job(tmp_path, 1), keep_local=True, personal_base_share=0.25)
    singles = []
    first = job.train_config.seed
    for seed in (first, first + SOUP_SEED_STRIDE):
        config = dataclasses.replace(job.train_config, seed=seed)
        outcome = run_train_job(dataclasses.replace(job, train_config=config, soup=1))
        assert outcome is not None and outcome.local_state is not None
        singles.append(bytes_to_state(outcome.local_state))  # 0.75 x trained + 0.25 x base
    assert not torch.equal(singles[0]["item_id.weight"], singles[1]["item_id.weight"])
    soup = run_train_job(dataclasses.replace(job, soup=2))
    assert soup is not None and soup.local_state is not None
    kept = bytes_to_state(soup.local_state)
    for name, value in kept.items():
        if value.is_floating_point():  # blending is linear: the mean of the blends
            assert torch.allclose(value, (singles[0][name] + singles[1][name]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="soup"):
        run_train_job(dataclasses.replace(job, soup=0))


def test_a_job_that_selects_its_epochs_trains_as_long_as_it_picked(tmp_path: Path) -> None:
    """TrainJob.select_up_to: the validation split picks 1 to that many epochs; the kept
    weights are then a plain fine-tune of that many epochs on every event."""
    job = dataclasses.replace(
        _job(tmp_path, 1),
        holdout_eval=False,
        keep_local=True,
        personal_base_share=0.2,
        train_config=TrainConfig(epochs=4, batch_size=32, num_negatives=16, lr=0.05),
    )
    picked = run_train_job(dataclasses.replace(job, select_up_to=4))
    assert picked is not None and picked.local_state is not None
    epochs = int(picked.metrics["fine_tune_epochs"])
    assert 1 <= epochs <= 4
    fixed = run_train_job(
        dataclasses.replace(job, train_config=dataclasses.replace(job.train_config, epochs=epochs))
    )
    assert fixed is not None and fixed.local_state is not None
    assert "fine_tune_epochs" not in fixed.metrics
    kept, plain = bytes_to_state(picked.local_state), bytes_to_state(fixed.local_state)
    assert all(torch.equal(kept[k], plain[k]) for k in kept)


def test_with_no_user_to_hold_out_a_job_that_selects_runs_its_fixed_length(
    tmp_path: Path,
) -> None:
    """Every user has two items: holding out the last leaves nothing to fine-tune on. The
    pick once fell back to its longest length (the most aggressive) and was logged as a
    pick; now the job runs train_config.epochs and reports no pick."""
    url = f"sqlite:///{tmp_path / 'two.db'}"
    store = EventStore(url)
    store.migrate()
    store.add_events(
        [
            EventIn.model_validate(
                {
                    "user_id": f"u{u}",
                    "item_id": item,
                    "event_type": "view",
                    "timestamp": f"2026-10-0{i + 1}T10:00:00+00:00",
                }
            )
            for u in range(6)
            for i, item in enumerate(("I001", f"I00{u + 2}"))
        ]
    )
    store.dispose()
    job = dataclasses.replace(
        _job(tmp_path, 1),
        database_url=url,
        holdout_eval=False,
        keep_local=True,
        train_config=TrainConfig(epochs=2, batch_size=32, num_negatives=16),
    )
    selecting = run_train_job(dataclasses.replace(job, select_up_to=20))
    fixed = run_train_job(job)
    assert selecting is not None and fixed is not None
    assert "fine_tune_epochs" not in selecting.metrics
    assert selecting.local_state == fixed.local_state


def test_a_preemptible_job_stops_between_steps_when_the_node_asks(tmp_path: Path) -> None:
    """The worker's stop flag ends a preemptible job (the fine-tune) with FineTuneStopped;
    a round's job, not preemptible, trains through it."""
    import multiprocessing

    from regional_node import trainer

    job = _job(tmp_path, 1)
    flag = multiprocessing.get_context("spawn").Event()
    trainer.init_worker(flag)
    try:
        assert run_train_job(dataclasses.replace(job, preemptible=True)) is not None
        flag.set()
        with pytest.raises(trainer.FineTuneStopped):
            run_train_job(dataclasses.replace(job, preemptible=True))
        with pytest.raises(trainer.FineTuneStopped):  # while it picks its epochs too
            run_train_job(
                dataclasses.replace(job, preemptible=True, select_up_to=3, holdout_eval=False)
            )
        assert run_train_job(job) is not None
    finally:
        trainer.init_worker(None)


def test_a_round_that_wants_the_node_stops_its_fine_tune(tmp_path: Path) -> None:
    """While the fine-tune runs the node long-polls the coordinator; a new round that
    wants the node sets the worker's stop flag, the fine-tune ends without swapping the
    served model, and it is tried again at the next pause."""
    import asyncio
    from types import SimpleNamespace

    from regional_node.trainer import FineTuneStopped
    from shared.schemas import CatalogOut

    settings = _node_settings(tmp_path, poll_seconds=0.05)
    store = EventStore(settings.database_url)
    try:
        runtime = NodeRuntime()
        served = SimpleNamespace(
            personalized=True,
            fine_tuned=False,
            version=4,
            model=SimpleNamespace(config=ModelConfig(num_items=3)),
        )
        runtime.serving = served  # type: ignore[assignment]
        runtime.weights = SimpleNamespace(version=4, data=b"weights")  # type: ignore[assignment]
        runtime.catalog = CatalogOut(catalog_version=1, items=tiny_catalog()[:3])
        participant = Participant(settings, store, runtime)
        participant._round_seen = 7
        polls: list[int | None] = []
        opened = SimpleNamespace(round_id=8, state="open")  # what `_wants` reads

        async def current_round(*, after: int | None = None, wait: float = 0.0) -> object:
            polls.append(after)
            await asyncio.sleep(0.2)  # the round opens while the fine-tune runs
            return opened

        async def fine_tune(job: TrainJob) -> tuple[None, float]:
            assert job.preemptible
            while not participant._stop_flag.is_set():
                await asyncio.sleep(0.01)
            raise FineTuneStopped

        participant.client.current_round = current_round  # type: ignore[method-assign]
        participant._run_training = fine_tune  # type: ignore[method-assign]
        asyncio.run(asyncio.wait_for(participant.personalize(), 10))
        assert polls and polls[0] == 7  # long-polled for a round newer than the last seen
        assert runtime.serving is served  # nothing swapped in
        assert runtime.personalize_tried is None  # tried again at the next pause
        assert participant._round_seen == 7  # the round loop still finds round 8 at once
    finally:
        asyncio.run(participant.aclose())
        store.dispose()


def test_a_round_that_samples_no_unit_still_releases_noise() -> None:
    """Releasing nothing when no sampled unit had an example made the existence of an
    update depend on the data, outside what the accountant charges for."""
    config, features, base, seqs, train = _setup()
    dp = DPConfig(clip_norm=0.05, noise_multiplier=1.0, sampling_rate=1e-9)
    out = dp_fedavg_update(config, base, features, seqs, train, dp, seed=1, unit_key=b"k")
    assert out is not None and out.sampled_units == 0 and out.clipped_fraction == 0.0
    noise = torch.cat([v.flatten() for v in out.delta.values()])
    # Pure noise: N(0, (sigma C)^2) / (q units), no signal.
    assert float(noise.std()) == pytest.approx(0.05 / (1e-9 * 6), rel=0.05)
