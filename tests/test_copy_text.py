"""The direct COPY's text built with one ``orjson.dumps`` for a whole batch's attributes (issue 13).

``_copy_text_fast`` cuts the batch's attributes list apart at ``},{`` when that is exact,
else formats them row by row. Both ways must give the same bytes, and the rows must
come back from PostgreSQL as they went in.
"""

from __future__ import annotations

import enum
import itertools
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import psycopg2
import pytest

from processor.core import writer as writer_module
from processor.core.types import INSERTED, Position, Record
from processor.core.writer import Writer

BASE = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
TRICKY: list[Any] = [
    {"a": "},{"}, {"a": [{}, {}]}, {}, None, {"b": "\\"}, {"c": "é\t\n\r\"'"}, {"d": {"e": {"f": 1}}},
    {"g": "}"}, {"h": "{"}, {"x": [1, {"y": "},{"}]}, {"copy null": "\\N"}, {"k": "\\u0041"},
    {"16": 9007199254740991, "78": "0a1b", "n": None, "t": True, "f": -2.5}, {"z": "}", "y": "{"},
]


def records(attributes: list[Any]) -> list[Record]:
    return [Record(f"{1709294400000 + i}-0", Position("356307042441013", BASE + timedelta(seconds=i), 54.5, 25.25,
                                                      100.0, None, 3.5, 7, None, 0, a))
            for i, a in enumerate(attributes)]


def row_by_row(batch: list[Record]) -> bytes:
    """The reference: scalars as _copy_text_fast formats them, attributes one dumps() a row."""
    text = orjson.dumps([r.position[:10] for r in batch])
    rows = text[2:-2].replace(b",null", b",\\N").replace(b'"', b"").replace(b",", b"\t").split(b"]\t[")
    attrs = [orjson.dumps(r.position.attributes) if r.position.attributes else b"{}" for r in batch]
    return b"".join(row + b"\t" + a.replace(b"\\", b"\\\\") + b"\n" for row, a in zip(rows, attrs))


@pytest.mark.parametrize("size", [1, 2, 3, 15])
def test_one_dumps_and_row_by_row_give_the_same_text(size: int) -> None:
    ways = {"cut": 0, "row by row": 0}
    for combination in itertools.permutations(TRICKY, size) if size < 3 else \
            (TRICKY[i:i + size] for i in range(len(TRICKY))):
        batch = records(list(combination))
        cut = writer_module._attributes_inner([r.position for r in batch])
        ways["cut" if cut is not None else "row by row"] += 1
        assert writer_module._copy_text_fast(batch) == row_by_row(batch), combination
    assert ways["cut"] and ways["row by row"], ways  # both ways were taken


def test_an_empty_batch_is_no_text() -> None:
    assert writer_module._attributes_inner([]) is None


def test_tricky_attributes_come_back_from_postgresql(pg_url: str) -> None:
    batch = records(TRICKY * 3)  # 45 rows: the COPY way
    writer = Writer(dsn=pg_url, threads=1)
    try:
        assert writer.write(batch) == [INSERTED] * len(batch)
    finally:
        writer.close(5)
    conn = psycopg2.connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT attributes FROM positions ORDER BY ts")
            stored = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    assert stored == [a or {} for a in TRICKY * 3]


class _Level(enum.IntEnum):
    HIGH = 1


ODD_NUMBERS: list[Any] = [float("nan"), float("inf"), float("-inf"), True, False, "1.5", "t", Decimal("1.5"),
                          [1], [], {"a": 1}, {}, _Level.HIGH, BASE, 2**70, -(2**70), None, 0, -0.0]


@pytest.mark.parametrize("column", range(2, 10), ids=lambda c: Position._fields[c])
def test_the_fast_way_declines_what_it_could_get_wrong(column: int) -> None:
    # _copy_text_fast reads the numbers' types off orjson's text instead of checking each one:
    # with any odd value in any number column it must decline, or give the row-by-row text.
    taken = 0
    required = column in (2, 3)  # latitude and longitude: None is no value of theirs (not null)
    for odd in ODD_NUMBERS:
        if odd is None and required:
            continue
        batch = records([{"a": 1}] * 3)
        position = batch[1].position
        batch[1] = batch[1]._replace(position=position._replace(**{Position._fields[column]: odd}))
        fast = writer_module._copy_text_fast(batch)
        if fast is not None:
            taken += 1
            assert fast == writer_module._copy_text(batch, numbered=False), odd
    assert taken == (2 if required else 3)  # None, 0 and -0.0 are ordinary numbers: the fast way takes them
