"""Node-side user-level DP-SGD (shared/dp_sgd.py): exact per-user gradients, clipping,
sensitivity, secret noise, the ledger's step count and the experiment's dpsgd path."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from regional_node.privacy_budget import PrivacyAccountant
from regional_node.store import EventStore
from regional_node.trainer import run_train_job
from shared.dp_experiment import load_regions
from shared.dp_sgd import DPSGDConfig, PerUserGradients, dp_sgd_update, pack_users
from shared.dp_training import DPConfig, dp_fedavg_update
from shared.features import build_item_features
from shared.market import generate_market
from shared.model import HybridTwoTower, ModelConfig, init_state, sampled_softmax_loss
from shared.privacy import dp_epsilon, epsilon_of_releases, l2_norm
from shared.training import TrainConfig, UserSequence, build_sequences, make_examples


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    data = tmp_path_factory.mktemp("dpsgd-market")
    generate_market(data, seed=3, regions=2, users=160, items=50)
    catalog, train, _held, config = load_regions(data, users=0, items=0, seed=3)
    config = config.model_copy(update={"embedding_dim": 8, "content_buckets": 128})
    features = build_item_features(catalog, config.content_buckets)
    region = max(train, key=lambda r: len(train[r]))
    return config, features, train[region]


def _perturbed_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init_state(config).items()}


def _one_user_sum(engine, state, batch, i, neg, clip=1e9):  # type: ignore[no-untyped-def]
    total, _ = engine.clipped_sum(state, batch, torch.tensor([i]), neg, clip, 64)
    return total


def _assert_autograd_equal(config, features, seqs, engine, state, batch, neg, users) -> None:  # type: ignore[no-untyped-def]
    """Each listed user's gradient from the engine equals plain autograd on the model."""
    model = HybridTwoTower(config)
    model.load_state_dict(state)
    for i in sorted(users):
        ex = make_examples([seqs[batch.users[i]]], config.max_history)
        model.zero_grad()
        vecs = model.item_vectors(features)
        u = model.user_vectors(vecs[ex.history], ex.history_types, ex.country)
        sampled_softmax_loss(u, vecs[ex.target], vecs[neg], ex.target, neg).backward()
        ours = _one_user_sum(engine, state, batch, i, neg)
        for name, p in model.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-4)


def test_per_user_gradients_equal_autograd_on_the_model(market) -> None:  # type: ignore[no-untyped-def]
    config, features, seqs = market
    engine = PerUserGradients(config, features)
    batch = pack_users(seqs, config.max_history, 64)
    state = _perturbed_state(config)
    neg = torch.randint(0, config.num_items, (16,), generator=torch.Generator().manual_seed(1))
    longest = int(torch.argmax(batch.count))
    for i in sorted({0, 1, longest}):
        assert len(make_examples([seqs[batch.users[i]]], config.max_history)) == batch.count[i]
    _assert_autograd_equal(config, features, seqs, engine, state, batch, neg, {0, 1, longest})


def test_packed_examples_are_the_users_most_recent_ones(market) -> None:  # type: ignore[no-untyped-def]
    config, _features, seqs = market
    full = pack_users(seqs, config.max_history, 64)
    capped = pack_users(seqs, config.max_history, 2)
    assert full.users == capped.users == sorted(u for u, s in seqs.items() if len(s.items) >= 2)
    i = int(torch.argmax(full.count))
    n = int(full.count[i])
    assert n > 2 and int(capped.count[i]) == 2
    # The capped user's examples are the last two of the full ones, position for position.
    seq = full.seq[i]
    assert torch.equal(seq[capped.target[i]], seq[full.target[i, n - 2 : n]])
    empty = pack_users({"u": UserSequence([1], [1], 0)}, config.max_history, 4)
    assert empty.users == [] and empty.history.shape[0] == 0


def test_each_users_contribution_is_clipped_so_one_user_moves_the_sum_by_at_most_c(
    market,  # type: ignore[no-untyped-def]
) -> None:
    config, features, seqs = market
    engine = PerUserGradients(config, features)
    batch = pack_users(seqs, config.max_history, 64)
    state = _perturbed_state(config)
    neg = torch.randint(0, config.num_items, (16,), generator=torch.Generator().manual_seed(2))
    clip = 0.05
    everyone = torch.arange(len(batch.users))
    total, clipped = engine.clipped_sum(state, batch, everyone, neg, clip, 7)
    assert clipped > 0
    for i in (0, len(batch.users) // 2, len(batch.users) - 1):
        without, _ = engine.clipped_sum(state, batch, everyone[everyone != i], neg, clip, 7)
        diff = {k: total[k] - without[k] for k in total}
        assert l2_norm(diff) <= clip * (1 + 1e-4)
        # ... and the difference is exactly that user's clipped gradient.
        alone = _one_user_sum(engine, state, batch, i, neg, clip)
        for k in diff:
            torch.testing.assert_close(diff[k], alone[k], atol=1e-6, rtol=1e-4)


def test_frozen_parameters_get_no_gradient_and_are_not_released(market) -> None:  # type: ignore[no-untyped-def]
    config, features, seqs = market
    engine = PerUserGradients(config, features, frozen=("item_id.weight",))
    assert "item_id.weight" not in engine.names
    batch = pack_users(seqs, config.max_history, 64)
    neg = torch.arange(8)
    total, _ = engine.clipped_sum(init_state(config), batch, torch.arange(4), neg, 1.0, 64)
    assert "item_id.weight" not in total and "content.weight" in total


def test_dp_sgd_noise_comes_from_the_secret_key(market) -> None:  # type: ignore[no-untyped-def]
    config, features, seqs = market
    state = init_state(config)
    dp = DPSGDConfig(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps=2, lr=0.01)
    a = dp_sgd_update(config, state, features, seqs, dp, key=b"k1")
    b = dp_sgd_update(config, state, features, seqs, dp, key=b"k1")
    c = dp_sgd_update(config, state, features, seqs, dp, key=b"k2")
    assert a is not None and b is not None and c is not None
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)  # same key: same release
    assert not torch.equal(a.delta["item_id.weight"], c.delta["item_id.weight"])
    assert a.num_units == len([s for s in seqs.values() if len(s.items) >= 2])
    assert a.sampled_units > 0 and 0 <= a.clipped_fraction <= 1
    assert a.noise_stddev == 1.0
    # Only trainable weights move; the delta has every tensor of the model.
    assert a.delta.keys() == state.keys()


def test_dp_fedavg_noise_is_not_the_public_round_seed(market) -> None:  # type: ignore[no-untyped-def]
    config, features, seqs = market
    state = init_state(config)
    train = TrainConfig(epochs=1, lr=1.0, batch_size=64, num_negatives=16, optimizer="sgd")
    dp = DPConfig(clip_norm=1.0, noise_multiplier=1.0)
    one = dp_fedavg_update(config, state, features, seqs, train, dp, seed=7, unit_key=b"a")
    two = dp_fedavg_update(config, state, features, seqs, train, dp, seed=7, unit_key=b"b")
    assert one is not None and two is not None
    # Same public seed, different secret keys: the noise differs, so whoever knows the
    # round id cannot regenerate it and subtract it.
    assert not torch.equal(one.delta["item_id.weight"], two.delta["item_id.weight"])


def test_dp_sgd_without_noise_lowers_the_loss(market) -> None:  # type: ignore[no-untyped-def]
    config, features, seqs = market
    state = init_state(config)
    dp = DPSGDConfig(clip_norm=1.0, noise_multiplier=0.0, sampling_rate=1.0, steps=30, lr=0.05)
    up = dp_sgd_update(config, state, features, seqs, dp, key=b"k")
    assert up is not None and up.sampled_units == 30 * up.num_units
    engine = PerUserGradients(config, features)
    batch = pack_users(seqs, config.max_history, 64)
    neg = torch.arange(config.num_items)

    @torch.no_grad()
    def loss(s: dict[str, torch.Tensor]) -> float:
        model = HybridTwoTower(config)
        model.load_state_dict(s)
        total = 0.0
        for u in batch.users:
            ex = make_examples([seqs[u]], config.max_history)
            vecs = model.item_vectors(features)
            users = model.user_vectors(vecs[ex.history], ex.history_types, ex.country)
            total += float(sampled_softmax_loss(users, vecs[ex.target], vecs[neg], ex.target, neg))
        return total / len(batch.users)

    trained = {k: state[k] + up.delta[k] for k in state}
    assert loss(trained) < loss(state) - 0.1
    assert engine.names  # the engine builds for this config


def test_dp_sgd_config_refuses_bad_values() -> None:
    for bad in (
        {"clip_norm": 0.0},
        {"noise_multiplier": -1.0},
        {"sampling_rate": 0.0},
        {"sampling_rate": 1.5},
        {"steps": 0},
        {"optimizer": "rmsprop"},
    ):
        args = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 1}
        with pytest.raises(ValueError):
            DPSGDConfig(**(args | bad))  # type: ignore[arg-type]


def test_the_ledger_counts_every_noisy_step(tmp_path: Path) -> None:
    store = EventStore(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.migrate()
    acc = PrivacyAccountant(store, delta=1e-5)
    acc.record(1, 1.2, 0.1, 20)
    acc.record(2, 1.2, 0.1, 20)
    assert acc.releases() == [(1.2, 0.1, 20), (1.2, 0.1, 20)]
    expected = dp_epsilon(noise_multiplier=1.2, sampling_rate=0.1, steps=40, delta=1e-5)
    assert acc.spent() == pytest.approx(expected)
    after = dp_epsilon(noise_multiplier=1.2, sampling_rate=0.1, steps=60, delta=1e-5)
    assert acc.after_one_more(1.2, 0.1, 20) == pytest.approx(after)
    # A (z, q) release without a step count is one step, as before the column existed.
    assert epsilon_of_releases([(1.2, 0.1)] * 3, 1e-5) == pytest.approx(
        epsilon_of_releases([(1.2, 0.1, 3)], 1e-5)
    )
    store.dispose()


def test_a_dpsgd_train_job_sends_the_delta_and_no_data_dependent_metric(
    tmp_path: Path,
) -> None:
    from tests.test_privacy import _job

    dp = DPSGDConfig(clip_norm=0.5, noise_multiplier=1.0, sampling_rate=0.5, steps=3)
    job = dataclasses.replace(_job(tmp_path, 1), dp=dp)
    outcome = run_train_job(job)
    assert outcome is not None
    assert outcome.num_examples == 12  # users, not examples
    assert outcome.metrics == {"dp_noise_multiplier": 1.0}


def test_dp_experiment_runs_dpsgd_and_counts_rounds_times_steps(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from shared.dp_experiment import main

    generate_market(tmp_path, seed=2, regions=2, users=120, items=40)
    base = ["--data", str(tmp_path), "--rounds", "2", "--algorithm", "dpsgd", "--dp-steps", "3"]
    main([*base, "--sampling-rate", "0.5", "--epsilons", "8", "--embedding-dim", "8"])
    out = capsys.readouterr().out
    assert "dpsgd (3 steps a round)" in out and "embedding dim 8," in out
    row = next(line for line in out.splitlines() if line.startswith("| 8 "))
    z = float(row.split("|")[2])
    # The noise multiplier is the one that spends epsilon 8 over 2 rounds x 3 steps.
    assert dp_epsilon(noise_multiplier=z, sampling_rate=0.5, steps=6, delta=1e-5) <= 8.0
    assert dp_epsilon(noise_multiplier=z * 0.98, sampling_rate=0.5, steps=6, delta=1e-5) > 8.0
    assert math.isfinite(float(row.split("|")[4]))
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--distributed-noise", "--epsilons", "8"])
    assert exit_info.value.code == 2
    assert "--distributed-noise needs" in capsys.readouterr().err
    for bad in (["--embedding-dim", "2"], ["--dp-steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *bad, "--epsilons", "8"])
        assert exit_info.value.code == 2  # a usage error, not a traceback


def test_ledger_migration_counts_earlier_releases_as_one_step(db_url: str) -> None:
    from alembic import command
    from sqlalchemy import create_engine, text

    from shared.db import alembic_config

    cfg = alembic_config("node", db_url)
    command.upgrade(cfg, "n0002_privacy")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO privacy_ledger (round_id, noise_multiplier, sampling_rate, "
                    "released_at) VALUES (1, 1.5, 1.0, :ts)"
                ),
                {"ts": datetime.now(UTC)},
            )
        command.upgrade(cfg, "head")
        store = EventStore(db_url)
        try:
            acc = PrivacyAccountant(store, delta=1e-5)
            assert acc.releases() == [(1.5, 1.0, 1)]
            acc.record(2, 1.5, 0.2, 10)
            assert acc.releases()[-1] == (1.5, 0.2, 10)
        finally:
            store.dispose()
        command.downgrade(cfg, "n0002_privacy")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM privacy_ledger")).scalar_one() == 2
    finally:
        engine.dispose()


def test_distributed_noise_needs_secure_aggregation_and_one_linear_step(market) -> None:  # type: ignore[no-untyped-def]
    from regional_node.settings import NodeSettings

    base = {"allow_anonymous": True, "dp_enabled": True, "dp_noise_nodes": 3}
    with pytest.raises(ValueError, match="NODE_DP_NOISE_NODES"):
        NodeSettings(**base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NODE_DP_NOISE_NODES"):
        NodeSettings(**base, secure_aggregation=True, dp_algorithm="dpsgd", dp_sgd_steps=2)  # type: ignore[arg-type]
    ok = NodeSettings(**base, secure_aggregation=True, dp_algorithm="dpsgd", dp_sgd_steps=1)  # type: ignore[arg-type]
    assert ok.dp_noise_nodes == 3
    config, features, seqs = market
    dp = DPSGDConfig(
        clip_norm=2.0, noise_multiplier=1.5, sampling_rate=1.0, steps=1, noise_share=3**-0.5
    )
    up = dp_sgd_update(config, init_state(config), features, seqs, dp, key=b"k")
    assert up is not None and up.noise_stddev == pytest.approx(3.0 / 3**0.5)


def test_items_past_the_id_table_are_content_only_as_in_the_model(market) -> None:  # type: ignore[no-untyped-def]
    config, features, seqs = market
    # A version made before the last 10 catalog items existed: its id table is shorter.
    small = config.model_copy(update={"num_items": config.num_items - 10})
    engine = PerUserGradients(small, features)
    batch = pack_users(seqs, small.max_history, 64)
    new_rows = set(range(small.num_items, config.num_items))
    users = [i for i, u in enumerate(batch.users) if new_rows & set(seqs[u].items)]
    assert users, "the market has users of the newest items"
    state = _perturbed_state(small)
    neg = torch.arange(config.num_items - 16, config.num_items)  # half of them new
    _assert_autograd_equal(small, features, seqs, engine, state, batch, neg, users[:3])


def test_state_average_is_the_bias_corrected_moving_average() -> None:
    from shared.dp_experiment import StateAverage

    s0, s1 = {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([0.0, 6.0])}
    avg = StateAverage(0.5)
    avg.update(s0)
    assert avg.state is not None and torch.equal(avg.state["w"], s0["w"])  # the first alone
    avg.update(s1)
    # (0.5 * 0.5 * s0 + 0.5 * s1) / (1 - 0.5^2) = s0 / 3 + 2 s1 / 3
    torch.testing.assert_close(avg.state["w"], torch.tensor([1.0, 4.0]))
    s0["w"][0] = 100.0  # the average holds its own copy
    torch.testing.assert_close(avg.state["w"], torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError):
        StateAverage(1.0)


def test_dp_experiment_evaluates_the_average_and_saves_the_states(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from shared.dp_experiment import main

    generate_market(tmp_path / "m", seed=2, regions=2, users=120, items=40)
    base = [
        "--data", str(tmp_path / "m"), "--rounds", "3", "--algorithm", "dpsgd", "--dp-steps",
        "1", "--dp-optimizer", "sgd", "--dp-lr", "1", "--server-optimizer", "adam",
        "--embedding-dim", "8", "--epsilons", "8",
    ]  # fmt: skip

    def run(*extra: str) -> tuple[str, dict[str, torch.Tensor]]:
        out = tmp_path / f"states{len(list(tmp_path.iterdir()))}"
        main([*base, *extra, "--save-states", str(out)])
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 "))
        return row.split("|")[4], torch.load(out / "global-eps-8.pt")

    hr_last, last = run()
    hr_zero, zero = run("--ema", "0")  # decay 0: the average is the last state
    assert hr_zero == hr_last
    for k in last:
        torch.testing.assert_close(zero[k], last[k])
    _hr, averaged = run("--ema", "0.9")
    assert any(not torch.allclose(averaged[k], last[k]) for k in last)
    for bad in (
        ["--ema", "1"],
        ["--server-adam-beta1", "1"],
        ["--server-adam-beta2", "-0.1"],
        ["--serve-epochs", "0"],
        ["--dp-serve-epochs", "0"],
        ["--dp-serve-soup", "0"],
        ["--serve-global-share", "1.5"],
        ["--serve-lr", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *bad])
        assert exit_info.value.code == 2
    assert "| 8 " not in capsys.readouterr().out  # refused before any run


def test_a_saved_state_is_served_again_with_the_recipe_the_run_used(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from shared.dp_experiment import main

    generate_market(tmp_path / "m", seed=2, regions=2, users=120, items=40)
    base = [
        "--data", str(tmp_path / "m"), "--rounds", "3", "--algorithm", "dpsgd", "--dp-steps",
        "1", "--dp-optimizer", "sgd", "--dp-lr", "1", "--server-optimizer", "adam",
        "--embedding-dim", "8", "--epsilons", "8", "--dp-serve-epochs", "3", "--seed", "4",
    ]  # fmt: skip
    main([*base, "--save-states", str(tmp_path / "s")])
    printed = capsys.readouterr()
    row = next(line for line in printed.out.splitlines() if line.startswith("| 8 "))
    # Progress of the rounds goes to stderr, the table to stdout.
    assert [ln.split(" (")[0] for ln in printed.err.splitlines() if "round" in ln] == [
        f"epsilon 8: round {r}/3" for r in (1, 2, 3)
    ]
    cells = [c.strip() for c in row.split("|")]
    state = tmp_path / "s" / "global-eps-8.pt"

    def again(*extra: str) -> tuple[str, str]:
        main([*base, "--from-state", str(state), *extra])
        out = capsys.readouterr().out
        assert "| 8 " not in out  # nothing trained
        line = out.strip().splitlines()[-1]
        return line.split("global HR@10 ")[1][:6], line.rsplit("HR@10 ", 1)[1]

    # The DP row was served like a DP node by default: up to --dp-serve-epochs (3) picked
    # per region, a soup of 3 (NODE_DP_PERSONALIZE_SELECT, _SOUP). That recipe, given as
    # the --serve-* one, gives its figures back.
    assert "after DP 1 to 3 epochs, picked per region, a soup of 3" in printed.out
    dp_recipe = ("--serve-epochs", "3", "--serve-select", "--serve-soup", "3")
    assert again(*dp_recipe) == (cells[4], cells[7])
    assert again("--serve-epochs", "3")[1] != cells[7]  # one fine-tune, 3 epochs
    glob, served = again(*dp_recipe, "--serve-global-share", "1")
    assert glob == cells[4]
    # Share 1 serves the global weights themselves.
    assert served == cells[4] != cells[7]
    # The fine-tune's learning rate is a recipe knob too.
    assert again(*dp_recipe, "--serve-lr", "0.05") != (cells[4], cells[7])
    for bad in (
        ["--from-state", str(tmp_path / "missing.pt")],
        ["--from-state", str(state), "--embedding-dim", "4"],  # another width's state
        ["--from-state", str(tmp_path / "m" / "catalog.csv")],  # not a state at all
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *bad])
        assert exit_info.value.code == 2


def test_packed_examples_carry_the_country_of_their_time() -> None:
    # Like make_examples: a user who moved has each example's country as of its target
    # (pack_users gave every example the latest one).
    rows = [("u", 1, "view", 1.0, None), ("u", 2, "view", 2.0, "DE"), ("u", 3, "view", 3.0, "FR")]
    rows.append(("u", 4, "view", 4.0, None))
    seqs = build_sequences(rows, country_buckets=64)
    batch = pack_users(seqs, 4, 8)
    expected = make_examples(seqs.values(), 4).country
    assert batch.country[0, : int(batch.count[0])].tolist() == expected.tolist()
    assert len(set(expected.tolist())) == 3  # unknown, DE, FR
