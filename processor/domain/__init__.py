"""Domain rules (phase 2: finish-line crossings and the like).

The core never imports this package. The wiring (``processor.service``) asks
:func:`default_handlers` for the handlers to register at the one seam: each
receives every stored batch, its write results and a read-only view of the
device state, after the batch is written. A failing handler is logged and never
holds up acknowledgement. None are registered yet.
"""

from __future__ import annotations

from typing import Any


def default_handlers(config: Any) -> list[Any]:
    """Handlers registered by default: none in phase 1."""
    return []
