"""The invariant itself can fail: each way of losing or misfiling an entry trips it."""

from __future__ import annotations

import psycopg2
import pytest

from processor.core.deadletter import DeadLetter, DeadLetters
from tests.faults.conftest import Outcome, assert_nothing_lost, publish_entries
from tests.helpers import BASE_MS, payload

GOOD = [payload("inv-a", BASE_MS), payload("inv-b", BASE_MS), payload("inv-c", BASE_MS)]
BAD = b"{broken"


def _store(pg_url: str, device_id: str, ts_ms: int) -> None:
    conn = psycopg2.connect(pg_url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO positions (device_id, ts, latitude, longitude) "
                    "VALUES (%s, to_timestamp(%s / 1000.0), 1, 1)", (device_id, ts_ms))
    conn.close()


@pytest.fixture
def settled(redis_client, pg_url, keys):
    """Three positions stored, one malformed entry dead-lettered, all acknowledged: as the service leaves it."""
    published = publish_entries(redis_client, keys["stream"], [{b"payload": p} for p in GOOD + [BAD]])
    redis_client.xgroup_create(keys["stream"], keys["group"], id="0")
    redis_client.xreadgroup(keys["group"], "c", {keys["stream"]: ">"})
    for device in ("inv-a", "inv-b", "inv-c"):
        _store(pg_url, device, BASE_MS)
    ids = list(published)
    letters = DeadLetters(client=redis_client, stream=keys["dead"], source_stream=keys["stream"], group=keys["group"])
    letters.add([DeadLetter(ids[3], BAD, "invalid_json", "broken", 1)])
    redis_client.xack(keys["stream"], keys["group"], *ids)
    return published, letters


def test_a_settled_load_passes(redis_client, pg_url, keys, settled):
    published, _ = settled
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published)
    assert outcome == Outcome(3, {"invalid_json": 1}, {list(published)[3]: 1})


def test_a_position_refused_downstream_passes_when_expected(redis_client, pg_url, pg_conn, keys, settled):
    published, letters = settled
    ids = list(published)
    with pg_conn.cursor() as cur:
        cur.execute("DELETE FROM positions WHERE device_id = 'inv-c'")
    letters.add([DeadLetter(ids[2], GOOD[2], "db_rejected", "check", 5)])
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published, letters={ids[2]: "db_rejected"})
    assert outcome.rows == 2 and outcome.dead_letters == {"invalid_json": 1, "db_rejected": 1}


def _lose_a_row(client, pg_conn, keys, published, letters):
    with pg_conn.cursor() as cur:
        cur.execute("DELETE FROM positions WHERE device_id = 'inv-b'")


def _store_one_never_published(client, pg_conn, keys, published, letters):
    with pg_conn.cursor() as cur:
        cur.execute("INSERT INTO positions (device_id, ts, latitude, longitude) VALUES ('ghost', now(), 1, 1)")


def _dead_letter_a_valid_one(client, pg_conn, keys, published, letters):
    with pg_conn.cursor() as cur:
        cur.execute("DELETE FROM positions WHERE device_id = 'inv-b'")
    letters.add([DeadLetter(list(published)[1], GOOD[1], "db_rejected", "refused", 5)])


def _leave_one_pending(client, pg_conn, keys, published, letters):
    client.xadd(keys["stream"], {"payload": payload("inv-d", BASE_MS)})
    client.xreadgroup(keys["group"], "c", {keys["stream"]: ">"})


def _wrong_reason(client, pg_conn, keys, published, letters):
    client.delete(keys["dead"])
    letters.add([DeadLetter(list(published)[3], BAD, "too_large", "wrong", 1)])


def _no_dead_letter(client, pg_conn, keys, published, letters):
    client.delete(keys["dead"])


def _twice_dead_lettered(client, pg_conn, keys, published, letters):
    letters.add([DeadLetter(list(published)[3], BAD, "invalid_json", "again", 2)])


def _payload_changed(client, pg_conn, keys, published, letters):
    client.delete(keys["dead"])
    letters.add([DeadLetter(list(published)[3], b"{other", "invalid_json", "broken", 1)])


@pytest.mark.parametrize("corrupt, complaint", [
    (_lose_a_row, "positions lost"), (_store_one_never_published, "never published"),
    (_dead_letter_a_valid_one, "dead-lettered as db_rejected, expected None"), (_leave_one_pending, "pending"),
    (_wrong_reason, "dead-lettered as too_large, expected invalid_json"), (_no_dead_letter, "not dead-lettered"),
    (_twice_dead_lettered, "more than once"), (_payload_changed, "changed"),
])
def test_each_violation_is_caught(redis_client, pg_url, pg_conn, keys, settled, corrupt, complaint):
    published, letters = settled
    corrupt(redis_client, pg_conn, keys, published, letters)
    with pytest.raises(AssertionError, match=complaint):
        assert_nothing_lost(redis_client, pg_url, keys, published)
