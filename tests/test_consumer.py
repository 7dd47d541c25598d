"""The Redis client's command packer (issue 13, round 7): redis-py's bytes, without its Python call per argument."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from processor.core.consumer import CommandPacker, StreamConsumer, redis_client

_ENCODER = Encoder("utf-8", "strict", False)
REDIS_PY = HiredisRespSerializer(PythonRespSerializer(6000, _ENCODER.encode).pack, _ENCODER.encode)

COMMANDS: list[tuple[Any, ...]] = [
    ("XACK", "telemetry:t", "processor", *[f"1796512352{i:03d}-{i % 3}" for i in range(1000)]),
    ("XREADGROUP", "GROUP", "processor", "host-1", "COUNT", 1000, "BLOCK", 50, "STREAMS", "telemetry:t", ">"),
    ("XGROUP CREATE", "telemetry:t", "processor", "0", "MKSTREAM"),
    ("XADD", "telemetry:t:dead", "*", "payload", b'{"a":"\xc3\xa9\x00"}', "reason", "invalid_json", "deliveries", 3),
    ("XCLAIM", "s", "g", "c", 0, "1-0", "2-0", "JUSTID"),
    ("XAUTOCLAIM", "s", "g", "c", 60000, "0-0", "COUNT", 1000),
    (b"CLIENT SETINFO", b"LIB-NAME", "redis-py"),
    ("SET", "k", 1.5), ("SET", "k", -1e300), ("SET", "k", 10**30), ("SET", "k", -7), ("SET", "k", "é€"),
    ("SET", "k", bytearray(b"v")), ("SET", "k", memoryview(b"vw")), ("SET", "k", b""), ("SET", "k", ""),
    ("PING",),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
def test_it_packs_what_redis_py_packs(args: tuple[Any, ...]) -> None:
    ours = b"".join(CommandPacker().pack(*args))
    theirs = b"".join(bytes(chunk) for chunk in REDIS_PY.pack(*args))
    assert ours == theirs


@pytest.mark.parametrize("value", [True, False, None, [1], {"a": 1}, object()], ids=repr)
def test_it_refuses_what_redis_py_refuses(value: Any) -> None:
    with pytest.raises(redis.DataError):
        REDIS_PY.pack("SET", "k", value)
    with pytest.raises(redis.DataError):
        CommandPacker().pack("SET", "k", value)


def test_the_service_client_packs_with_it_and_redis_understands(redis_url: str, keys: dict[str, str]) -> None:
    client = redis_client(redis_url, block_ms=1000)
    try:
        assert type(client.connection_pool.get_connection()._command_packer) is CommandPacker
        for i in range(1500):
            client.xadd(keys["stream"], {"payload": f'{{"n":{i}}}'.encode()})
        consumer = StreamConsumer(client=client, stream=keys["stream"], group=keys["group"],
                                  consumer=keys["consumer"], batch_size=1000)
        assert consumer.ensure_group() is True
        first = consumer.read(block_ms=50)  # no pending entries of ours: on to new ones
        assert [e.fields for e in first[:2]] == [{b"payload": b'{"n":0}'}, {b"payload": b'{"n":1}'}]
        second = consumer.read(block_ms=50, ack=[e.entry_id for e in first])  # XACK + XREADGROUP, one trip
        assert (len(first), len(second)) == (1000, 500)
        assert consumer.ack([e.entry_id for e in second]) == 500
        assert consumer.group_stats() == (0, 0)
    finally:
        client.close()
