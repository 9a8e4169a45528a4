"""Identity provider and context manager of the EFA provider.

- **Identity provider**: authenticates a participant's credential and issues a signed
  identity assertion (Ed25519, :mod:`protocols.efa.assertion`) with issuer, subject,
  organisation, role and expiry. Credentials here are enrolment secrets:
  ``HMAC(enrol key, subject | organisation | role)`` handed out by ``automat efa enrol``
  (a stand-in for HBA / SMC-B authentication, which the seed leaves to the network's policy).
- **Context manager**: ``open_context`` returns the context id (the assertion itself, so
  every call carries its own proof); ``verify`` checks signature, expiry and revocation on
  every call; ``close_context`` revokes (Redis key ``automat:efa:revoked:<jti>`` with a TTL
  until the token's expiry — no personal data in it).

The signing key lives in ``<run_dir>/secrets/efa_idp.key`` (base64 of 32 raw bytes, mode
0600), created on first use; the enrolment key is derived from it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from protocols.efa.api import ContextOut, Credential
from protocols.efa.assertion import AssertionRejected, Claims, key_id, sign, verify
from protocols.efa.model import Caller
from protocols.efa.rules import Refusal

REVOKED_PREFIX = "automat:efa:revoked:"


def signing_key_path(cfg) -> Path:
    return Path(cfg.run_dir) / "secrets" / "efa_idp.key"


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: use theirs
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64encode(raw) + b"\n")
                f.flush()
                os.fsync(f.fileno())
    for _ in range(50):  # the creator may still be writing
        data = path.read_bytes().strip()
        if data:
            return Ed25519PrivateKey.from_private_bytes(base64.b64decode(data))
        import time

        time.sleep(0.02)
    raise RuntimeError(f"EFA signing key file {path} is empty")


class IdentityProvider:
    def __init__(self, private_key: Ed25519PrivateKey, issuer: str, ttl_s: float) -> None:
        self._key = private_key
        self.issuer = issuer
        self.ttl_s = ttl_s
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.kid = key_id(self.public_key)
        raw = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self._enrol_key = hmac.new(raw, b"efa-enrolment-v1", hashlib.sha256).digest()

    def enrol_secret(self, subject: str, organisation: str, role: str) -> str:
        msg = "\x1f".join((subject, organisation, role)).encode()
        return base64.urlsafe_b64encode(hmac.new(self._enrol_key, msg, hashlib.sha256).digest()).decode().rstrip("=")

    def authenticate(self, cred: Credential) -> None:
        want = self.enrol_secret(cred.subject, cred.organisation, cred.role)
        if not hmac.compare_digest(want.encode(), cred.secret.encode()):
            raise Refusal("bad_credential", "credential not accepted by the identity provider")

    def issue(self, cred: Credential, now: float, ttl_s: float | None = None) -> str:
        self.authenticate(cred)
        return self.sign_claims(cred.subject, cred.organisation, cred.role, now, ttl_s or self.ttl_s)

    def sign_claims(self, sub: str, org: str, role: str, now: float, ttl_s: float) -> str:
        claims = Claims(iss=self.issuer, kid=self.kid, sub=sub, org=org, role=role, iat=now, exp=now + ttl_s,
                        jti=secrets.token_hex(16))
        return sign(claims, self._key)


class ContextManager:
    """openContext / verify / closeContext. ``redis`` is an asyncio Redis client."""

    def __init__(self, idp: IdentityProvider, redis, trusted: dict[str, Ed25519PublicKey] | None = None) -> None:
        self.idp = idp
        self.redis = redis
        self.trusted = trusted or {idp.kid: idp.public_key}

    def open_context(self, cred: Credential, now: float) -> ContextOut:
        token = self.idp.issue(cred, now)
        return ContextOut(context_id=token, subject=cred.subject, organisation=cred.organisation, role=cred.role,
                          expires_at=now + self.idp.ttl_s)

    async def verify(self, token: str | None, now: float) -> Caller:
        if not token:
            raise Refusal("missing_token", "no context: send 'Authorization: Bearer <context_id>'")
        try:
            claims = verify(token, self.trusted, now)
        except AssertionRejected as e:
            raise Refusal(e.code, e.message) from None
        if await self.redis.exists(REVOKED_PREFIX + claims.jti):
            raise Refusal("revoked", "context was closed (assertion revoked)")
        return Caller(sub=claims.sub, org=claims.org, role=claims.role, jti=claims.jti)

    async def close_context(self, token: str, now: float) -> None:
        try:
            claims = verify(token, self.trusted, now)
        except AssertionRejected as e:
            raise Refusal(e.code, e.message) from None
        ttl = max(1, int(claims.exp - now) + 60)
        await self.redis.set(REVOKED_PREFIX + claims.jti, b"1", ex=ttl)
