"""A py-spy profile of the service (``bench/run.py --py-spy DIR``), summarised by stage.

    .venv/bin/python bench/profile_summary.py DIR/plain.txt [--results results.json --backend plain]

The profile is py-spy's raw (collapsed) format, one line per distinct stack with its
sample count, on-CPU samples only (py-spy leaves out threads waiting in the kernel,
for a socket or for the GIL). Each stack is put in the stage of its deepest frame that
a rule below names; Python frames only, so the time of a C function (``orjson.loads``,
``msgspec``'s decoder, psycopg2, hiredis) is that of the Python frame that called it.
Frames of the typed way's one inlined loop (``Decoder._typed_batch``) are told apart by
their source line (the file as it is now: summarise a profile of the code checked out).
With ``--results`` (the JSON of the same run), each share is also turned into
microseconds per position: the share of the thread's samples times the thread's CPU
per position measured in that run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

# (stage, frame-name pattern), most specific first: the deepest frame of a stack matching one wins.
MAIN_RULES: tuple[tuple[str, str], ...] = (
    # the compiled way is one C call from decode_rows: its samples end in that frame (round 7)
    ("decode: compiled way (C)", r"^Decoder\.decode_rows$"),
    ("decode: JSON parsing, typed (C)", r"^(_parse|_typed|_decode_typed|Decoder\._fast_batch)$"),
    ("decode: attributes, sentinels", r"^(_attributes|_decode_sentinels|_sentinel|_bigint|_base64_buffer|"
                                      r"_node_buffer|_typed_attributes|_typed_walk|_is_sentinel_shaped)$"),
    ("decode: timestamps", r"^(Decoder\._timestamp|_epoch_ms_timestamp|_iso_timestamp|_iso_timestamp_cached|"
                           r"Decoder\._latest_allowed|_cache_second)$"),
    ("decode: field checks, Position", r"^(Decoder\.\w+|_device_id|_coordinate|_real|_integer|_check_nul|_has_nul|"
                                       r"decode_batch|_fast_position)$"),
    ("read: XACK + XREADGROUP, entries", r"^(StreamConsumer\.read|_new_entries|_entries|translate)$"),
    ("device state", r"^DeviceState\.update$"),
    ("settle: acks, end_to_end", r"^(Pipeline\.settle|Pipeline\._settle_batch|observe_ages|Pipeline\._ack|"
                                 r"Pipeline\._acked|Pipeline\._flush_acks|Pipeline\._try_flush_acks)$"),
    ("submit", r"^Writer\.submit$"),
    ("per-entry loop: Records, checks", r"^(Pipeline\.process|Pipeline\._records)$"),
)
WRITER_RULES: tuple[tuple[str, str], ...] = (
    ("COPY text", r"^(_copy_text|_copy_text_rows|_copy_text_fast|_values_insert|_escape)$"),
    ("COPY, commit (psycopg2)", r"^(Writer\._direct_copy|_transaction|_copy_insert|Writer\._insert)$"),
    ("accounting", r"^(Writer\._account|Writer\._attempt|_outcomes)$"),
)
_FRAME = re.compile(r"^(.*) \(([^():]*):(\d+)\)$")
# The typed way is one inlined loop (Decoder._typed_batch): its time is told apart by the source line.
LINE_RULES: tuple[tuple[str, str], ...] = (
    ("decode: JSON parsing, typed (C)", r"typed_decode\(raw\)"),
    ("decode: timestamps", r"seconds_cache|millis_table|iso_cache|_iso_timestamp|millis_text|base = |divmod|"
                           r"MIN_EPOCH_MS <= ts|ts < MIN_TS"),
    ("decode: attributes, sentinels", r"_typed_attributes|raw\.find\(b\"_\"\)|raw\.find\(b\"\[\"\)|"
                                      r"raw\.find\(b\"\{\""),
)
ROOT = Path(__file__).resolve().parent.parent
_lines: dict[str, list[str]] = {}


def _source_line(path: str, number: int) -> str:
    if path not in _lines:
        try:
            _lines[path] = (ROOT / path).read_text().splitlines()
        except OSError:
            _lines[path] = []
    lines = _lines[path]
    return lines[number - 1] if 0 < number <= len(lines) else ""


def stage_of(frames: list[str], rules: tuple[tuple[str, str], ...]) -> str:
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        name = match.group(1) if match else frame
        if match and name == "Decoder._typed_batch":
            text = _source_line(match.group(2), int(match.group(3)))
            for stage, pattern in LINE_RULES:
                if re.search(pattern, text):
                    return stage
        for stage, pattern in rules:
            if re.match(pattern, name):
                return stage
    return "other"


def summarise(path: Path) -> dict[str, Counter[str]]:
    """{thread group: Counter(stage -> samples)}; groups ``main``, ``writer``, ``other``."""
    groups: dict[str, Counter[str]] = {"main": Counter(), "writer": Counter(), "other": Counter()}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        if thread == "MainThread":
            groups["main"][stage_of(frames[1:], MAIN_RULES)] += int(count)
        elif thread.startswith("writer-"):
            groups["writer"][stage_of(frames[1:], WRITER_RULES)] += int(count)
        else:
            groups["other"][thread] += int(count)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--results", type=Path, help="the bench JSON of the same run (for microseconds)")
    parser.add_argument("--backend", default="plain")
    args = parser.parse_args(argv)
    groups = summarise(args.profile)
    cpu = {}
    if args.results:
        section = json.loads(args.results.read_text())["backends"][args.backend]["profile"]
        cpu = section["cpu_us_per_position"]
    per_thread = {"main": cpu.get("main_thread"), "writer": cpu.get("other_threads")}
    for group in ("main", "writer", "other"):
        samples = groups[group]
        total = sum(samples.values())
        if not total:
            continue
        us = per_thread.get(group)
        print(f"{group} thread{'s' if group != 'main' else ''}: {total} samples"
              + (f", {us} us of CPU per position" if us is not None else ""))
        for stage, n in samples.most_common():
            share = n / total
            line = f"  {stage:<36} {share * 100:5.1f} %"
            if us is not None:
                line += f"  {share * us:5.2f} us"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
