"""Which devices a user may see on the live gateway (CONTRACT 9): a seam for Phase 2.

The gateway asks :func:`default_visibility` once at start-up for the rule, and the rule once per
authenticated connection (with the token's claims; empty claims in public mode) for that
connection's scope: ``None`` for every device, or the set of device ids it may see. Subscriptions
are then narrowed to that scope. Phase 2 replaces the default with a rule that reads the user's
fleet (Directus's tables), e.g. from the claims' ``id`` or ``role``.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol


class Visibility(Protocol):
    def scope(self, claims: Mapping[str, Any]) -> frozenset[str] | None:
        """The device ids this user may see, or None for every device."""
        ...


class EveryDevice:
    """Phase 1: every authenticated user (everyone, in public mode) sees every device."""

    def scope(self, claims: Mapping[str, Any]) -> frozenset[str] | None:
        return None


def default_visibility(config: Any) -> Visibility:
    """The rule the gateway uses by default: every device."""
    return EveryDevice()
