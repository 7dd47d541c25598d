"""The soak (issue 11): ten minutes at 2,000 positions/s while a chaos loop breaks things.

Not part of ``make test``: marked ``soak``, run by ``make soak`` (``SOAK_SECONDS`` shortens it).
The chaos loop, one action at a time with a pause between: lock ``positions``, revoke INSERT and
grant it again, restart PostgreSQL, restart Redis (AOF, so it keeps the stream), ``kill -9`` the
service and start it again. At the end: the invariant, no good entry dead-lettered, nothing
pending, and the figures (RSS, connections, what the chaos did) printed for docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import psycopg2
import pytest
import redis

from tests.faults.conftest import assert_nothing_lost, fleet_entries, wait_or_explain, with_metrics
from tests.helpers import ServiceProcess, admin, pending_count, row_count

SOAK_S = float(os.environ.get("SOAK_SECONDS", "600"))
RATE = 2000  # positions offered per second
TICK_S = 0.05  # the publisher sends RATE * TICK_S entries per tick
INVALID_EVERY = 200  # one malformed payload in so many: the dead-letter path is exercised too

pytestmark = pytest.mark.soak


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Publisher:
    """XADD at RATE with explicit, increasing ids, so a batch whose reply was lost (Redis restarting)
    can be sent again: Redis then refuses the ids it already has, and nothing is published twice."""

    client: redis.Redis
    stream: str
    payloads: list[bytes]
    published: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        base = int(time.time() * 1000)
        per_tick = int(RATE * TICK_S)
        n = 0
        next_tick = time.monotonic()
        while not self.stop.is_set() and n < len(self.payloads):
            chunk = [(f"{base + (n + i) // 2}-{(n + i) % 2}", self.payloads[n + i])
                     for i in range(min(per_tick, len(self.payloads) - n))]
            if self._send(chunk):
                n += len(chunk)
            next_tick += TICK_S
            self.stop.wait(max(next_tick - time.monotonic(), 0))

    def _send(self, chunk: list[tuple[str, bytes]]) -> bool:
        try:
            pipe = self.client.pipeline(transaction=True)
            for entry_id, body in chunk:
                pipe.xadd(self.stream, {b"payload": body}, id=entry_id)
            pipe.execute()
        except redis.ResponseError as exc:
            if "equal or smaller" not in str(exc):
                raise
            # the batch went in before its reply was lost (MULTI/EXEC: all or nothing)
        except (redis.ConnectionError, redis.TimeoutError):
            self.failures += 1
            time.sleep(0.2)
            return False
        for entry_id, body in chunk:
            self.published[entry_id] = {b"payload": body}
        return True


def test_ten_minutes_of_chaos_at_2000_per_second(fault_env, throwaway_postgres, throwaway_redis_factory, keys):
    pg = throwaway_postgres
    rd = throwaway_redis_factory(appendonly=True)
    role = f"soak_{uuid.uuid4().hex[:8]}"
    admin(pg.url, f"CREATE ROLE {role} LOGIN", f"GRANT USAGE ON SCHEMA public TO {role}",
           f"GRANT SELECT, INSERT ON positions TO {role}")
    writer_url = pg.url.replace("postgres@", f"{role}@", 1)
    env, metrics = with_metrics(dict(fault_env, REDIS_URL=rd.url, POSTGRES_URL=writer_url, MIGRATE_ON_START="false",
                                     RECLAIM_IDLE_MS="5000", BLOCK_MS="200", SHUTDOWN_TIMEOUT_S="5",
                                     LOG_LEVEL="warning"))
    total = int(SOAK_S * RATE)
    rng = random.Random(11)
    valid = [e[b"payload"] for e in fleet_entries(total, devices=2000, seed=31)]
    payloads = [b"{broken %d" % i if i % INVALID_EVERY == 0 else p for i, p in enumerate(valid)]
    publisher = Publisher(redis.Redis.from_url(rd.url, socket_timeout=5, socket_connect_timeout=2), keys["stream"],
                          payloads)
    actions: Counter[str] = Counter()
    samples: list[tuple[float, float | None, int, int]] = []  # (t, rss MB, PostgreSQL conns, Redis conns)
    proc = ServiceProcess(env).start()
    lives = [proc]
    started = time.monotonic()
    pub_thread = threading.Thread(target=publisher.run, name="soak-publisher", daemon=True)
    pub_thread.start()

    def sample() -> None:
        try:
            conn = psycopg2.connect(pg.url, connect_timeout=2)
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,))
                pg_conns = int(cur.fetchone()[0])
            conn.close()
            clients = publisher.client.client_list()
            redis_conns = len(clients) - 1  # all but the publisher's
        except (psycopg2.Error, redis.RedisError):
            return  # a server is being restarted right now
        samples.append((time.monotonic() - started, _rss_mb(proc.proc.pid), pg_conns, redis_conns))

    def chaos(action: str) -> None:
        nonlocal proc
        actions[action] += 1
        if action == "lock":
            blocker = psycopg2.connect(pg.url)
            blocker.cursor().execute("LOCK TABLE positions IN EXCLUSIVE MODE")
            time.sleep(rng.uniform(2, 8))
            blocker.rollback()
            blocker.close()
        elif action == "revoke":
            admin(pg.url, f"REVOKE INSERT ON positions FROM {role}")
            time.sleep(rng.uniform(2, 6))
            admin(pg.url, f"GRANT INSERT ON positions TO {role}")
        elif action == "restart-postgres":
            pg.stop("fast")
            time.sleep(rng.uniform(1, 4))
            pg.start()
        elif action == "restart-redis":
            rd.stop()
            time.sleep(rng.uniform(0.5, 2))
            rd.start()
        elif action == "kill-9":
            proc.proc.kill()
            proc.proc.wait(10)
            time.sleep(rng.uniform(0.2, 1))
            proc = ServiceProcess(env).start()
            lives.append(proc)

    try:
        last_sample = 0.0
        while time.monotonic() - started < SOAK_S - 20:
            pause_until = time.monotonic() + rng.uniform(4, 10)
            while time.monotonic() < pause_until:
                if time.monotonic() - last_sample >= 5:
                    sample()
                    last_sample = time.monotonic()
                time.sleep(0.2)
            chaos(rng.choice(["lock", "revoke", "restart-postgres", "restart-redis", "kill-9"]))
        publisher.stop.wait(max(SOAK_S - (time.monotonic() - started), 0))
        publisher.stop.set()
        pub_thread.join(10)
        client = rd.client()
        wait_or_explain(proc, lambda: pending_count(client, keys["stream"], keys["group"]) == 0
                        and client.xlen(keys["stream"]) == len(publisher.published), 180, 0.5, "everything settled")
        sample()
        rows = row_count(pg.url)
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        outcome = assert_nothing_lost(client, pg.url, keys, publisher.published)
        client.close()
    finally:
        publisher.stop.set()
        for life in lives:
            life.__exit__(None, None, None)
    rss = [s[1] for s in samples if s[1] is not None]
    pg_conns = [s[2] for s in samples]
    redis_conns = [s[3] for s in samples]
    invalid = sum(1 for p in publisher.published.values() if p[b"payload"].startswith(b"{broken"))
    print(f"measured: {SOAK_S:.0f}s, {len(publisher.published)} published ({invalid} malformed), {rows} rows, "
          f"dead letters {outcome.dead_letters}; chaos {dict(actions)}; {len(lives)} service lives; "
          f"publisher retries {publisher.failures}")
    print(f"measured: RSS MB min {min(rss):.0f} median {sorted(rss)[len(rss) // 2]:.0f} max {max(rss):.0f}; "
          f"PostgreSQL connections {min(pg_conns)}..{max(pg_conns)}; "
          f"Redis connections {min(redis_conns)}..{max(redis_conns)}; {len(samples)} samples")
    assert outcome.dead_letters == {"invalid_json": invalid}  # no good entry dead-lettered
    assert outcome.rows == len(publisher.published) - invalid
    assert max(pg_conns) <= 6 and max(redis_conns) <= 6  # one per writer thread, the monitor, a spare
    assert max(rss) <= 200
