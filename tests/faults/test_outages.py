"""A server taken away in the middle of a load (issue 5: 2 and 3), on throwaway servers of the test's own."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import (DECODER, Outcome, assert_nothing_lost, fleet_entries, log_entries, publish_entries,
                                   scrape, stored_keys, wait_or_explain, with_metrics)
from tests.helpers import ServiceProcess, http_get, pending_count, row_count, wait_until

OUTAGE_S = 10.0
SETTLE_S = 1.0  # after the server is gone: batches committed just before may still be acknowledged


def _all_stored(client, keys, pg_url, rows: int) -> bool:
    return row_count(pg_url) == rows and pending_count(client, keys["stream"], keys["group"]) == 0


def test_postgres_stopped_for_10_seconds_mid_load(fault_env, redis_client, throwaway_postgres, keys):
    pg = throwaway_postgres
    entries = fleet_entries(30_000, seed=2)
    env, metrics = with_metrics(dict(fault_env, POSTGRES_URL=pg.url, BATCH_SIZE="500"))
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        published = publish_entries(redis_client, keys["stream"], entries[:10_000])
        wait_or_explain(proc, lambda: row_count(pg.url) >= 5_000, 60, 0.01, "half of the first 10,000 rows")
        pg.stop("fast")
        down_at = time.monotonic()
        # Entries keep arriving while the database is away.
        published.update(publish_entries(redis_client, keys["stream"], entries[10_000:20_000]))
        time.sleep(max(down_at + SETTLE_S - time.monotonic(), 0))
        acks = scrape(metrics, "processor_acks_total")
        pending = [pending_count(redis_client, keys["stream"], keys["group"])]
        readyz: set[int] = set()
        while time.monotonic() < down_at + OUTAGE_S:
            assert scrape(metrics, "processor_acks_total") == acks, "acknowledged while PostgreSQL was down"
            pending.append(pending_count(redis_client, keys["stream"], keys["group"]))
            readyz.add(http_get(metrics + "/readyz")[0])
            assert proc.proc.poll() is None, proc.output
            time.sleep(0.2)
        pg.start()
        back_at = time.monotonic()
        published.update(publish_entries(redis_client, keys["stream"], entries[20_000:]))
        wait_or_explain(proc, lambda: _all_stored(redis_client, keys, pg.url, 30_000), 120, 0.1, "all 30,000 rows")
        print(f"measured: pending while down {pending[0]}..{pending[-1]}, acks frozen at {acks:.0f}, "
              f"readyz {sorted(readyz)}, all rows {time.monotonic() - back_at:.1f}s after PostgreSQL was back")
        wait_until(lambda: http_get(metrics + "/readyz")[0] == 200, 30, 0.1, "ready again")
        dead = scrape(metrics, "processor_records_dead_lettered_total", {"reason": "db_rejected"})
        assert proc.proc.poll() is None, proc.output
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert len(log_entries(proc, "processor starting")) == 1  # never exited, never restarted
    assert pending == sorted(pending) and pending[0] > 0, pending  # reading paused; nothing acknowledged
    assert 503 in readyz, readyz
    assert dead in (None, 0.0)
    assert assert_nothing_lost(redis_client, pg.url, keys, published) == Outcome(30_000, {}, {})


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_redis_restarted_mid_load(fault_env, pg_url, keys, throwaway_redis_factory, appendonly):
    server = throwaway_redis_factory(appendonly=appendonly)
    client = server.client()
    entries = fleet_entries(20_000, seed=3)
    env = dict(fault_env, REDIS_URL=server.url, BATCH_SIZE="500")
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        before = publish_entries(client, keys["stream"], entries[:10_000])
        wait_or_explain(proc, lambda: row_count(pg_url) >= 3_000, 60, 0.01, "3,000 rows")
        server.restart()
        back_at = time.monotonic()
        after = publish_entries(client, keys["stream"], entries[10_000:])
        wanted = _keys_of(after) if not appendonly else _keys_of({**before, **after})
        wait_or_explain(proc, lambda: pending_count(client, keys["stream"], keys["group"]) == 0
                        and wanted <= stored_keys(pg_url), 120, 0.2, "the entries Redis kept, stored")
        print(f"measured: settled {time.monotonic() - back_at:.1f}s after the restart")
        assert proc.proc.poll() is None, proc.output
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        recreated = log_entries(proc, "disappeared; recreating it from id 0", "warning")
    if appendonly:
        # The group survived with the stream: nothing to recreate, every entry stored.
        assert recreated == []
        outcome = assert_nothing_lost(client, pg_url, keys, {**before, **after})
    else:
        # Redis came back empty (NOGROUP): the group was recreated and what came after was stored;
        # what was lost with Redis is out of scope, but nothing stored was never published.
        assert recreated
        outcome = assert_nothing_lost(client, pg_url, keys, {**before, **after}, gone=before)
    client.close()
    print(f"measured: {outcome.rows} rows, group recreated: {bool(recreated)}")
    assert outcome.dead_letters == {}
    assert outcome.rows == 20_000 if appendonly else 13_000 <= outcome.rows <= 20_000


def _keys_of(published) -> set:
    """The (device_id, ts) of fleet entries (all valid)."""
    return {(p.device_id, p.ts) for p in (DECODER.decode(f) for f in published.values())}


def test_nogroup_on_the_read_that_carries_acknowledgements_means_the_stream_is_gone(redis_url, redis_client, keys):
    from processor.core.consumer import StreamConsumer, redis_client as make_client
    from processor.core.errors import StreamGoneError

    client = make_client(redis_url, block_ms=200)
    consumer = StreamConsumer(client=client, stream=keys["stream"], group=keys["group"], consumer=keys["consumer"],
                              batch_size=10, block_ms=200)
    consumer.ensure_group()
    assert consumer.read(block_ms=10) == []  # own pending list done: reading new entries from now on
    redis_client.delete(keys["stream"])  # what a Redis restart without persistence leaves
    redis_client.xadd(keys["stream"], {"payload": b"{}"})  # and the producer carries on
    try:
        with pytest.raises(StreamGoneError):
            consumer.read(block_ms=10, ack=["1-0"])
    finally:
        client.close()
