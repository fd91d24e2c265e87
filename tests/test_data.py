"""CSV formats: parsing, all-or-nothing validation with line numbers, round trips."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.data import (
    DataFormatError,
    EventRecord,
    RowError,
    event_record_to_event_in,
    parse_timestamp,
    read_catalog_csv,
    read_events_csv,
    write_catalog_csv,
    write_events_csv,
)
from shared.schemas import CatalogItem

CATALOG_HEADER = "item_id,title,category,material,gemstone,style_tags,price_usd\n"
EVENTS_HEADER = "user_id,item_id,event_type,timestamp,country,region\n"


def _write(tmp_path: Path, name: str, text: str, *, bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _errors(exc: pytest.ExceptionInfo[DataFormatError]) -> list[tuple[int, str]]:
    return [(e.line, e.reason) for e in exc.value.errors]


# --------------------------------------------------------------------------- catalog


def test_catalog_with_empty_cells_parses(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "catalog.csv",
        CATALOG_HEADER
        + "R-1,Solitaire Ring,Ring,Platinum,diamond,classic|bridal,2450\n"
        + "R-2,,,,,,\n"
        + 'R-3,"Pearl, drop",earrings,,pearl, vintage || Classic ,99.5\n',
        bom=True,
    )
    items = read_catalog_csv(path)
    assert [i.item_id for i in items] == ["R-1", "R-2", "R-3"]
    assert items[0].category == "ring" and items[0].material == "platinum"
    assert items[0].style_tags == ["classic", "bridal"] and items[0].price_usd == 2450.0
    assert items[1] == CatalogItem(item_id="R-2")
    assert items[2].title == "Pearl, drop" and items[2].style_tags == ["vintage", "classic"]


def test_catalog_with_missing_and_all_empty_columns(tmp_path: Path) -> None:
    # Only item_id + title in the header; gemstone column present but empty everywhere.
    only_ids = _write(tmp_path, "a.csv", "item_id,title\nA1,One\nA2,\n")
    assert [(i.item_id, i.title) for i in read_catalog_csv(only_ids)] == [
        ("A1", "One"),
        ("A2", None),
    ]
    empty_col = _write(tmp_path, "b.csv", "item_id,gemstone,extra\nB1,,x\nB2,,y\n\n")
    items = read_catalog_csv(empty_col)
    assert [i.gemstone for i in items] == [None, None]


def test_catalog_reports_every_error_with_line_numbers(tmp_path: Path) -> None:
    text = (
        CATALOG_HEADER
        + "R-1,Ring,ring,gold,,,100\n"  # line 2 ok
        + ",No id,ring,gold,,,100\n"  # line 3 missing id
        + '"R-2","multi\nline title",ring,gold,,,10\n'  # lines 4-5 ok
        + "R-1,Again,ring,gold,,,100\n"  # line 6 duplicate of line 2
        + "R-3,Cheap,ring,gold,,,abc\n"  # line 7 bad price
        + "R-4,Short,ring\n"  # line 8 column count
        + "bad id,x,ring,gold,,,1\n"  # line 9 bad identifier
        + "R-5,Neg,ring,gold,,,-3\n"  # line 10 negative price
    )
    with pytest.raises(DataFormatError) as exc:
        read_catalog_csv(_write(tmp_path, "c.csv", text))
    errors = _errors(exc)
    assert [line for line, _ in errors] == [3, 6, 7, 8, 9, 10]
    assert errors[0] == (3, "missing item_id")
    assert errors[1] == (6, "duplicate item_id 'R-1' (first on line 2)")
    assert "not a number" in errors[2][1]
    assert errors[3] == (8, "expected 7 fields, got 3")
    assert "line 6: duplicate item_id 'R-1' (first on line 2)" in str(exc.value)


def test_catalog_header_problems(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError) as exc:
        read_catalog_csv(_write(tmp_path, "c.csv", "title,category\nx,ring\n"))
    assert _errors(exc) == [(1, "missing required column 'item_id' in header")]
    with pytest.raises(DataFormatError) as exc:
        read_catalog_csv(_write(tmp_path, "d.csv", "item_id,title,title\nA,b,c\n"))
    assert _errors(exc) == [(1, "duplicate column 'title' in header")]
    with pytest.raises(DataFormatError) as exc:
        read_catalog_csv(_write(tmp_path, "e.csv", ""))
    assert _errors(exc)[0][0] == 1


def test_catalog_invalid_utf8_is_reported_with_line(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(b"item_id,title\nA,ok\nB,caf\xe9\n")
    with pytest.raises(DataFormatError) as exc:
        read_catalog_csv(path)
    assert exc.value.errors[0].line == 3


# --------------------------------------------------------------------------- events


def test_events_one_bad_row_rejects_whole_file(tmp_path: Path) -> None:
    good = "u1,R-1,view,2026-11-01T10:00:00Z,de,EU\n"
    text = EVENTS_HEADER + good * 3 + "u1,R-1,buy,2026-11-01T10:00:00Z,DE,EU\n" + good
    with pytest.raises(DataFormatError) as exc:
        read_events_csv(_write(tmp_path, "e.csv", text))
    assert _errors(exc) == [
        (5, "event_type 'buy' is not one of view, click, add_to_cart, purchase"),
    ]
    assert isinstance(exc.value, ValueError)


def test_events_each_error_kind(tmp_path: Path) -> None:
    text = (
        EVENTS_HEADER
        + "u1,R-1,view,2026-11-01T10:00:00Z,DE,EU\n"  # 2 ok
        + ",R-1,view,2026-11-01T10:00:00Z,DE,EU\n"  # 3 missing user
        + "u1,ZZZ,view,2026-11-01T10:00:00Z,DE,EU\n"  # 4 unknown item
        + "u1,R-1,view,yesterday,DE,EU\n"  # 5 bad timestamp
        + "u1,R-1,view,1762000000000,DE,EU\n"  # 6 milliseconds
        + "u1,R-1,view,2026-11-01T10:00:00Z,DE\n"  # 7 column count
        + "u1,R-1,,2026-11-01T10:00:00Z,DE,EU\n"  # 8 missing type
        + "u1,R-1,view,2026-11-01T10:00:00Z,TOOLONGCC,EU\n"  # 9 country
    )
    with pytest.raises(DataFormatError) as exc:
        read_events_csv(_write(tmp_path, "e.csv", text), known_item_ids=["R-1"])
    errors = _errors(exc)
    assert [line for line, _ in errors] == [3, 4, 5, 6, 7, 8, 9]
    assert errors[0] == (3, "missing user_id")
    assert errors[1] == (4, "unknown item_id 'ZZZ'")
    assert "neither ISO 8601 nor Unix seconds" in errors[2][1]
    assert "milliseconds" in errors[3][1]
    assert errors[4] == (7, "expected 6 fields, got 5")
    assert errors[5] == (8, "missing event_type")


def test_events_missing_required_header_column(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError) as exc:
        read_events_csv(_write(tmp_path, "e.csv", "user_id,item_id,timestamp\nu,i,1\n"))
    assert _errors(exc) == [(1, "missing required column 'event_type' in header")]


def test_events_optional_columns_timestamps_and_dedupe() -> None:
    text = (
        "user_id,item_id,event_type,timestamp\n"
        "u1,R-1,view,1762000000\n"
        "u1,R-1,view,2025-11-01T12:26:40Z\n"  # same instant as above: duplicate
        "u1,R-1,click,1762000000.5\n"
        "u1,R-1,add_to_cart,2025-11-01 12:30:00\n"  # naive = UTC
        "u1,R-1,purchase,2025-11-01T14:31:00+02:00\n"
        "u1,R-1,purchase,2025-11-01T14:31:00+02:00\n"  # exact duplicate
    )
    events = read_events_csv(io.StringIO(text))
    assert [e.event_type for e in events] == ["view", "click", "add_to_cart", "purchase"]
    assert events[0].timestamp == datetime(2025, 11, 1, 12, 26, 40, tzinfo=UTC)
    assert events[1].timestamp == datetime(2025, 11, 1, 12, 26, 40, 500000, tzinfo=UTC)
    assert events[2].timestamp == datetime(2025, 11, 1, 12, 30, tzinfo=UTC)
    assert events[3].timestamp == datetime(2025, 11, 1, 12, 31, tzinfo=UTC)
    assert all(e.timestamp.tzinfo is UTC for e in events)
    assert all(e.country is None and e.region is None for e in events)


def test_parse_timestamp_variants() -> None:
    expected = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    assert parse_timestamp("1793491200") == expected
    assert parse_timestamp(" 1793491200.0 ") == expected
    assert parse_timestamp("2026-11-01T00:00:00Z") == expected
    assert parse_timestamp("2026-11-01T00:00:00") == expected
    assert parse_timestamp("2026-11-01T09:00:00+09:00") == expected
    assert parse_timestamp("2026-11-01") == expected
    for bad in ("", "nan", "2026-13-01", "1e20", "soon"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_error_message_is_capped() -> None:
    text = EVENTS_HEADER + "u,i,nope,1,,\n" * 30
    with pytest.raises(DataFormatError) as exc:
        read_events_csv(io.StringIO(text))
    assert len(exc.value.errors) == 30
    message = str(exc.value)
    assert "line 21:" in message and "line 22:" not in message
    assert "and 10 more" in message


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path: Path) -> None:
    items = [
        CatalogItem(
            item_id="R-1",
            title='Ring "A", gold',
            category="ring",
            material="gold",
            gemstone="ruby",
            style_tags=["vintage", "bridal"],
            price_usd=1234.56,
        ),
        CatalogItem(item_id="R-2"),
    ]
    write_catalog_csv(tmp_path / "catalog.csv", items)
    assert read_catalog_csv(tmp_path / "catalog.csv") == items

    t0 = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
    events = [
        EventRecord("u1", "R-1", "view", t0, "DE", "EU"),
        EventRecord("u1", "R-1", "click", t0 + timedelta(seconds=5, microseconds=7), None, "EU"),
        EventRecord(
            "u2", "R-2", "purchase", datetime(2026, 11, 1, 12, tzinfo=timezone(timedelta(hours=2)))
        ),
    ]
    write_events_csv(tmp_path / "events.csv", events)
    back = read_events_csv(tmp_path / "events.csv", known_item_ids={"R-1", "R-2"})
    assert [(e.user_id, e.item_id, e.event_type, e.country, e.region) for e in back] == [
        (e.user_id, e.item_id, e.event_type, e.country, e.region) for e in events
    ]
    assert [e.timestamp for e in back] == [e.timestamp for e in events]

    write_events_csv(tmp_path / "node.csv", events, include_region=False)
    first_line = (tmp_path / "node.csv").read_text().splitlines()[0]
    assert first_line == "user_id,item_id,event_type,timestamp,country"
    assert all(e.region is None for e in read_events_csv(tmp_path / "node.csv"))


def test_writer_rejects_separator_in_tag(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_catalog_csv(tmp_path / "c.csv", [CatalogItem(item_id="A", style_tags=["a|b"])])
    assert not (tmp_path / "c.csv").exists()


def test_event_record_to_event_in() -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    event = event_record_to_event_in(EventRecord("u-1", "R-1", "click", t0, "DE", "EU"))
    assert event.model_dump() == {
        "user_id": "u-1",
        "item_id": "R-1",
        "event_type": "click",
        "timestamp": t0,
        "country": "DE",
    }


def test_row_error_str() -> None:
    assert str(RowError(7, "bad")) == "line 7: bad"
