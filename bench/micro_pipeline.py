"""Micro-benchmark of the per-position work between the Redis reply and the COPY text, stage by stage.

    .venv/bin/python bench/micro_pipeline.py [--batches 20] [--repeat 7]
    .venv/bin/python bench/micro_pipeline.py --instructions     # the same under callgrind: instructions

Real data (the benchmark's fleet, 1,000-entry XREADGROUP replies read once from Redis, as
the consumer reads them: unparsed, hiredis), the product's own functions, one thread, the
garbage collector set as the service sets it; no PostgreSQL (the writer's COPY text is
built, not sent). Stages, per position:

- ``entries``: the reply into ``Entry`` tuples (``consumer._new_entries``);
- ``process``: ``Pipeline.process`` (decoding, the per-entry checks, ``Record``\\ s, device
  state, the hand-over to the writer, here one that resolves at once);
- ``settle``: ``Pipeline.settle`` of those batches (acknowledgement ids, ``end_to_end_seconds``);
- ``copy text``: the writer's direct COPY text of a batch (``_copy_text_rows``: the rows the
  decoder's compiled way made, joined; else ``_copy_text_fast``, else ``_copy_text``).

``--python``: the decoder's Python ways only (``Decoder(compiled=False)``), as where the compiled
way was not built, and as before it was written (issue 13, round 7).

Times are CPU time (best of ``--repeat``); ``--instructions`` runs each stage under
``valgrind --tool=callgrind`` twice (0 and ``--batches`` batches) and prints the difference
per position: exact and immune to the machine's other load, but it counts instructions,
not cache misses.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from processor.core import consumer as consumer_module  # noqa: E402
from processor.core import writer as writer_module  # noqa: E402
from processor.core.consumer import StreamConsumer  # noqa: E402
from processor.core.deadletter import DeadLetters  # noqa: E402
from processor.core.decode import Decoder  # noqa: E402
from processor.core.health import Health  # noqa: E402
from processor.core.metrics import Metrics  # noqa: E402
from processor.core.pipeline import Pipeline, tune_gc  # noqa: E402
from processor.core.state import DeviceState  # noqa: E402
from processor.core.types import INSERTED, Record, WriteResult  # noqa: E402
from processor.simulate import Fleet  # noqa: E402

STAGES = ("entries", "process", "settle", "copy text")
BATCH = 1000


class DoneWriter:
    """A writer whose batches are stored at once (the micro-benchmark measures no database)."""

    def submit(self, records: Sequence[Record]) -> Future[list[WriteResult]]:
        future: Future[list[WriteResult]] = Future()
        future.set_result([INSERTED] * len(records))
        return future


def replies(redis_url: str, batches: int) -> list[Any]:
    """``batches`` XREADGROUP replies of 1,000 simulator positions (10,000 devices), unparsed."""
    client = redis.Redis.from_url(redis_url)
    stream = f"bench:micro:{os.getpid()}"
    client.delete(stream)
    pipe = client.pipeline(transaction=False)
    for payload in Fleet(10_000, seed=6).payloads(batches * BATCH):
        pipe.xadd(stream, {"payload": payload})
    pipe.execute()
    client.xgroup_create(stream, "micro", id="0")
    raw = redis.Redis.from_url(redis_url)
    raw.set_response_callback("XREADGROUP", consumer_module._unparsed)
    out = [raw.xreadgroup("micro", "micro", {stream: ">"}, count=BATCH) for _ in range(batches)]
    client.delete(stream)
    return out


COMPILED = True  # --python: False


def pipeline(redis_url: str) -> Pipeline:
    client = redis.Redis.from_url(redis_url)
    metrics = Metrics(registry=CollectorRegistry())
    return Pipeline(consumer=StreamConsumer(client=client, stream="unused", group="unused", consumer="micro"),
                    decoder=Decoder(compiled=COMPILED), state=DeviceState(max_devices=100_000), writer=DoneWriter(),
                    dead_letters=DeadLetters(client=client, stream="unused", source_stream="unused", group="unused"),
                    metrics=metrics, health=Health(block_ms=1000), max_inflight=10**9)


def run_stage(stage: str, data: list[Any], redis_url: str) -> Callable[[], None]:
    """A function doing ``stage`` once over every batch (the stages before it prepared outside)."""
    entries = [consumer_module._new_entries(reply) for reply in data]
    if stage == "entries":
        return lambda: [consumer_module._new_entries(reply) for reply in data] and None
    if stage == "process":
        def process() -> None:
            p = pipeline(redis_url)
            for batch in entries:
                p.process(batch)
        return process
    p = pipeline(redis_url)
    batches = [p.process(batch) for batch in entries]
    if stage == "settle":
        def settle() -> None:
            p.inflight.extend(b for b in batches if b is not None)
            p._defer_acks = True  # acknowledgements are collected, not sent (no stream here)
            p.settle()
            p._unacked = []
        return settle
    records = [b.records for b in batches if b is not None]

    def copy_text() -> None:
        for batch in records:
            if writer_module._copy_text_rows(batch) is None:
                writer_module._copy_text(batch, numbered=False)
    return copy_text


def measure(stage: str, data: list[Any], redis_url: str, repeat: int) -> float:
    """Best-of-``repeat`` CPU microseconds per position."""
    work = run_stage(stage, data, redis_url)
    best = float("inf")
    for _ in range(repeat):
        started = time.thread_time()
        work()
        best = min(best, time.thread_time() - started)
    return best * 1e6 / (len(data) * BATCH)


def instructions(stage: str, data_file: Path, batches: int, args: argparse.Namespace) -> float:
    """Instructions per position of ``stage`` (callgrind: a run that does it minus one that does not)."""
    counts = []
    for run in ("0", "1"):
        with tempfile.NamedTemporaryFile(suffix=".callgrind") as out:
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}", sys.executable,
                            __file__, "--child", stage, "--run", run, "--data", str(data_file),
                            "--redis-url", args.redis_url, *(["--python"] if args.python else [])],
                           check=True, capture_output=True)
            totals = [line for line in Path(out.name).read_text().splitlines() if line.startswith("totals:")]
            counts.append(int(totals[0].split()[1]))
    return (counts[1] - counts[0]) / (batches * BATCH)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--python", action="store_true", help="the decoder's Python ways only (compiled=False)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--run", default="1", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global COMPILED
    COMPILED = not args.python
    tune_gc()
    stages = [s for s in args.stages.split(",") if s]
    if args.child:  # under callgrind: prepare (counted in both runs), then the stage once (second run only)
        data = pickle.loads(Path(args.data).read_bytes())
        work = run_stage(args.child, data, args.redis_url)
        gc.collect()
        if args.run == "1":
            work()
        return 0
    if args.instructions:
        batches = min(args.batches, 5)
        with tempfile.TemporaryDirectory() as folder:
            data_file = Path(folder) / "replies.pickle"
            data_file.write_bytes(pickle.dumps(replies(args.redis_url, batches)))
            for stage in stages:
                count = instructions(stage, data_file, batches, args)
                print(f"{stage:<12} {count:9,.0f} instructions a position")
        return 0
    data = replies(args.redis_url, args.batches)
    for stage in stages:
        print(f"{stage:<12} {measure(stage, data, args.redis_url, args.repeat):6.2f} us a position (CPU, best of "
              f"{args.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
