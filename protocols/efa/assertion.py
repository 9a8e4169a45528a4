"""Signed identity assertions (the security token of an EFA context).

Wire format (compact, URL-safe)::

    "efa1." base64url(JSON claims) "." base64url(Ed25519 signature over "efa1." + claims part)

Claims: ``iss`` issuer name, ``kid`` key id of the issuer's signing key (first 16 hex of
sha256 over the raw public key), ``sub`` subject (a person, e.g. Telematik-ID), ``org``
organisation, ``role``, ``iat`` / ``exp`` (epoch seconds), ``jti`` (random id; revocation
is by ``jti``). Verification is pure: given the trusted public keys and the time, it
returns the claims or raises :class:`AssertionRejected` with a code naming the rule.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, Field, ValidationError

PREFIX = "efa1"
MAX_TOKEN_LEN = 4096

RejectCode = Literal["malformed_token", "untrusted_issuer", "bad_signature", "expired", "not_yet_valid", "revoked"]


class AssertionRejected(Exception):
    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Claims(BaseModel):
    iss: str = Field(min_length=1, max_length=200)
    kid: str = Field(min_length=1, max_length=64)
    sub: str = Field(min_length=1, max_length=200)
    org: str = Field(min_length=1, max_length=200)
    role: str = Field(min_length=1, max_length=64)
    iat: float = Field(allow_inf_nan=False)  # NaN would make "expired" never true
    exp: float = Field(allow_inf_nan=False)
    jti: str = Field(min_length=8, max_length=64)


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(claims: Claims, private_key: Ed25519PrivateKey) -> str:
    body = _b64e(json.dumps(claims.model_dump(), separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{PREFIX}.{body}".encode("ascii")
    return f"{PREFIX}.{body}.{_b64e(private_key.sign(signing_input))}"


def unverified_claims(token: str) -> Claims:
    """Parse without checking anything but the shape (for logs/tools; never for access)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN:
        raise AssertionRejected("malformed_token", "token missing or too long")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise AssertionRejected("malformed_token", f"token is not '{PREFIX}.<claims>.<signature>'")
    try:
        return Claims.model_validate_json(_b64d(parts[1]))
    except (ValueError, ValidationError):
        raise AssertionRejected("malformed_token", "token claims are not valid") from None


def verify(token: str, trusted: dict[str, Ed25519PublicKey], now: float, *, leeway_s: float = 5.0) -> Claims:
    """Check shape, issuer key, signature and validity period; returns the claims."""
    claims = unverified_claims(token)
    pub = trusted.get(claims.kid)
    if pub is None:
        raise AssertionRejected("untrusted_issuer", f"token signed by unknown key {claims.kid!r}")
    head, body, sig = token.split(".")
    try:
        pub.verify(_b64d(sig), f"{head}.{body}".encode("ascii"))
    except (InvalidSignature, ValueError):
        raise AssertionRejected("bad_signature", "token signature does not verify") from None
    if now > claims.exp + leeway_s:
        raise AssertionRejected("expired", "token has expired")
    if claims.iat > now + leeway_s:
        raise AssertionRejected("not_yet_valid", "token issued in the future")
    return claims
