"""Shared pieces of the parser fuzz suite (``tests/unit/fuzz``).

Profiles (``AUTOMAT_FUZZ_PROFILE``): ``ci`` (default, fast: the whole suite in well under a
minute) and ``deep`` (``make fuzz``: many thousand examples per parser).
``AUTOMAT_FUZZ_EXAMPLES=N`` overrides the example count of every fuzz test.

Every fuzz test calls :func:`tried` once per example with the parser's name; the suite's
conftest prints the counts at the end of the session and writes them as JSON to
``AUTOMAT_FUZZ_REPORT`` (default ``.run/fuzz-counts.json``).
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("AUTOMAT_FUZZ_PROFILE", "ci")
_EXAMPLES = {"ci": 60, "deep": 4000}
EXAMPLES = int(os.environ.get("AUTOMAT_FUZZ_EXAMPLES", _EXAMPLES.get(PROFILE, 60)))

#: settings for a fuzz test; ``scale`` for slow parsers (fewer examples, same profile ratio)
def fuzz(scale: float = 1.0) -> settings:
    return settings(max_examples=max(10, int(EXAMPLES * scale)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


COUNTS: Counter = Counter()


def tried(parser: str, n: int = 1) -> None:
    COUNTS[parser] += n


@st.composite
def mutated(draw, sample: bytes, others: tuple[bytes, ...] = ()):
    """``sample`` after 1-8 random edits: bit flips, inserts, deletes, truncation, splices."""
    data = bytearray(sample)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(("flip", "insert", "delete", "truncate", "splice", "dup")))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 128))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice" and others:
            other = draw(st.sampled_from(others))
            if other:
                start = draw(st.integers(0, len(other) - 1))
                data[pos:pos] = other[start:start + draw(st.integers(1, 300))]
        elif op == "dup" and data:
            end = min(len(data), pos + draw(st.integers(1, 200)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def text_mutations(sample: str, alphabet: str = "<>/=\"'&;:.,- \r\n\t\x00\\|^~#{}[]") -> st.SearchStrategy[str]:
    """Text edits that hit the syntax of XML/JSON/HL7: structural characters in random places."""

    @st.composite
    def _m(draw):
        s = list(sample)
        for _ in range(draw(st.integers(1, 6))):
            pos = draw(st.integers(0, max(len(s) - 1, 0)))
            op = draw(st.sampled_from(("ins", "del", "rep")))
            ch = draw(st.text(alphabet=alphabet + "aZ09äß\u2028\ud7ff", min_size=1, max_size=4))
            if op == "ins":
                s[pos:pos] = list(ch)
            elif op == "del" and s:
                del s[pos:pos + draw(st.integers(1, 40))]
            elif s:
                s[pos] = ch
        return "".join(s)

    return _m()
