"""Access tokens: HS256 JWTs as Directus issues them (signed with its SECRET, with ``exp`` and ``iss``).

PyJWT errors are translated here into :class:`AuthError` carrying the CONTRACT 9 code: an expired
token is TOKEN_EXPIRED, anything else (bad signature, wrong issuer, no ``exp``, not a JWT, another
algorithm) is INVALID_CREDENTIALS. Only HS256 is accepted: a token cannot choose its own algorithm.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import jwt

from .protocol import INVALID_CREDENTIALS, TOKEN_EXPIRED

ALGORITHM = "HS256"
LEEWAY_S = 5  # clock skew between Directus and the gateway


class AuthError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TokenVerifier:
    def __init__(self, *, secret: str, issuer: str) -> None:
        self._secret = secret
        self.issuer = issuer

    def verify(self, token: str) -> Mapping[str, Any]:
        """The token's claims, or :class:`AuthError`."""
        try:
            return jwt.decode(token, self._secret, algorithms=[ALGORITHM], issuer=self.issuer,
                              leeway=LEEWAY_S, options={"require": ["exp", "iss"]})
        except jwt.ExpiredSignatureError:
            raise AuthError(TOKEN_EXPIRED, "Token expired.") from None
        except jwt.InvalidIssuerError:
            raise AuthError(INVALID_CREDENTIALS, "Invalid token issuer.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(INVALID_CREDENTIALS, f"Invalid token: no {exc.claim} claim.") from None
        except jwt.InvalidSignatureError:
            raise AuthError(INVALID_CREDENTIALS, "Invalid token signature.") from None
        except jwt.PyJWTError:
            raise AuthError(INVALID_CREDENTIALS, "Invalid token.") from None


def mint(secret: str, *, issuer: str = "directus", ttl_s: float = 900, **claims: Any) -> str:
    """A token like Directus's (``id``, ``role``, ``app_access``, ``admin_access``, ``iat``, ``exp``, ``iss``).

    For tests, the benchmark and ``make demo``; Directus issues the real ones.
    """
    now = int(time.time())
    body = {"id": "00000000-0000-0000-0000-000000000000", "role": None, "app_access": True,
            "admin_access": False, "iat": now, "exp": int(now + ttl_s), "iss": issuer, **claims}
    return jwt.encode(body, secret, algorithm=ALGORITHM)
