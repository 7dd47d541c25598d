"""Where a position's Python time goes, stage by stage, in the real service (issue 13).

    .venv/bin/python bench/stages.py [--positions 100000] [--rounds 3] [--postgres-url URL]

Runs the service in this process (``processor.service.Service``, default settings, the
same wiring as ``python processor.py run``) on a fresh database and a stream holding
``--positions`` positions from the benchmark's fleet, until every entry is acknowledged,
``--rounds`` times (a fresh database and stream each time). Each stage's CPU time is
taken with ``time.thread_time()`` around the product's own functions, once per batch
(so the measuring costs a few microseconds per 1,000 positions), nested stages
subtracted from the ones around them:

- main thread: ``read`` (XACK + XREADGROUP round trip, hiredis parsing, building the
  entries), ``decoding`` (``Decoder.decode_rows``: the compiled way, and the Python ways
  for what it declines; ``decode_batch`` before round 7), ``decode loop`` (the rest of
  ``Pipeline.process`` without the stages below: the per-entry checks, the
  ``Record``\\ s), ``device state``, ``submit`` (the hand-over
  to a writer thread), ``settle`` (acknowledgement bookkeeping, ``end_to_end_seconds``),
  ``loop, other`` (the rest of the main thread: the turn, the GIL hand-overs' own cost,
  the garbage collector);
- writer threads: ``COPY text`` (``_copy_text_rows``: the compiled way's rows joined, else
  ``_copy_text_fast``, or ``_copy_text`` when that declines),
  ``COPY, commit (client)`` (the rest of ``Writer._attempt``: psycopg2 sending the
  text, waiting, the commit), ``writer, other`` (queue, futures, the rest of the thread).

Prints microseconds per position, the median over the rounds (min-max in brackets).
Also written to ``--out`` as JSON. CPU time, not wall time: the machine's other load
changes it less, but cache sharing with PostgreSQL and Redis on two vCPUs still moves
it by 5-10 % between rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run as harness  # noqa: E402  (bench/run.py: servers, data, fresh databases)

from processor.core import writer as writer_module  # noqa: E402
from processor.core.config import load_config  # noqa: E402
from processor.core.consumer import StreamConsumer  # noqa: E402
from processor.core.decode import Decoder  # noqa: E402
from processor.core.pipeline import Pipeline  # noqa: E402
from processor.core.state import DeviceState  # noqa: E402
from processor.core.writer import Writer  # noqa: E402
from processor.service import Service  # noqa: E402

MAIN_STAGES = ("read", "decoding", "decode loop", "device state", "submit", "settle", "loop, other")
WRITER_STAGES = ("COPY text", "COPY, commit (client)", "writer, other")


class Stages:
    """Per-thread CPU accumulators with nesting: a stage's own time excludes the stages it calls."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._local = threading.local()

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        local, totals, clock = self._local, self.totals, time.thread_time

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = getattr(local, "stack", None)
            if stack is None:
                stack = local.stack = []
            stack.append(0.0)  # time spent in nested stages
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spent = clock() - started
                nested = stack.pop()
                totals[name] += spent - nested
                if stack:
                    stack[-1] += spent
        return timed


def instrument(stages: Stages) -> Callable[[], None]:
    """Wrap the product's stage functions; returns the undo."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)
        saved.append((owner, attribute, original))
        setattr(owner, attribute, stages.wrap(name, original))

    patch(StreamConsumer, "read", "read")
    patch(Pipeline, "process", "decode loop")
    for name in ("decode_rows", "decode_batch"):  # the pipeline calls decode_rows; before round 7, decode_batch
        if hasattr(Decoder, name):
            patch(Decoder, name, "decoding")
    patch(DeviceState, "update", "device state")
    patch(Writer, "submit", "submit")
    patch(Pipeline, "settle", "settle")
    if hasattr(writer_module, "_copy_text_rows"):  # since round 7
        patch(writer_module, "_copy_text_rows", "COPY text")
    patch(writer_module, "_copy_text_fast", "COPY text")
    patch(writer_module, "_copy_text", "COPY text")
    patch(Writer, "_attempt", "COPY, commit (client)")

    def undo() -> None:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)
    return undo


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by name (writer threads summed)."""
    out: dict[str, float] = defaultdict(float)
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            seconds = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, ProcessLookupError):
            continue
        name = "main" if thread is threading.main_thread() else \
            "writer" if thread.name.startswith("writer-") else "other"
        out[name] += seconds
    return out


def one_round(bench: harness.Bench, template: str, positions: int) -> dict[str, float]:
    pg_url = bench.fresh_database("stages")
    stream = harness.copy_stream(bench, template)
    config = load_config({"REDIS_URL": bench.redis_url, "POSTGRES_URL": pg_url, "STREAM_KEY": stream,
                          "CONSUMER_GROUP": "bench", "CONSUMER_NAME": "stages", "METRICS_PORT": "0",
                          "DEAD_LETTER_STREAM": bench.key("dead"), "LOG_LEVEL": "warning"}, dotenv_path=None)
    stop = threading.Event()
    service = Service(config, stop=stop, handlers=[])
    stages = Stages()
    undo = instrument(stages)
    result: dict[str, float] = {}
    writers: list[threading.Thread] = []

    def watch() -> None:
        """Until every entry is read and acknowledged: then note the threads' CPU and stop."""
        while not stop.is_set():
            info = harness.group_info(bench.redis, stream, "bench")
            if info is not None and (info.get("entries-read") or 0) >= positions and info["pending"] == 0 \
                    and (info.get("lag") or 0) == 0:
                break
            time.sleep(harness.POLL_S)
        cpu = thread_cpu()
        for key, value in cpu.items():
            result[f"thread:{key}"] = value - start_cpu.get(key, 0.0)
        writers.extend(t for t in threading.enumerate() if t.name.startswith("writer-"))
        stop.set()

    start_cpu = thread_cpu()
    watcher = threading.Thread(target=watch, name="bench-watch", daemon=True)
    bench.checkpoint()
    started = time.perf_counter()
    watcher.start()
    try:
        service.run()
    finally:
        undo()
        watcher.join(5)
    result["seconds"] = time.perf_counter() - started
    rows = harness.count_rows(pg_url)
    bench.drop_database(pg_url)
    bench.redis.delete(stream)
    if rows != positions:
        raise RuntimeError(f"expected {positions} rows, found {rows}")
    per = 1e6 / positions
    main_total = result.get("thread:main", 0.0)
    writer_total = result.get("thread:writer", 0.0)
    out = {name: stages.totals.get(name, 0.0) * per for name in MAIN_STAGES[:-1] + WRITER_STAGES[:-1]}
    # The start-up (connect, migrate) is in the main thread's total but before the first read: it is
    # part of "loop, other", a fixed cost of about 0.1 s, i.e. under 1 us a position at 100,000.
    out["loop, other"] = main_total * per - sum(out[n] for n in MAIN_STAGES[:-1])
    out["writer, other"] = writer_total * per - sum(out[n] for n in WRITER_STAGES[:-1])
    out["main thread"] = main_total * per
    out["writer threads"] = writer_total * per
    out["other threads"] = result.get("thread:other", 0.0) * per
    out["per_s"] = positions / result["seconds"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", harness.DEFAULT_REDIS_URL))
    parser.add_argument("--postgres-url", default=os.environ.get("POSTGRES_URL", harness.DEFAULT_POSTGRES_URL))
    parser.add_argument("--out", default="", help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    with harness.bench_servers(args.redis_url, args.postgres_url) as bench:
        payloads = list(harness.Fleet(args.devices, seed=harness.SEED).payloads(args.positions))
        template = bench.key("template")
        harness.publish(bench.redis, template, payloads)
        del payloads
        rounds = []
        for i in range(args.rounds):
            rounds.append(one_round(bench, template, args.positions))
            harness.log(f"round {i + 1}: {rounds[-1]['per_s']:,.0f}/s, main {rounds[-1]['main thread']:.1f} us, "
                        f"writers {rounds[-1]['writer threads']:.1f} us")
    names = list(MAIN_STAGES) + ["main thread"] + list(WRITER_STAGES) + ["writer threads", "other threads"]
    summary = {n: {"median": statistics.median(r[n] for r in rounds), "min": min(r[n] for r in rounds),
                   "max": max(r[n] for r in rounds)} for n in names + ["per_s"]}
    print(f"{'stage (us of CPU per position)':<32}{'median':>8}  min-max")
    for n in names:
        s = summary[n]
        print(f"{n:<32}{s['median']:>8.2f}  {s['min']:.2f}-{s['max']:.2f}")
    s = summary["per_s"]
    print(f"{'positions/s (in-process)':<32}{s['median']:>8,.0f}  {s['min']:,.0f}-{s['max']:,.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
