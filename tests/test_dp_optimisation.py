"""DP-FedAvg optimisation choices (docs/privacy.md §2): SGD user units, frozen
parameters, the server momentum step, the gather path, and the accountant's
round schedule."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from shared.dp_training import DPConfig, ServerMomentum, _sampled, dp_fedavg_update
from shared.model import HybridTwoTower
from shared.privacy import (
    dp_epsilon,
    epsilon_of_releases,
    l2_norm,
    noise_multiplier_for_epsilon,
)
from shared.training import TrainConfig, make_examples, train_local
from tests.test_privacy import _setup as privacy_setup


def _setup(users: int = 6):  # type: ignore[no-untyped-def]
    """test_privacy's tiny market, with SGD user units (the DP default)."""
    config, features, base, seqs, _ = privacy_setup(users)
    train = TrainConfig(epochs=1, lr=1.0, batch_size=8, num_negatives=16, optimizer="sgd")
    return config, features, base, seqs, train


def _states(d: dict[str, float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([d["w"], -d["w"]]), "b": torch.tensor([d["b"]])}


def test_server_momentum_is_a_heavy_ball_step_on_the_released_means() -> None:
    deltas = [_states({"w": 1.0, "b": 2.0}), _states({"w": 3.0, "b": 0.0})]
    deltas.append(_states({"w": -1.0, "b": 1.0}))
    server = ServerMomentum(lr=2.0, momentum=0.5)
    steps = [server.step(d) for d in deltas]
    # v1 = d1; v2 = 0.5 d1 + d2; v3 = 0.25 d1 + 0.5 d2 + d3; step = 2 v.
    assert torch.allclose(steps[0]["w"], torch.tensor([2.0, -2.0]))
    assert torch.allclose(steps[1]["w"], torch.tensor([7.0, -7.0]))
    assert torch.allclose(steps[2]["b"], torch.tensor([2 * (0.5 + 0 + 1.0)]))
    plain = ServerMomentum()
    assert plain.plain and torch.equal(plain.step(deltas[0])["w"], deltas[0]["w"])
    with pytest.raises(ValueError):
        ServerMomentum(momentum=1.0)


def test_node_side_momentum_equals_the_global_momentum_of_fedavg() -> None:
    """FedAvg is linear: each node stepping its own momentum with a fixed weight gives
    the coordinator's weighted mean of a global momentum step."""
    g = torch.Generator().manual_seed(0)
    weights = (3, 5)
    nodes = [ServerMomentum(lr=1.5, momentum=0.9) for _ in weights]
    glob = ServerMomentum(lr=1.5, momentum=0.9)
    for _ in range(4):
        deltas = [{"w": torch.randn(5, generator=g, dtype=torch.float64)} for _ in weights]
        sent = [node.step(d) for node, d in zip(nodes, deltas, strict=True)]
        mean_sent = sum(s["w"] * n for s, n in zip(sent, weights, strict=True)) / sum(weights)
        mean_delta = sum(d["w"] * n for d, n in zip(deltas, weights, strict=True)) / sum(weights)
        assert torch.allclose(mean_sent, glob.step({"w": mean_delta})["w"])


def test_one_sgd_step_of_a_unit_is_linear_in_the_learning_rate() -> None:
    config, features, base, seqs, train = _setup()
    examples = make_examples([seqs["u1"]], config.max_history)
    deltas = []
    for lr in (0.5, 1.0):
        model = HybridTwoTower(config)
        model.load_state_dict(base)
        train_local(model, features, examples, dataclasses.replace(train, lr=lr, seed=4))
        deltas.append({k: v - base[k] for k, v in model.state_dict().items()})
    for k in base:
        assert torch.allclose(deltas[1][k], 2 * deltas[0][k], atol=1e-6)
    assert l2_norm(deltas[1]) > 0


def test_the_gather_path_gives_the_full_catalog_path_s_update() -> None:
    config, features, base, seqs, train = _setup()
    examples = make_examples(seqs.values(), config.max_history)
    out = []
    for rows in (0, 10_000):
        model = HybridTwoTower(config)
        model.load_state_dict(base)
        # No id dropout: the two paths draw their dropout masks over different row sets.
        cfg = dataclasses.replace(
            train, optimizer="adam", lr=0.05, full_catalog_rows=rows, id_dropout=0.0
        )
        train_local(model, features, examples, cfg)
        out.append(model.state_dict())
    for k in base:
        if k == "content_bias.bias":
            # A constant on every score cancels in the softmax: its true gradient is 0 and
            # Adam turns the ~1e-9 rounding residue of either path into a +-lr step.
            continue
        assert torch.allclose(out[0][k], out[1][k], atol=1e-5)


def test_frozen_parameters_are_released_as_exact_zeros_without_noise() -> None:
    config, features, base, seqs, train = _setup()
    dp = DPConfig(clip_norm=0.5, noise_multiplier=2.0, frozen=("item_id", "user_proj"))
    out = dp_fedavg_update(config, base, features, seqs, train, dp, seed=1, unit_key=b"k")
    assert out is not None
    assert set(out.delta) == set(base)
    for name in ("item_id.weight", "user_proj.weight", "user_proj.bias"):
        assert torch.count_nonzero(out.delta[name]) == 0
    assert torch.count_nonzero(out.delta["content.weight"]) > 0  # noised like before
    assert not dp.is_frozen("item_bias.weight")  # a prefix names a module, not a substring


def test_the_node_side_server_lr_scales_the_noisy_mean_exactly() -> None:
    config, features, base, seqs, train = _setup()
    outs = [
        dp_fedavg_update(
            config,
            base,
            features,
            seqs,
            train,
            DPConfig(clip_norm=0.5, noise_multiplier=1.0, server_lr=lr),
            seed=2,
            unit_key=b"k",
        )
        for lr in (1.0, 4.0)
    ]
    assert outs[0] is not None and outs[1] is not None
    assert outs[0].noise_stddev == outs[1].noise_stddev == pytest.approx(0.5)
    for k in base:
        assert torch.allclose(outs[1].delta[k], 4 * outs[0].delta[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("frozen", [(), ("item_id",)])
def test_one_user_moves_an_sgd_clipped_sum_by_at_most_the_clip_norm(
    frozen: tuple[str, ...],
) -> None:
    config, features, base, seqs, train = _setup()
    dp = DPConfig(clip_norm=0.05, noise_multiplier=0.0, frozen=frozen)
    with_all = dp_fedavg_update(config, base, features, seqs, train, dp, seed=1, unit_key=b"k")
    without = {k: v for k, v in seqs.items() if k != "u2"}
    fewer = dp_fedavg_update(config, base, features, without, train, dp, seed=1, unit_key=b"k")
    assert with_all is not None and fewer is not None
    assert with_all.clipped_fraction == 1.0
    diff = {k: with_all.delta[k].double() * 6 - fewer.delta[k].double() * 5 for k in with_all.delta}
    assert l2_norm(diff) <= 0.05 * (1 + 1e-4)


def test_the_measured_schedule_is_what_the_node_ledger_accounts() -> None:
    """The experiment's noise for (epsilon 8, 5 rounds, q 1) is what the node's ledger of
    five releases composes to, and stays within the target."""
    rounds = 5
    for target in (1.0, 4.0, 8.0):
        z = noise_multiplier_for_epsilon(epsilon=target, delta=1e-5, steps=rounds)
        ledger = epsilon_of_releases([(z, 1.0)] * rounds, 1e-5)
        assert ledger == pytest.approx(
            dp_epsilon(noise_multiplier=z, sampling_rate=1.0, steps=rounds, delta=1e-5)
        )
        assert ledger <= target
        assert epsilon_of_releases([(z, 1.0)] * (rounds + 1), 1e-5) > target


def test_subsampling_buys_no_signal_to_noise_at_equal_compute_for_epsilon_8() -> None:
    """Why the measured schedule keeps q = 1 (docs/privacy.md): at epsilon 8, delta 1e-5
    the noise on the averaged update over the whole run, relative to the signal, is
    z / (q sqrt(R)); with the same number of unit trainings (q R = 5) it is smallest at
    q = 1, and more rounds at q = 1 leave it unchanged."""

    def noise_to_signal(q: float, rounds: int) -> float:
        z = noise_multiplier_for_epsilon(epsilon=8, delta=1e-5, steps=rounds, sampling_rate=q)
        return z / (q * math.sqrt(rounds))

    full = noise_to_signal(1.0, 5)
    assert noise_to_signal(1.0, 10) == pytest.approx(full, rel=0.01)
    for q, rounds in ((0.5, 10), (0.2, 25), (0.1, 50)):
        assert noise_to_signal(q, rounds) > 1.2 * full


def test_the_sampling_coin_is_keyed_by_the_secret_round_key() -> None:
    """With the round seed and the user id public, only the node's key decides who is in."""
    users = [f"u{i}" for i in range(2000)]
    a = {u for u in users if _sampled(b"key-a", 7, u, 0.2)}
    b = {u for u in users if _sampled(b"key-b", 7, u, 0.2)}
    assert 340 < len(a) < 460 and 340 < len(b) < 460  # ~ Binomial(2000, 0.2)
    assert len(a & b) < 0.5 * len(a)  # ~ 0.2 overlap, not the same users
    assert a == {u for u in users if _sampled(b"key-a", 7, u, 0.2)}


def test_server_adam_is_fedadam_on_the_released_means() -> None:
    from shared.dp_training import ServerAdam

    server = ServerAdam(lr=0.5, beta1=0.5, beta2=0.75, tau=0.1)
    first = server.step({"w": torch.tensor([2.0, -4.0])})
    # m = 0.5 d = [1, -2]; v = 0.25 d^2 = [1, 4]; step = 0.5 m / (sqrt(v) + 0.1).
    assert torch.allclose(first["w"], torch.tensor([0.5 / 1.1, -1.0 / 2.1]))
    second = server.step({"w": torch.tensor([0.0, 0.0])})
    # m = [0.5, -1]; v = 0.75 [1, 4] = [0.75, 3].
    want = 0.5 * torch.tensor([0.5, -1.0]) / (torch.tensor([0.75, 3.0]).sqrt() + 0.1)
    assert torch.allclose(second["w"], want)
    with pytest.raises(ValueError):
        ServerAdam(beta2=1.0)
    with pytest.raises(ValueError):
        ServerAdam(tau=0.0)
    with pytest.raises(ValueError):
        ServerAdam(noise_variance=-1.0)


def test_server_adam_bias_correction_takes_the_known_noise_out_of_its_second_moment() -> None:
    from shared.dp_training import ServerAdam

    # Hand-checked first step: v = 0.25 d^2 = [1, 4]; less (1 - 0.75) 2 = 0.5 -> [0.5, 3.5].
    server = ServerAdam(lr=0.5, beta1=0.5, beta2=0.75, tau=0.1, noise_variance=2.0)
    first = server.step({"w": torch.tensor([2.0, -4.0])})
    want = 0.5 * torch.tensor([1.0, -2.0]) / (torch.tensor([0.5, 3.5]).sqrt() + 0.1)
    assert torch.allclose(first["w"], want)
    # Second step, d = 0: v = 0.75 [1, 4] = [0.75, 3]; noise share 2 (1 - 0.75^2) = 0.875,
    # so [0 (floored), 2.125]; m = [0.5, -1].
    second = server.step({"w": torch.tensor([0.0, 0.0])})
    want = 0.5 * torch.tensor([0.5, -1.0]) / (torch.tensor([0.0, 2.125]).sqrt() + 0.1)
    assert torch.allclose(second["w"], want)
    # On signal + N(0, sigma^2) the corrected second moment estimates the signal's
    # (1 - b2^t) s^2, where the plain one is dominated by sigma^2.
    g = torch.Generator().manual_seed(0)
    signal = torch.tensor([0.0] * 500 + [3.0] * 500)
    sigma = 2.0
    corrected = ServerAdam(beta2=0.99, noise_variance=sigma**2)
    for _ in range(400):
        corrected.step({"w": signal + torch.randn(1000, generator=g) * sigma})
    assert corrected.v is not None
    share = 1 - 0.99**400
    v_signal = (corrected.v["w"] - sigma**2 * share).clamp(min=0)
    assert v_signal[:500].mean() < 0.2 * sigma**2  # noise-only coordinates: ~0
    assert abs(v_signal[500:].mean() / (9.0 * share) - 1) < 0.15  # s^2 = 9 recovered
    assert corrected.v["w"][:500].mean() > 0.8 * sigma**2 * share  # plain v: the noise


@pytest.mark.parametrize(
    "bad",
    [
        ["--server-optimizer", "adam", "--server-adam-lr", "-1"],
        ["--server-adam-tau", "0"],
        ["--server-momentum", "1"],
        ["--server-adam-bias-correction"],  # FedAvg units, SGD server: nothing to correct
        ["--recipe", "fedsgd", "--plain-rounds", "0"],
    ],
)
def test_dp_experiment_refuses_bad_server_settings_before_loading(
    bad: list[str], tmp_path: Path
) -> None:
    from shared.dp_experiment import main

    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path), "--epsilons", "8", *bad])
    assert exc.value.code == 2
    assert not any(tmp_path.iterdir())  # no market generated: refused before any work
