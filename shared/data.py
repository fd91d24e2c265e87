"""CSV formats for product catalogs and behaviour events.

Loading is all-or-nothing: a file is validated completely before anything is
returned, and one bad row rejects the whole file with a `DataFormatError` that
lists every bad row by its physical line number. Operators fix a file in one
pass, and no caller ever stores half of a rejected file.

Formats (UTF-8, optional BOM, comma-separated, RFC 4180 quoting):

* ``catalog.csv``: ``item_id,title,category,material,gemstone,style_tags,price_usd``.
  Only ``item_id`` is required; other columns may be absent or empty. ``style_tags``
  is ``|``-separated.
* ``events.csv``: ``user_id,item_id,event_type,timestamp,country,region``.
  ``country`` and ``region`` are optional columns. ``timestamp`` is ISO 8601
  (naive means UTC) or Unix seconds.

Columns not named above are ignored, so exports with extra columns still load.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from shared.schemas import (
    EVENT_TYPES,
    CatalogItem,
    EventIn,
    as_utc,
    future_timestamp_problem,
    normalize_country,
)

CATALOG_COLUMNS: tuple[str, ...] = (
    "item_id",
    "title",
    "category",
    "material",
    "gemstone",
    "style_tags",
    "price_usd",
)
CATALOG_REQUIRED: tuple[str, ...] = ("item_id",)
EVENT_COLUMNS: tuple[str, ...] = (
    "user_id",
    "item_id",
    "event_type",
    "timestamp",
    "country",
    "region",
)
EVENT_REQUIRED: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp")
STYLE_TAG_SEPARATOR = "|"
MAX_ERRORS_IN_MESSAGE = 20

# Mirrors shared.schemas.Identifier so ids are rejected here with a line number,
# not later when a row becomes an EventIn.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$")
_ID_MAX_LEN = 128
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)
_EVENT_TYPES_TEXT = ", ".join(EVENT_TYPES)

Source = str | Path | TextIO


@dataclass(frozen=True)
class RowError:
    """One problem in a file. `line` is the 1-based physical line (header is line 1)."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class DataFormatError(ValueError):
    """A file was rejected; `errors` holds every problem found, in file order."""

    def __init__(self, errors: list[RowError], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        shown = "\n".join(str(e) for e in self.errors[:MAX_ERRORS_IN_MESSAGE])
        more = len(self.errors) - MAX_ERRORS_IN_MESSAGE
        if more > 0:
            shown += f"\n... and {more} more"
        where = f"{source}: " if source else ""
        super().__init__(f"{where}rejected, {len(self.errors)} problem(s), nothing loaded\n{shown}")


@dataclass(frozen=True, slots=True)
class EventRecord:
    user_id: str
    item_id: str
    event_type: str
    timestamp: datetime  # always tz-aware UTC
    country: str | None = None
    region: str | None = None


# --------------------------------------------------------------------------- timestamps


def parse_timestamp(value: str) -> datetime:
    """ISO 8601 (naive = UTC) or Unix seconds (int or float) -> aware UTC datetime.

    Raises ValueError with a human-readable reason.
    """
    text = value.strip()
    if not text:
        raise ValueError("missing timestamp")
    if _NUMBER_RE.match(text):
        seconds = float(text)
        if not math.isfinite(seconds):
            raise ValueError(f"timestamp {value!r} is not a finite number")
        if abs(seconds) >= 1e11:
            # 13-digit values are almost always milliseconds; say so instead of "year 55000".
            raise ValueError(
                f"timestamp {value!r} is out of range for Unix seconds (milliseconds?)"
            )
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise ValueError(f"timestamp {value!r} is out of range") from exc
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"timestamp {value!r} is neither ISO 8601 nor Unix seconds") from exc
    return as_utc(parsed, f"timestamp {value!r} is")


def format_timestamp(value: datetime) -> str:
    """ISO 8601 in UTC with a `Z` suffix; naive datetimes are taken as UTC."""
    # isoformat on a naive value is ~10x faster than strftime; it matters at 300k rows.
    if value.tzinfo is not None and value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat() + "Z"


# --------------------------------------------------------------------------- reading


def _source_name(source: Source) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return str(getattr(source, "name", "<stream>"))


def _load_text(source: Source) -> TextIO:
    """Whole file as text. Paths are decoded here so a bad byte gets a line number."""
    if not isinstance(source, str | Path):
        return source
    raw = Path(source).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataFormatError(
            [RowError(line, f"not valid UTF-8 (byte {raw[exc.start]:#04x})")], str(source)
        ) from exc
    return io.StringIO(text, newline="")


def _records(fh: TextIO, errors: list[RowError]) -> Iterator[tuple[int, list[str]]]:
    """Yield (first physical line, fields) per CSV record, skipping blank lines.

    Malformed records go to `errors`; the reader resyncs on the next line.
    """
    reader = csv.reader(fh, strict=True)
    prev_line = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            errors.append(RowError(prev_line + 1, f"malformed CSV: {exc}"))
            if reader.line_num == prev_line:  # no progress: stop rather than spin
                return
            prev_line = reader.line_num
            continue
        start = prev_line + 1
        prev_line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        yield start, row


def _read_header(
    records: Iterator[tuple[int, list[str]]],
    required: tuple[str, ...],
    errors: list[RowError],
) -> tuple[dict[str, int], int] | None:
    """(column name -> index, field count). None when the header is unusable."""
    first = next(records, None)
    if first is None:
        if not errors:
            errors.append(RowError(1, f"empty file, expected a header with {', '.join(required)}"))
        return None
    line, row = first
    names = [cell.strip().lower() for cell in row]
    if names:
        names[0] = names[0].lstrip("\ufeff")  # BOM left in by a caller-opened stream
    columns: dict[str, int] = {}
    ok = True
    for index, name in enumerate(names):
        if not name:
            continue
        if name in columns:
            errors.append(RowError(line, f"duplicate column {name!r} in header"))
            ok = False
        else:
            columns[name] = index
    for name in required:
        if name not in columns:
            errors.append(RowError(line, f"missing required column {name!r} in header"))
            ok = False
    if not ok:
        return None
    return columns, len(names)


def _id_problem(field: str, value: str) -> str | None:
    if not value:
        return f"missing {field}"
    if len(value) > _ID_MAX_LEN:
        return f"{field} is longer than {_ID_MAX_LEN} characters"
    if not _ID_RE.match(value):
        return (
            f"{field} {value!r} must start with a letter or digit and contain only "
            "letters, digits, '_', '.', ':', '-'"
        )
    return None


def _pydantic_reasons(exc: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in err['loc']) or 'row'}: {err['msg']}" for err in exc.errors()
    ]


def _cell(row: list[str], columns: dict[str, int], name: str) -> str:
    index = columns.get(name)
    return row[index].strip() if index is not None else ""


def read_catalog_csv(source: Source) -> list[CatalogItem]:
    """Parse a catalog file; raise DataFormatError listing every bad row.

    `source` is a path (str or Path) or an open text stream.
    """
    name = _source_name(source)
    errors: list[RowError] = []
    records = _records(_load_text(source), errors)
    header = _read_header(records, CATALOG_REQUIRED, errors)
    if header is None:
        raise DataFormatError(errors, name)
    columns, width = header
    items: list[CatalogItem] = []
    first_line: dict[str, int] = {}
    for line, row in records:
        if len(row) != width:
            errors.append(RowError(line, f"expected {width} fields, got {len(row)}"))
            continue
        row_ok = True
        item_id = _cell(row, columns, "item_id")
        problem = _id_problem("item_id", item_id)
        if problem:
            errors.append(RowError(line, problem))
            row_ok = False
        elif item_id in first_line:
            errors.append(
                RowError(
                    line, f"duplicate item_id {item_id!r} (first on line {first_line[item_id]})"
                )
            )
            row_ok = False
        else:
            first_line[item_id] = line
        price: float | None = None
        price_text = _cell(row, columns, "price_usd")
        if price_text:
            try:
                price = float(price_text)
            except ValueError:
                errors.append(RowError(line, f"price_usd {price_text!r} is not a number"))
                row_ok = False
            else:
                if not math.isfinite(price) or price < 0:
                    errors.append(RowError(line, f"price_usd {price_text!r} must be >= 0"))
                    row_ok = False
        if not row_ok:
            continue
        tags_text = _cell(row, columns, "style_tags")
        tags = [t for t in (p.strip() for p in tags_text.split(STYLE_TAG_SEPARATOR)) if t]
        try:
            item = CatalogItem(
                item_id=item_id,
                title=_cell(row, columns, "title") or None,
                category=_cell(row, columns, "category") or None,
                material=_cell(row, columns, "material") or None,
                gemstone=_cell(row, columns, "gemstone") or None,
                style_tags=tags,
                price_usd=price,
            )
        except ValidationError as exc:
            errors.extend(RowError(line, reason) for reason in _pydantic_reasons(exc))
            continue
        items.append(item)
    if errors:
        raise DataFormatError(errors, name)
    return items


def read_events_csv(
    source: Source,
    *,
    known_item_ids: Collection[str] | None = None,
    refuse_future: bool = False,
) -> list[EventRecord]:
    """Parse an events file; raise DataFormatError listing every bad row.

    With `known_item_ids`, an item id outside it is an error; with `refuse_future`, a
    time more than a day past this machine's clock is (what a node stores,
    `shared.schemas.MAX_EVENT_FUTURE`). Exact duplicate events (same user, item,
    type and instant) are returned once, first wins.
    """
    now = datetime.now(UTC)
    name = _source_name(source)
    known: Collection[str] | None = known_item_ids
    if known is not None and not isinstance(known, set | frozenset | dict):
        known = frozenset(known)  # O(1) lookups for lists/tuples
    errors: list[RowError] = []
    records = _records(_load_text(source), errors)
    header = _read_header(records, EVENT_REQUIRED, errors)
    if header is None:
        raise DataFormatError(errors, name)
    columns, width = header
    i_user, i_item = columns["user_id"], columns["item_id"]
    i_type, i_ts = columns["event_type"], columns["timestamp"]
    i_country, i_region = columns.get("country"), columns.get("region")
    events: list[EventRecord] = []
    seen: set[tuple[str, str, str, datetime]] = set()
    for line, row in records:
        if len(row) != width:
            errors.append(RowError(line, f"expected {width} fields, got {len(row)}"))
            continue
        start_errors = len(errors)
        user_id = row[i_user].strip()
        item_id = row[i_item].strip()
        for field, value in (("user_id", user_id), ("item_id", item_id)):
            problem = _id_problem(field, value)
            if problem:
                errors.append(RowError(line, problem))
        if item_id and known is not None and item_id not in known:
            errors.append(RowError(line, f"unknown item_id {item_id!r}"))
        raw_type = row[i_type].strip()
        event_type = raw_type.lower()
        if event_type not in _EVENT_TYPE_SET:
            reason = (
                f"event_type {raw_type!r} is not one of {_EVENT_TYPES_TEXT}"
                if raw_type
                else "missing event_type"
            )
            errors.append(RowError(line, reason))
        timestamp: datetime | None = None
        try:
            timestamp = parse_timestamp(row[i_ts])
        except ValueError as exc:
            errors.append(RowError(line, str(exc)))
        if timestamp is not None and refuse_future:
            problem = future_timestamp_problem(timestamp, now)
            if problem:
                errors.append(RowError(line, problem))
        country = None
        if i_country is not None:
            try:
                country = normalize_country(row[i_country])
            except ValueError as exc:
                errors.append(RowError(line, str(exc)))
        region = (row[i_region].strip() or None) if i_region is not None else None
        if region is not None:
            problem = _id_problem("region", region)
            if problem:
                errors.append(RowError(line, problem))
        if len(errors) != start_errors or timestamp is None:
            continue
        key = (user_id, item_id, event_type, timestamp)
        if key in seen:
            continue
        seen.add(key)
        events.append(EventRecord(user_id, item_id, event_type, timestamp, country, region))
    if errors:
        raise DataFormatError(errors, name)
    return events


def event_record_to_event_in(e: EventRecord) -> EventIn:
    """The storefront wire form of a record (region is implied by the receiving node)."""
    return EventIn(
        user_id=e.user_id,
        item_id=e.item_id,
        event_type=e.event_type,  # type: ignore[arg-type]  # validated against EVENT_TYPES
        timestamp=e.timestamp,
        country=e.country,
    )


# --------------------------------------------------------------------------- writing


@contextmanager
def atomic_text_file(path: str | Path) -> Iterator[TextIO]:
    """A UTF-8 text file that appears at `path` whole or not at all: written to a temp
    file beside it and renamed over it when the block ends without an error."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            yield fh
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: str | Path, header: tuple[str, ...], rows: Iterable[list[str]]) -> None:
    """Write via a temp file + rename so readers never see a half-written CSV."""
    with atomic_text_file(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _format_price(price: float | None) -> str:
    return "" if price is None else repr(float(price))


def _catalog_rows(items: Iterable[CatalogItem]) -> Iterator[list[str]]:
    for item in items:
        for tag in item.style_tags:
            if STYLE_TAG_SEPARATOR in tag:
                raise ValueError(
                    f"item {item.item_id!r}: style tag {tag!r} contains {STYLE_TAG_SEPARATOR!r}"
                )
        yield [
            item.item_id,
            item.title or "",
            item.category or "",
            item.material or "",
            item.gemstone or "",
            STYLE_TAG_SEPARATOR.join(item.style_tags),
            _format_price(item.price_usd),
        ]


def write_catalog_csv(path: str | Path, items: Iterable[CatalogItem]) -> None:
    _write_atomic(path, CATALOG_COLUMNS, _catalog_rows(items))


def write_events_csv(
    path: str | Path, events: Iterable[EventRecord], *, include_region: bool = True
) -> None:
    """Write events; `include_region=False` gives a node's own file (no region column)."""
    header = EVENT_COLUMNS if include_region else EVENT_COLUMNS[:-1]

    def rows() -> Iterator[list[str]]:
        for e in events:
            row = [
                e.user_id,
                e.item_id,
                e.event_type,
                format_timestamp(e.timestamp),
                e.country or "",
            ]
            if include_region:
                row.append(e.region or "")
            yield row

    _write_atomic(path, header, rows())
