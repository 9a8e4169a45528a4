"""KIM step implementations and :func:`run_step`, the one entry point of the step workers.

``STEPS`` maps implementation names to ``async def fn(order, ports) -> StepOut``. Steps
are stateless and idempotent; facts they return are control information only (codes,
pseudonymous hashes, counts), personal data goes to the blob store (``StepOut.blobs``).

Blob names on a slip: ``raw`` (the mail, put by the mailbox), ``attachment``,
``payload``, ``archive``, ``eau_doc`` / ``eeb_doc``, ``record``, ``answer``, ``clerk_view``.

Error handling of :func:`run_step` (never raises):

* :class:`~protocols.kim.errors.KimError` (protocol faults, :class:`StepFault`) –
  ``StepError(code, reason, retryable=False)``: the road map's ``on_error`` branch.
* core system, SMTP, Redis, OS/IO faults and unknown exceptions – ``retryable=True``
  (the stateshifter retries with backoff, then parks the slip).
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

from actors.kim.core_system import CoreSystemError, CoreSystemRejected
from actors.kim.smtp import SmtpSendError
from actors.kim.steps import answers, domain, technical  # noqa: F401  (registration)
from actors.kim.steps._base import (CACHE, CLAIMS, EFFECTS, ENDS_SEGMENT, LAYER, SEGMENT_KINDS, STEPS, StepFault, StepOut,
                                   Transient)
from protocols.kim.errors import KimError
from protocols.kim.messages import StepError, StepOrder, StepResult
from protocols.kim.roadmap import RoadMap, load_roadmap_versions, load_roadmaps

log = logging.getLogger(__name__)

ROADMAP_DIR = Path(__file__).resolve().parent.parent / "roadmaps"

__all__ = [
    "STEPS", "LAYER", "EFFECTS", "CLAIMS", "ENDS_SEGMENT", "StepOut", "StepFault", "run_step", "run_chain", "roadmaps", "roadmap_versions", "roadmap_for", "ROADMAP_DIR", "CACHE",
]


@lru_cache(maxsize=1)
def roadmap_versions() -> dict[tuple[str, int], RoadMap]:
    """All road maps shipped in ``actors/kim/roadmaps`` (validated against ``STEPS``)."""
    return load_roadmap_versions(ROADMAP_DIR, STEPS)


def roadmaps() -> dict[str, RoadMap]:
    """Newest version of each shipped road map."""
    return load_roadmaps(ROADMAP_DIR, STEPS)


def roadmap_for(name: str, version: int | None = None) -> RoadMap:
    versions = roadmap_versions()
    if version is None:
        cands = [rm for (n, _), rm in versions.items() if n == name]
        if not cands:
            raise KeyError(f"no road map {name!r}")
        return max(cands, key=lambda r: r.version)
    return versions[(name, version)]


def _impl(order: StepOrder) -> str:
    try:
        return roadmap_for(order.roadmap, order.roadmap_version).step(order.step).impl
    except KeyError:
        return order.step


def _error(exc: BaseException) -> StepError:
    if isinstance(exc, KimError):
        return StepError(code=exc.code, reason=exc.reason[:500], retryable=False)
    if isinstance(exc, CoreSystemRejected):
        return StepError(code=CoreSystemRejected.code, reason=str(exc)[:500], retryable=False)
    if isinstance(exc, (CoreSystemError, SmtpSendError, Transient)):
        return StepError(code=getattr(exc, "code", "transient"), reason=str(exc)[:500], retryable=True)
    try:
        import redis.exceptions as rexc

        if isinstance(exc, rexc.RedisError):
            return StepError(code="redis_unavailable", reason=type(exc).__name__, retryable=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (OSError, TimeoutError)):
        return StepError(code="io_error", reason=f"{type(exc).__name__}: {getattr(exc, 'strerror', '') or ''}"[:200], retryable=True)
    # a bug or an unexpected state: retry, then park for an operator (no exception text:
    # it might quote data)
    return StepError(code="internal_error", reason=f"unexpected {type(exc).__name__}", retryable=True)


def _sync_blobs(ports) -> StepError | None:
    blobs = getattr(ports, "blobs", None)
    sync = getattr(blobs, "sync", None)
    if sync is None:
        return None
    try:
        sync()
    except OSError as e:
        return StepError(code="io_error", reason=f"blob store sync failed: {e.strerror or type(e).__name__}",
                         retryable=True)
    return None


async def run_step(order: StepOrder, ports, *, sync: bool = True) -> StepResult:
    """Run one step of one mail. Never raises; always returns a :class:`StepResult`.

    ``sync``: the blobs the step wrote are durable when this returns (one group barrier
    of the blob store). A worker that runs many orders passes ``sync=False`` and makes
    them durable together (``KimPorts.durable``) before any result leaves."""
    res = await _run_step(order, ports)
    if sync and res.error is None:
        err = _sync_blobs(ports)
        if err is not None:
            res.error, res.outcome, res.facts, res.blobs = err, "error", {}, {}
    return res


async def run_chain(order: StepOrder, ports, *, max_steps: int | None = None, sync: bool = True) -> list[StepResult]:
    """Run ``order.step`` and then, fused into this one call, the road map's following
    steps while (a) the step succeeded and the road map says "next", (b) the step just
    run was no side effect that ends a segment (:data:`ENDS_SEGMENT`: the
    :data:`EFFECTS` but the idempotent duplicate :data:`CLAIMS`) and (c) fewer than ``max_steps``
    (default ``order.chain``) ran. Every step is run and timed on its own; the facts and
    blobs flow to the next order exactly as the stateshifter would pass them. Never raises."""
    limit = max(1, int(max_steps if max_steps is not None else order.chain))
    try:
        rm = roadmap_for(order.roadmap, order.roadmap_version) if limit > 1 else None
    except KeyError:
        rm = None
    results: list[StepResult] = []
    cur = order
    facts, blobs = dict(order.facts), dict(order.blobs)
    while True:
        t = time.time()
        res = await _run_step(cur, ports)
        res.started_at = t
        results.append(res)
        if rm is None or res.error is not None or len(results) >= limit or _impl(cur) in ENDS_SEGMENT:
            break
        try:
            d = rm.decide(res)
        except KeyError:
            break
        if d.action != "next" or not d.next_step:
            break
        facts.update(res.facts)
        facts.update(d.facts)
        blobs.update(res.blobs)
        cur = StepOrder(mail_id=order.mail_id, step=d.next_step, attempt=d.attempt, roadmap=order.roadmap,
                        roadmap_version=order.roadmap_version, mailbox=order.mailbox, facts=dict(facts),
                        blobs=dict(blobs), dispatched_at=order.dispatched_at, chain=1)
    if sync:
        err = _sync_blobs(ports)
        if err is not None:  # nothing of this segment counts: retry it from its first step
            first = results[0]
            return [StepResult(mail_id=order.mail_id, step=first.step, attempt=first.attempt, error=err,
                               started_at=first.started_at, duration_ms=first.duration_ms)]
    refs = {*blobs.values(), *results[-1].blobs.values()}
    if rm is not None and _ends_mail(rm, results[-1]):
        # the mail's last step ran: what the cache holds of it is of no further use
        CACHE.forget(refs)
    elif results[-1].error is None and _impl(cur) in ENDS_SEGMENT:
        # the segment ended at an effect, the mail goes round its slip: the XML tree is not
        # walked again (a chain cut short by ``max_steps`` keeps it for the next one)
        CACHE.forget(refs, kinds=SEGMENT_KINDS)
    return results


def _ends_mail(rm, last: StepResult) -> bool:
    if last.error is not None:
        return False  # a retry or an error route may still need the parsed mail
    try:
        return rm.decide(last).action == "terminal"
    except Exception:  # noqa: BLE001 - a road map that cannot decide keeps the cache as it is
        return False


async def _run_step(order: StepOrder, ports) -> StepResult:
    t0 = time.perf_counter()
    impl = _impl(order)
    fn = STEPS.get(impl)
    if fn is None:
        return StepResult(
            mail_id=order.mail_id, step=order.step, attempt=order.attempt,
            error=StepError(code="unknown_step", reason=f"no step implementation {impl!r}", retryable=False),
            duration_ms=(time.perf_counter() - t0) * 1000,
        )
    try:
        out = await fn(order, ports)
        return StepResult(
            mail_id=order.mail_id, step=order.step, attempt=order.attempt, outcome=out.outcome,
            facts={k: str(v) for k, v in out.facts.items()}, blobs=dict(out.blobs),
            duration_ms=(time.perf_counter() - t0) * 1000,
        )
    except Exception as exc:  # noqa: BLE001 - turned into a StepError
        err = _error(exc)
        if err.code == "internal_error":
            log.warning("step %s of mail %s failed: %s", order.step, order.mail_id, type(exc).__name__, exc_info=True)
        return StepResult(
            mail_id=order.mail_id, step=order.step, attempt=order.attempt, error=err,
            duration_ms=(time.perf_counter() - t0) * 1000,
        )
