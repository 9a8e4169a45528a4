"""EFA identity assertions (``protocols/efa/assertion.py``) under random and tampered tokens.

``verify`` returns the claims of a genuine, valid token and raises ``AssertionRejected``
for everything else - never another exception, and never accepts a token that was changed
after signing (the security property).
"""

from __future__ import annotations

import time
from functools import lru_cache

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from protocols.efa.assertion import AssertionRejected, Claims, key_id, sign, unverified_claims, verify
from tests.unit.fuzz._fuzz import fuzz, tried

NOW = 1_800_000_000.0


@lru_cache(maxsize=1)
def issuer():
    k = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    return k, {key_id(k.public_key()): k.public_key()}


def token(**over) -> str:
    k, trusted = issuer()
    c = dict(iss="automat-efa-idp", kid=next(iter(trusted)), sub="telematik-id-1", org="praxis-a", role="arzt",
             iat=NOW - 10, exp=NOW + 3600, jti="0123456789abcdef")
    c.update(over)
    return sign(Claims(**c), k)


def check(tok) -> Claims | None:
    tried("efa.assertion.verify")
    try:
        return verify(tok, issuer()[1], NOW)
    except AssertionRejected as e:
        assert e.code in ("malformed_token", "untrusted_issuer", "bad_signature", "expired", "not_yet_valid")
        return None


@fuzz()
@given(st.text(max_size=300) | st.binary(max_size=100).map(lambda b: b.decode("latin-1")))
def test_random_tokens_are_rejected_with_a_code(tok):
    assert check(tok) is None
    tried("efa.assertion.unverified_claims")
    try:
        unverified_claims(tok)
    except AssertionRejected:
        pass


@fuzz()
@given(st.data())
def test_any_change_to_a_genuine_token_is_rejected(data):
    good = token()
    assert check(good) is not None
    pos = data.draw(st.integers(0, len(good) - 1))
    ch = data.draw(st.characters(codec="utf-8", exclude_categories=("Cs",)))
    op = data.draw(st.sampled_from(("replace", "insert", "delete")))
    if op == "replace":
        bad = good[:pos] + ch + good[pos + 1:]
    elif op == "insert":
        bad = good[:pos] + ch + good[pos:]
    else:
        bad = good[:pos] + good[pos + 1:]
    claims = check(bad)
    if claims is not None:
        # base64 ignores nothing here, but padding-equivalent spellings may decode to the
        # same bytes: then the claims must be exactly the signed ones
        assert claims == unverified_claims(good), (good, bad)


@fuzz()
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True))
def test_validity_period_with_odd_numbers(iat, exp):
    """A token signed with NaN/inf times must never count as valid forever."""
    tried("efa.assertion.verify")
    try:
        tok = token(iat=iat, exp=exp)
    except ValueError:
        return
    c = check(tok)
    if c is not None:
        assert NOW <= c.exp + 5 and c.iat <= NOW + 5
