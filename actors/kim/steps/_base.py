"""Step registry, step output, typed step faults and the per-process parse cache."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Collection

from actors.runtime.blobs import BlobNotFound
from actors.runtime.crypto import IntegrityError
from protocols.kim.errors import KimError
from protocols.kim.messages import StepOrder
from protocols.kim.mime import ParsedMail, parse_mail
from protocols.kim.pkcs7 import CmsSignedData, unwrap_cms
from protocols.kim.procedures import Procedure


@dataclass
class StepOut:
    """What a step function returns (``run_step`` wraps it into a StepResult)."""

    outcome: str = "ok"
    facts: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, str] = field(default_factory=dict)


StepFn = Callable[[StepOrder, Any], Awaitable[StepOut]]

STEPS: dict[str, StepFn] = {}
LAYER: dict[str, str] = {}

#: Step implementations with an external side effect beyond the blob store (Redis claims,
#: core-system writes, SMTP). All steps are idempotent either way.
EFFECTS: frozenset[str] = frozenset({
    "dedupe_file_hash", "dedupe_bundle_id", "lookup_insured", "eeb_lookup_insured", "deposit_core",
    "release_record", "apply_storno", "handoff_clerk", "answer_error", "send_answer", "eeb_answer_error",
})
#: The duplicate claims (*Dublettenprüfung*): ``SET NX`` of a pseudonymous hash with the mail
#: id as owner. A segment that runs again after a crash claims again and gets its own claim
#: back - nothing to separate, so a claim does not end a fused segment (until 2026-11-24 it
#: did: ``dedupe_bundle_id`` was a segment of its own, one of an eAU's five round trips).
CLAIMS: frozenset[str] = frozenset({"dedupe_file_hash", "dedupe_bundle_id"})
#: A fused segment ends after the first of these, so a durable slip transition separates
#: any two of them (core-system writes, enrolment, SMTP, the clerk's work basket).
ENDS_SEGMENT: frozenset[str] = EFFECTS - CLAIMS


def step(name: str, layer: str = "technical"):
    def deco(fn: StepFn) -> StepFn:
        if name in STEPS:
            raise ValueError(f"step {name!r} registered twice")
        STEPS[name] = fn
        LAYER[name] = layer
        fn.step_name = name  # type: ignore[attr-defined]
        return fn

    return deco


class StepFault(KimError):
    """A typed, non-retryable fault found by a step (e.g. ``wrong_recipient``)."""

    domain = "step"


class Transient(Exception):
    """A retryable fault of a port (I/O)."""

    code = "transient"

    def __init__(self, code: str, reason: str):
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


# ---------------------------------------------------------------------------- cache
class _Lru:
    """Per-process LRU of raw bytes and parsed objects keyed by ``(kind, blob ref)``,
    bounded by an estimate of their memory (personal data stays in this process's memory).

    The budget has to hold every mail a worker host has between two of its segments: a
    mail leaves the worker after an effect step (``archive_original``) and comes back
    after a round trip through its slip, while the host works the other mails in flight
    (~250 per worker host at the admission limit of 500). A bound of 256 entries (~32
    mails) evicted them in between: the eAU's XML was parsed a second time in
    ``extract_fields`` - 9 % of the step work in a py-spy of a 6,000-mail run. A mail's
    entries weigh ~0.35 MB, so the default 128 MiB holds ~380 mails per host.

    ``weight``: bytes count their length; a parsed object the caller's estimate (a
    multiple of its source, measured with tracemalloc), else ``DEFAULT_WEIGHT``."""

    DEFAULT_WEIGHT = 32 * 1024  # a typed document (eAU, eEB) or a record: ~20 KB

    def __init__(self, budget_bytes: int = 128 * 1024 * 1024):
        self.budget = budget_bytes
        self.used = 0
        self._d: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._kinds: dict[str, set[str]] = {}  # blob ref -> the kinds cached for it
        self._lock = threading.Lock()

    def _drop_oldest(self) -> None:
        (kind, ref), (_, ow) = self._d.popitem(last=False)
        self.used -= ow
        ks = self._kinds.get(ref)
        if ks is not None:
            ks.discard(kind)
            if not ks:
                del self._kinds[ref]

    def get(self, key: tuple[str, str]) -> Any:
        with self._lock:
            hit = self._d.get(key)
            if hit is not None:
                self._d.move_to_end(key)
                return hit[0]
        return None

    def put(self, key: tuple[str, str], value: Any, weight: int | None = None) -> Any:
        if isinstance(value, (bytes, bytearray)):
            weight = len(value)
        w = max(1, int(weight if weight is not None else self.DEFAULT_WEIGHT))
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.used -= old[1]
            self._d[key] = (value, w)
            self._kinds.setdefault(key[1], set()).add(key[0])
            self.used += w
            while self.used > self.budget and len(self._d) > 1:
                self._drop_oldest()
        return value

    def forget(self, refs, kinds: Collection[str] | None = None) -> int:
        """Drop everything cached for these blob refs (a mail that reached its end: its
        entries would only wait for eviction, and keep the heap - and the garbage
        collector's full passes - big), or only the entries of ``kinds`` (what a mail's
        later segments do not read: :data:`SEGMENT_KINDS`). Returns how many entries went."""
        n = 0
        with self._lock:
            for ref in refs:
                held = self._kinds.get(ref)
                if not held:
                    continue
                for kind in [k for k in held if kinds is None or k in kinds]:
                    held.discard(kind)
                    hit = self._d.pop((kind, ref), None)
                    if hit is not None:
                        self.used -= hit[1]
                        n += 1
                if not held:
                    del self._kinds[ref]
        return n

    def resize(self, budget_bytes: int) -> None:
        with self._lock:
            self.budget = max(0, int(budget_bytes))
            while self.used > self.budget and self._d:
                self._drop_oldest()

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._kinds.clear()
            self.used = 0


CACHE = _Lru()

SEGMENT_KINDS = frozenset({"xml"})
"""Cache kinds a worker drops when a mail's segment ends: the parsed XML tree of the
payload (``_root``; ~660 objects the garbage collector tracks for an 18 KB eAU - 88 % of
what the cache holds). Every step that walks the tree runs in the mail's first segment;
later segments read the typed documents built from it (``eau``, ``eeb``, ``eau_doc``) and
parse again only if those were evicted. Kept until the mail's end, each tree outlived a
few young-generation passes and was carried by every full pass until then: with 250 mails in
flight on a worker the collector took 2.3 ms per mail, 0.9 without (in-process; in the load
test a worker holds ~15 mails' entries and the hosts' CPU did not move)."""


def blob_ref(order: StepOrder, name: str) -> str:
    ref = order.blobs.get(name)
    if not ref:
        raise Transient("blob_missing", f"the slip has no blob {name!r} (road map order?)")
    return ref


def load_blob(order: StepOrder, ports, name: str) -> bytes:
    ref = blob_ref(order, name)
    hit = CACHE.get(("bytes", ref))
    if hit is not None:
        return hit
    try:
        data = ports.blobs.get(ref)
    except (BlobNotFound, ValueError):
        raise Transient("blob_missing", f"blob {name!r} is not in the blob store") from None
    except IntegrityError:
        raise Transient("blob_integrity", f"blob {name!r} fails its integrity check") from None
    return CACHE.put(("bytes", ref), data)


def put_blob(ports, data: bytes, kind: str, name: str | None = None) -> str:
    """Store a step's blob; durable at the latest before the step's result leaves the
    worker (``run_step(sync=True)`` or the worker's group commit, ``KimPorts.durable``)."""
    ref = ports.blobs.put(data, kind=kind, sync=False)
    CACHE.put(("bytes", ref), data)
    return ref


def parsed_mail(order: StepOrder, ports) -> ParsedMail:
    ref = blob_ref(order, "raw")
    hit = CACHE.get(("mail", ref))
    if hit is not None:
        return hit
    raw = load_blob(order, ports, "raw")
    return CACHE.put(("mail", ref), parse_mail(raw, max_bytes=None), weight=2 * len(raw))


def cms(order: StepOrder, ports) -> CmsSignedData:
    ref = blob_ref(order, "attachment")
    hit = CACHE.get(("cms", ref))
    if hit is not None:
        return hit
    der = load_blob(order, ports, "attachment")
    return CACHE.put(("cms", ref), unwrap_cms(der), weight=4 * len(der))


def cached(kind: str, ref: str, build: Callable[[], Any]) -> Any:
    hit = CACHE.get((kind, ref))
    if hit is not None:
        return hit
    return CACHE.put((kind, ref), build())


def procedure_of(order: StepOrder) -> Procedure:
    """The procedure of the slip's road map (fact ``procedure`` once classified)."""
    p = order.facts.get("procedure")
    if p:
        try:
            return Procedure(p)
        except ValueError:
            pass
    from protocols.kim.roadmap import ROADMAP_OF

    for proc, name in ROADMAP_OF.items():
        if name == order.roadmap:
            return Procedure(proc)
    return Procedure.EMAILPLUS


def findings(facts: dict[str, str]) -> list[str]:
    return sorted(v for k, v in facts.items() if k.startswith("finding_") and v)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
