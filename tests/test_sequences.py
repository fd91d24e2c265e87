"""Interaction sequences: what training, evaluation and serving know of a user's past."""

from __future__ import annotations

from pathlib import Path

import torch

from regional_node.recommender import Filters, history_rows, recommend, user_vector
from regional_node.store import EventStore
from shared.features import country_bucket
from shared.model import EVENT_TYPE_IDS
from shared.schemas import EventIn
from shared.training import UserSequence, build_sequences, make_examples, split_leave_last_out
from tests.test_recommender_perf import _serving

VIEW, PURCHASE = EVENT_TYPE_IDS["view"], EVENT_TYPE_IDS["purchase"]


def _events(purchase_at: float) -> list[tuple[str, int, str, float, str | None]]:
    # u views item 5, then 7, buys 5 at `purchase_at`, and views 9 at t = 4.
    return [
        ("u", 5, "view", 1.0, "DE"),
        ("u", 7, "view", 2.0, None),
        ("u", 5, "purchase", purchase_at, None),
        ("u", 9, "view", 4.0, None),
    ]


def test_sequence_keeps_first_contact_order_and_strongest_type() -> None:
    seq = build_sequences(_events(3.0), country_buckets=8)["u"]
    assert (seq.items, seq.types) == ([5, 7, 9], [PURCHASE, VIEW, VIEW])


def test_held_out_item_sees_only_what_happened_before_it() -> None:
    # A purchase after the held-out item was first touched is not known yet (it was
    # counted until 2026-11-26: the evaluation leaked the future into the history).
    later = build_sequences(_events(5.0), country_buckets=8)
    train, held_out = split_leave_last_out(later)
    assert held_out == {"u": 9}
    assert (train["u"].items, train["u"].types) == ([5, 7], [VIEW, VIEW])
    earlier = build_sequences(_events(3.0), country_buckets=8)
    train, _ = split_leave_last_out(earlier)
    assert train["u"].types == [PURCHASE, VIEW]


def test_training_histories_carry_the_types_of_their_own_time() -> None:
    seqs = build_sequences(_events(3.0), country_buckets=8)
    seqs["v"] = build_sequences(
        [("v", 1, "view", 1.0, None), ("v", 2, "view", 2.0, None), ("v", 1, "purchase", 9.0, None)],
        country_buckets=8,
    )["v"]
    ex = make_examples([seqs["u"], seqs["v"]], max_history=4)
    # u: 7 from [5 viewed]; 9 from [5 bought at 3, 7]. v: 2 from [1 viewed] (bought later).
    assert ex.target.tolist() == [7, 9, 2]
    assert ex.history_types[:, -2:].tolist() == [[0, VIEW], [PURCHASE, VIEW], [0, VIEW]]


def test_sequences_made_from_lists_still_take_events() -> None:
    seq = UserSequence([3, 4], [VIEW, VIEW])
    seq.add(3, PURCHASE, 10.0)
    seq.add(8, VIEW, 11.0)
    assert (seq.items, seq.types) == ([3, 4, 8], [PURCHASE, VIEW, VIEW])
    assert seq.types_window(0, 2) == [PURCHASE, VIEW]  # bought at 10, before 8 (at 11)


@torch.no_grad()
def test_serving_builds_the_history_training_sees() -> None:
    # Repeated raw events are one entry at first contact with the strongest type; until
    # 2026-11-26 serving pooled the raw events, repeats and all.
    s = _serving()
    raw = [("I001", "view"), ("I002", "view"), ("I001", "purchase"), ("I002", "click")]
    raw += [("I001", "view")] * 10
    distinct = [("I001", "purchase"), ("I002", "click")]
    args = ("DE", 5, Filters(), ["I004"])
    assert recommend(s, raw, *args) == recommend(s, distinct, *args)
    rows = [(s.row_of["I001"], PURCHASE), (s.row_of["I002"], EVENT_TYPE_IDS["click"])]
    bucket = country_bucket("DE", s.model.config.country_buckets)
    user = user_vector(s, rows, bucket)
    scores = s.item_vecs @ user
    scores[[s.row_of["I004"], s.row_of["I007"]]] = float("-inf")  # excluded, inactive
    top = torch.topk(scores, 5).indices.tolist()
    assert [i for i, _ in recommend(s, raw, *args)] == [s.item_ids[r] for r in top]


def test_the_node_serves_from_the_history_its_trainer_builds(tmp_path: Path) -> None:
    # Through the node's own store: a late-arriving event (stored after a later one),
    # equal timestamps, repeats, and items the catalog does not hold (which must not
    # take history slots: the model's window is max_history = 5 here).
    s = _serving()
    store = EventStore(f"sqlite:///{tmp_path / 'node.db'}")
    store.migrate()
    stored = [("I003", "view", 200), ("I002", "view", 100), ("I003", "view", 100)]
    stored += [("I001", "add_to_cart", 150), ("I002", "purchase", 250), ("I005", "view", 300)]
    stored += [("I006", "view", 301), ("I008", "click", 302)]
    stored += [(f"X{i:03d}", "view", 400 + i) for i in range(40)]  # not in the catalog
    store.add_events(
        [
            EventIn(user_id="u", item_id=i, event_type=t, timestamp=ts)  # type: ignore[arg-type]
            for i, t, ts in stored
        ]
    )
    trained = build_sequences(
        ((u, s.row_of[i], t, ts, c) for u, i, t, ts, c in store.iter_events() if i in s.row_of),
        country_buckets=8,
    )["u"]
    served = history_rows(s, store.recommend_context("u")[0])
    assert served == list(zip(trained.items, trained.types, strict=True))[-5:]
    assert [s.item_ids[r] for r, _ in served] == ["I003", "I001", "I005", "I006", "I008"]
    store.dispose()


def test_the_country_is_the_one_of_its_time() -> None:
    # Like the types: the country of an example is the newest one before its target
    # was first touched (it was the user's latest country, later moves included).
    rows = [("u", 1, "view", 1.0, "FR"), ("u", 2, "view", 2.0, None), ("u", 3, "view", 3.0, "DE")]
    rows.append(("u", 4, "view", 4.0, None))
    seqs = build_sequences(rows, country_buckets=64)
    fr, de = (country_bucket(c, 64) for c in ("FR", "DE"))
    assert fr != de and seqs["u"].country == de
    assert make_examples(seqs.values(), max_history=4).country.tolist() == [fr, fr, de]
    train, _ = split_leave_last_out(seqs)
    assert train["u"].country == de
    three = build_sequences(rows[:3], country_buckets=64)
    train, held_out = split_leave_last_out(three)
    assert held_out == {"u": 3} and train["u"].country == fr
