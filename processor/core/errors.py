"""One exception hierarchy for the core.

redis and psycopg2 errors are translated where they enter (``raise
TransientError(...) from exc``) so that the rest of the code decides on these
types only.
"""

from __future__ import annotations


class ProcessorError(Exception):
    """Base of every error the processor raises on purpose."""


class ConfigError(ProcessorError):
    """A configuration value is invalid; the message is the one line shown to the operator."""


class TransientError(ProcessorError):
    """A server is unreachable or a connection dropped: retry later, acknowledge nothing."""


class RowRejectedError(ProcessorError):
    """PostgreSQL refused a row itself (constraint, range, trigger): the row's own fault."""


class SuspectRowError(ProcessorError):
    """PostgreSQL refused a statement with a size limit or an error class we do not know.

    Systemic until proven otherwise: it is the row's own fault only when the row fails
    alone while its neighbours are written (CONTRACT 4 rule 13).
    """


class StreamGoneError(TransientError):
    """The consumer group or the stream disappeared (NOGROUP): recreate and go on."""


class MigrationError(ProcessorError):
    """schema.sql could not be applied (a missing privilege, a conflicting object): an operator must act."""
