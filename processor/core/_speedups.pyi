# The compiled way's interface (processor/core/_speedups.c), for type checkers.
from collections.abc import Sequence
from typing import Any

def decode_batch(entries: Sequence[Any], max_payload_bytes: int, latest_ms: int, position_type: type,
                 /) -> tuple[list[Any], list[bytes | None]]: ...
