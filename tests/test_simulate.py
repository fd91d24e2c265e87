"""`fedjewel simulate` on a small market: the JSON shape, and margins that must hold."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.cli import main
from shared.market import generate_market
from shared.metrics import summarize_ranks
from shared.model import HybridTwoTower, ModelConfig, init_state
from shared.simulate import (
    ALL_METHODS,
    SimulationConfig,
    load_dataset,
    rank_fine_tuned,
    run_simulation,
    train_federated,
)
from shared.training import (
    SOUP_SEED_STRIDE,
    TrainConfig,
    fine_tuned_state,
    make_examples,
    rank_held_out,
    select_fine_tune_epochs,
    split_leave_last_out,
)

# Small enough for CI, large enough that the margins below are not luck.
USERS, ITEMS, REGIONS = 1500, 300, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def market_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim-market")
    generate_market(out, seed=5, regions=REGIONS, users=USERS, items=ITEMS)
    return out


def _hr(result: dict[str, Any], part: str = "overall") -> float:
    return float(result[part]["hr@10"])


@pytest.fixture(scope="module")
def report(market_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI run shared by the tests below (the expensive part of this module)."""
    out = tmp_path_factory.mktemp("sim-out") / "sim.json"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "simulate",
                    "--data",
                    str(market_dir),
                    "--rounds",
                    "5",
                    "--local-epochs",
                    "3",
                    "--seed",
                    "0",
                    "--methods",
                    "popularity,local_only,federated,centralized",
                    "--json",
                    str(out),
                ]
            )
    finally:
        torch.set_num_threads(before)
    assert exit_info.value.code == 0
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.slow
def test_json_shape(report: dict[str, Any]) -> None:
    assert report["config"]["rounds"] == 5
    results = report["results"]
    assert list(results) == ["popularity", "local_only", "federated", "centralized"]
    regions = set(report["config"]["regions"])
    assert len(regions) == REGIONS
    for res in results.values():
        assert set(res) == {"overall", "cold_items", "cold_users", "regions"}
        assert set(res["regions"]) == regions
        for cell in (res["overall"], res["cold_items"], res["cold_users"]):
            assert set(cell) == {"hr@10", "ndcg@10", "users"}
            assert 0.0 <= cell["ndcg@10"] <= cell["hr@10"] <= 1.0
        # Every evaluated user is counted once overall and once in their region.
        assert sum(r["users"] for r in res["regions"].values()) == res["overall"]["users"]
        assert res["overall"]["users"] == report["config"]["evaluated_users"]


@pytest.mark.slow
def test_pooling_data_beats_training_alone(report: dict[str, Any]) -> None:
    results = report["results"]
    # Measured on this seed: centralized 0.441, local-only 0.417 (1.06x).
    assert _hr(results["centralized"]) >= 1.03 * _hr(results["local_only"])
    # Federated is within reach of pooling (measured 0.440 vs 0.441, 1.00x).
    assert _hr(results["federated"]) >= 0.9 * _hr(results["centralized"])


def test_federated_beats_popularity(report: dict[str, Any]) -> None:
    results = report["results"]
    # Measured 0.440 vs 0.318 on this tiny market (1.38x; docs/evaluation.md has the
    # default scale).
    assert _hr(results["federated"]) >= 1.2 * _hr(results["popularity"])


def test_same_seed_same_numbers(market_dir: Path) -> None:
    config = SimulationConfig(rounds=1, local_epochs=1, seed=3, methods=("popularity", "federated"))
    data = load_dataset(market_dir)
    a = run_simulation(market_dir, config, data=data)
    b = run_simulation(market_dir, config, data=load_dataset(market_dir))
    assert a.results == b.results


def test_cold_users_are_defined_by_training_events(market_dir: Path) -> None:
    data = load_dataset(market_dir)
    # A user with a held-out item has at least one training item, hence >= 1 training event.
    assert all(data.train_events[u] >= 1 for u in data.held_out)
    # Training events count raw rows, so they are at least the distinct training items.
    assert all(data.train_events[u] >= len(data.train[u].items) for u in data.train)
    assert data.cold_items.isdisjoint({r for s in data.train.values() for r in s.items})


def test_runs_on_a_market_without_region_column_or_attributes(tmp_path: Path) -> None:
    """Data that is not ours: no region column, a catalog with only item ids."""
    items = [f"X{i}" for i in range(30)]
    (tmp_path / "catalog.csv").write_text("item_id\n" + "\n".join(items) + "\n")
    rows = ["user_id,item_id,event_type,timestamp"]
    for u in range(40):
        for j in range(4):
            rows.append(f"u{u},X{(u + 3 * j) % 30},view,{1_700_000_000 + 100 * j}")
    rows.append("u0,NOT-IN-CATALOG,view,1700000999")
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    report = run_simulation(
        tmp_path,
        SimulationConfig(rounds=1, local_epochs=1, methods=("popularity", "federated")),
    )
    assert report.config["regions"] == {"all": 40}
    assert report.config["skipped_events"] == 1
    assert report.results["federated"]["overall"]["users"] == 40
    assert set(ALL_METHODS) >= set(report.results)


@pytest.mark.parametrize("share", ["1.5", "-0.1"])
def test_cli_rejects_a_share_outside_0_1(market_dir: Path, share: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--data", str(market_dir), "--personal-global-share", share])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(("flag", "value"), [("--personal-epochs", "-1"), ("--personal-lr", "0")])
def test_cli_rejects_a_fine_tune_that_cannot_run(market_dir: Path, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--data", str(market_dir), flag, value])
    assert exit_info.value.code == 2


def test_what_a_region_serves_is_its_own_fine_tune_of_the_final_global_model(
    market_dir: Path,
) -> None:
    """Like a node (NODE_PERSONALIZE_EPOCHS at NODE_PERSONALIZE_LEARNING_RATE): each region
    fine-tunes the final global weights; `personal_epochs=None` serves the last round's
    local model instead."""
    data = load_dataset(market_dir)
    config = SimulationConfig(rounds=1, local_epochs=1, seed=2, methods=("federated",))
    assert (config.personal_epochs, config.personal_lr) == (5, 0.003)  # the node's defaults
    run = train_federated(data, config)
    global_ranks = rank_held_out(run.global_model, data.features, data.train, data.held_out)
    tuned = rank_fine_tuned(data, run, config, 1)
    assert tuned.keys() == global_ranks.keys() == data.held_out.keys()
    assert tuned != global_ranks  # the fine-tune moved what is served
    # All of the global weights (share 1) is the global model, whatever the fine-tune did.
    whole_global = SimulationConfig(**{**config.__dict__, "personal_global_share": 1.0})
    assert rank_fine_tuned(data, run, whole_global, 1) == global_ranks
    # The learning rate is the fine-tune's own.
    assert (
        rank_fine_tuned(data, run, SimulationConfig(**{**config.__dict__, "personal_lr": 0.01}), 1)
        != tuned
    )
    served = run_simulation(market_dir, config, data=data).results["federated"]
    old = SimulationConfig(**{**config.__dict__, "personal_epochs": None})
    round_model = run_simulation(market_dir, old, data=data).results["federated"]
    assert served["overall"]["users"] == round_model["overall"]["users"] == len(data.held_out)
    assert served != round_model


def test_fine_tune_epochs_are_picked_on_the_region_s_own_validation_split(
    market_dir: Path,
) -> None:
    """`select_fine_tune_epochs` (the experiment's --serve-select): the curve holds the
    validation HR@10 after every epoch, the last one included (it was once skipped), and
    each point is what a fine-tune of that many epochs gives on its own."""
    data = load_dataset(market_dir)
    config = ModelConfig(num_items=data.num_items)
    torch.manual_seed(3)
    state = init_state(config)
    region = data.regions[-1]  # the smallest: quick
    sequences = {u: data.train[u] for u in data.users_of(region)}
    tune = TrainConfig(epochs=3, lr=0.01, seed=4)
    model = HybridTwoTower(config)
    best, curve = select_fine_tune_epochs(model, state, data.features, sequences, tune, 0.2)
    assert len(curve) == 3 and best == 1 + curve.index(max(curve))
    fit, val = split_leave_last_out(sequences)
    for epochs in (1, 3):
        served = fine_tuned_state(
            model,
            state,
            data.features,
            make_examples(fit.values(), config.max_history),
            dataclasses.replace(tune, epochs=epochs),
            0.2,
        )
        model.load_state_dict(served)
        hr = summarize_ranks(rank_held_out(model, data.features, fit, val).values())["hr@10"]
        assert hr == pytest.approx(curve[epochs - 1], abs=1e-9)
    one_epoch = dataclasses.replace(tune, epochs=1)
    assert select_fine_tune_epochs(model, state, data.features, sequences, one_epoch, 0.2)[0] == 1


def test_a_soup_serves_the_mean_of_fine_tunes_that_differ_in_their_seed(
    market_dir: Path,
) -> None:
    """`fine_tuned_state(soup=k)` (the experiment's --serve-soup): the blend of the mean of
    k fine-tunes seeded SOUP_SEED_STRIDE apart; a soup of one is the plain fine-tune."""
    data = load_dataset(market_dir)
    config = ModelConfig(num_items=data.num_items)
    state = init_state(config)
    region = data.regions[-1]
    examples = make_examples([data.train[u] for u in data.users_of(region)], config.max_history)
    tune = TrainConfig(epochs=1, lr=0.01, seed=4)
    model = HybridTwoTower(config)
    singles = [
        fine_tuned_state(
            model, state, data.features, examples, dataclasses.replace(tune, seed=s), 0.0
        )
        for s in (4, 4 + SOUP_SEED_STRIDE)
    ]
    assert not torch.equal(singles[0]["item_id.weight"], singles[1]["item_id.weight"])
    one = fine_tuned_state(model, state, data.features, examples, tune, 0.0, soup=1)
    assert all(torch.equal(one[k], singles[0][k]) for k in one)
    soup = fine_tuned_state(model, state, data.features, examples, tune, 0.2, soup=2)
    for k, v in soup.items():
        if v.is_floating_point():
            mean = (singles[0][k] + singles[1][k]) / 2
            assert torch.allclose(v, 0.8 * mean + 0.2 * state[k], atol=1e-6), k
    assert all(torch.equal(model.state_dict()[k], soup[k]) for k in soup)
    with pytest.raises(ValueError, match="soup"):
        fine_tuned_state(model, state, data.features, examples, tune, 0.2, soup=0)
