"""One redaction function for everything that shows a URL or an exception text.

Passwords and user info in connection URLs must never leave the process: logs,
error messages (psycopg2 and redis-py can echo the DSN), /readyz bodies, metric
labels, dead-letter details, config dumps.
"""

from __future__ import annotations

import re

# scheme://user:password@host -> scheme://user:***@host ; scheme://password@host stays masked too.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*)(?::(?P<pw>[^/?#\s]*))?@")
# libpq keyword form: password=secret or password='se cret'
_KV_PASSWORD = re.compile(r"(?i)(?<![?&])\b(password|passwd|pwd)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
# query parameters that carry secrets
_QUERY_KEYS = ("password", "passwd", "pwd", "sslpassword", "ssl_password", "token")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:" + "|".join(_QUERY_KEYS) + r")=)[^&\s]+")


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, user, pw = match.group("scheme"), match.group("user"), match.group("pw")
    if pw is None:
        # redis://secret@host: a lone user part is how redis-py reads a password.
        return f"{scheme}***@" if scheme.lower().startswith("redis") and user else f"{scheme}{user}@"
    return f"{scheme}{user}:***@"


# Literal secrets (the passwords of the configured URLs), set once at start-up by
# register_secrets(): masked wherever they appear, even out of URL form.
_secrets: tuple[str, ...] = ()


def register_secrets(*urls: str) -> None:
    """Remember the passwords in ``urls`` so that :func:`redact` masks them anywhere."""
    global _secrets
    _secrets = tuple(sorted(set(_secrets) | set(url_secrets(*urls)), key=len, reverse=True))


def redact(text: object) -> str:
    """Return ``text`` as a string with every credential masked."""
    out = str(text)
    out = _URL_USERINFO.sub(_mask_userinfo, out)
    out = _KV_PASSWORD.sub(lambda m: f"{m.group(1)}=***", out)
    out = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}***", out)
    for secret in _secrets:
        if secret and len(secret) >= 3:
            out = out.replace(secret, "***")
    return out


def url_secrets(*urls: str) -> tuple[str, ...]:
    """The passwords (and redis user-only secrets) found in ``urls``, for :func:`redact`."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    found: list[str] = []
    for url in urls:
        try:
            parts = urlsplit(url)
        except ValueError:
            continue
        if parts.password:
            found.extend({parts.password, unquote(parts.password)})
        elif parts.username and parts.scheme.startswith("redis"):
            found.extend({parts.username, unquote(parts.username)})
        found.extend(v for k, v in parse_qsl(parts.query) if k.lower() in _QUERY_KEYS and v)
    return tuple(found)
