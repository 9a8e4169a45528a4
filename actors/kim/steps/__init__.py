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
from actors.kim.steps._base import CACHE, LAYER, STEPS, StepFault, StepOut, Transient
from protocols.kim.errors import KimError
from protocols.kim.messages import StepError, StepOrder, StepResult
from protocols.kim.roadmap import RoadMap, load_roadmap_versions, load_roadmaps

log = logging.getLogger(__name__)

ROADMAP_DIR = Path(__file__).resolve().parent.parent / "roadmaps"

__all__ = [
    "STEPS", "LAYER", "StepOut", "StepFault", "run_step", "roadmaps", "roadmap_versions", "roadmap_for", "ROADMAP_DIR", "CACHE",
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


async def run_step(order: StepOrder, ports) -> StepResult:
    """Run one step of one mail. Never raises; always returns a :class:`StepResult`."""
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
