"""`processor.py dead-letters list | redrive` (CONTRACT 5, 6)."""

from __future__ import annotations

import re
import signal

from processor.core.deadletter import DeadLetter, DeadLetters
from tests.helpers import (BASE_MS, ServiceProcess, dead_letters, payload, pending_count, publish, row_count,
                           wait_until)
from tests.test_replay import run_cli

LINE = re.compile(r"^(\d+-\d+) reason=(\S+) source_id=(\S+) deliveries=(\d+) at=(\S+Z) detail=(.*) payload=(b.*)$")


def _letters(client, keys) -> DeadLetters:
    return DeadLetters(client=client, stream=keys["dead"], source_stream=keys["stream"], group=keys["group"])


def _add(client, keys, reasons: list[str]) -> list[bytes]:
    """One dead letter per reason, payloads numbered in order; returns the payloads."""
    payloads = [payload(f"dl-{n}", BASE_MS + n) if r == "db_rejected" else b"{broken %d" % n
                for n, r in enumerate(reasons)]
    _letters(client, keys).add([DeadLetter(f"{BASE_MS}-{n}", p, r, f"why {n}", 5 if r == "db_rejected" else 1)
                                for n, (p, r) in enumerate(zip(payloads, reasons))])
    return payloads


def _stream_payloads(client, stream: str) -> list[bytes]:
    return [f[b"payload"] for _, f in client.xrange(stream)]


def test_list_shows_each_dead_letter_and_a_count(service_env, redis_client, keys):
    long_payload = b"x" * 300
    _letters(redis_client, keys).add([
        DeadLetter("1-1", b"{broken", "invalid_json", "unexpected end of input", 1),
        DeadLetter("1-2", long_payload, "too_large", "payload is 300 bytes", 1),
        DeadLetter("1-3", payload("dl"), "db_rejected", 'new row violates check constraint "sane"', 5),
    ])
    code, out, _, _ = run_cli(service_env, "dead-letters", "list")
    assert code == 0
    *lines, total = out.splitlines()
    assert total == f"3 shown of 3 dead letters in {keys['dead']}"
    rows = [LINE.match(line).groups() for line in lines]
    assert [(r[1], r[2], r[3]) for r in rows] == [("invalid_json", "1-1", "1"), ("too_large", "1-2", "1"),
                                                  ("db_rejected", "1-3", "5")]
    assert rows[0][5:] == ("'unexpected end of input'", "b'{broken'")
    assert rows[1][6] == repr(long_payload[:120])  # long payloads are cut
    assert rows[2][5] == repr('new row violates check constraint "sane"')
    code, out, _, _ = run_cli(service_env, "dead-letters", "list", "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 3
    assert out.splitlines()[-1] == f"2 shown of 3 dead letters in {keys['dead']}"


def test_list_with_no_dead_letters(service_env, keys):
    code, out, _, _ = run_cli(service_env, "dead-letters", "list")
    assert (code, out) == (0, f"0 shown of 0 dead letters in {keys['dead']}\n")


def test_redrive_by_reason_moves_only_those(service_env, redis_client, keys):
    reasons = ["invalid_json", "db_rejected", "invalid_json", "db_rejected", "db_rejected"]
    payloads = _add(redis_client, keys, reasons)
    code, out, _, _ = run_cli(service_env, "dead-letters", "redrive", "--reason", "db_rejected")
    assert (code, out) == (0, f"redrive: moved 3 dead letters to {keys['stream']} (scanned 5)\n")
    assert _stream_payloads(redis_client, keys["stream"]) == [payloads[1], payloads[3], payloads[4]]
    assert [d["reason"] for d in dead_letters(redis_client, keys["dead"])] == [b"invalid_json"] * 2
    assert _stream_payloads(redis_client, keys["dead"]) == [payloads[0], payloads[2]]


def test_redrive_limit_moves_the_oldest_first(service_env, redis_client, keys):
    payloads = _add(redis_client, keys, ["db_rejected"] * 5)
    code, out, _, _ = run_cli(service_env, "dead-letters", "redrive", "--limit", "2")
    assert code == 0 and out.startswith("redrive: moved 2 dead letters")
    assert _stream_payloads(redis_client, keys["stream"]) == payloads[:2]
    assert _stream_payloads(redis_client, keys["dead"]) == payloads[2:]


def test_redrive_with_nothing_to_move(service_env, redis_client, keys):
    _add(redis_client, keys, ["invalid_json"])
    code, out, _, _ = run_cli(service_env, "dead-letters", "redrive", "--reason", "db_rejected")
    assert (code, out) == (0, f"redrive: moved 0 dead letters to {keys['stream']} (scanned 1)\n")
    assert redis_client.xlen(keys["dead"]) == 1 and redis_client.xlen(keys["stream"]) == 0


def test_redrive_reports_progress_on_stderr(service_env, redis_client, keys):
    _add(redis_client, keys, ["db_rejected", "invalid_json"] * 600)
    code, out, err, _ = run_cli(service_env, "dead-letters", "redrive", "--reason", "db_rejected")
    assert (code, out) == (0, f"redrive: moved 600 dead letters to {keys['stream']} (scanned 1200)\n")
    progress = [line for line in err.splitlines() if line.startswith("redrive:")]
    assert progress == ["redrive: moved 250 (scanned 500)", "redrive: moved 500 (scanned 1000)",
                        "redrive: moved 600 (scanned 1200)"]
    assert redis_client.xlen(keys["stream"]) == 600 and redis_client.xlen(keys["dead"]) == 600


def test_redriven_entries_are_written_by_the_running_service_after_the_fix(service_env, redis_client, pg_url,
                                                                            pg_conn, keys):
    with pg_conn.cursor() as cur:  # the bug: a rule downstream that good positions break
        cur.execute("ALTER TABLE positions ADD CONSTRAINT sane_speed CHECK (speed <= 400)")
    good = [payload(f"fix-{n}", BASE_MS + n, speed=float(100 + 100 * n)) for n in range(8)]  # 100..800 km/h
    env = dict(service_env, BLOCK_MS="200", RECLAIM_IDLE_MS="300", MAX_DELIVERIES="2")
    with ServiceProcess(env) as proc:
        publish(redis_client, keys["stream"], good + [b"{broken"])
        wait_until(lambda: redis_client.xlen(keys["dead"]) == 5 and row_count(pg_url) == 4
                   and pending_count(redis_client, keys["stream"], keys["group"]) == 0, 30, 0.05, "5 dead letters")
        assert sorted(d["reason"] for d in dead_letters(redis_client, keys["dead"])) == \
            [b"db_rejected"] * 4 + [b"invalid_json"]
        with pg_conn.cursor() as cur:  # the fix
            cur.execute("ALTER TABLE positions DROP CONSTRAINT sane_speed")
        code, out, _, _ = run_cli(service_env, "dead-letters", "redrive", "--reason", "db_rejected")
        assert (code, out) == (0, f"redrive: moved 4 dead letters to {keys['stream']} (scanned 5)\n")
        wait_until(lambda: row_count(pg_url) == 8
                   and pending_count(redis_client, keys["stream"], keys["group"]) == 0, 30, 0.05, "8 rows")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert [d["reason"] for d in dead_letters(redis_client, keys["dead"])] == [b"invalid_json"]
    assert row_count(pg_url, "speed > 400") == 4
