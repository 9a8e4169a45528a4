"""The garbage collector's share of a process: collections and pause time per generation.

A shard host keeps many objects alive for a long time (its entities' states, the KIM step
cache of parsed mails and certificates, Ray's and pydantic's own structures), and Python's
cyclic collector walks all of them in every full (generation 2) collection. py-spy
attributes that pause to whatever allocation triggered it - in the KIM worker hosts mostly
the XML parser - so it hides in a profile. :class:`GcClock` measures it directly with a
``gc.callbacks`` hook (two ``perf_counter`` calls per collection); the shard hosts report it
in their ``stats()`` (``gc``). The seconds are wall time: on an oversubscribed machine a long
pass is preempted several times, so they overstate the collector's CPU (measured 2026-11-24:
~6 s per worker host and minute, yet cutting it to ~0.4 s moved no throughput).

:func:`tune` is what a shard host applies after its warm-up (``runtime.gc_freeze``,
``runtime.gc_threshold0``, both off by default): ``gc.freeze()`` moves everything alive after start-up (modules,
Ray's worker, pydantic schemas) to the permanent generation, so full collections walk only
what the host created since; a higher first threshold makes young collections rarer on a
host that allocates many short-lived objects per message.
"""

from __future__ import annotations

import gc
import threading
import time

__all__ = ["GcClock", "gc_clock", "tune"]


class GcClock:
    """Counts the collector's runs and pause time per generation in this process."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max_pause_s = 0.0
        self.collected = 0
        self._t0 = 0.0
        self._installed = False

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        dt = time.perf_counter() - self._t0
        g = min(2, int(info.get("generation", 0)))
        self.collections[g] += 1
        self.seconds[g] += dt
        self.collected += int(info.get("collected", 0))
        if dt > self.max_pause_s:
            self.max_pause_s = dt

    def install(self) -> "GcClock":
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def snapshot(self) -> dict:
        """For ``stats()``: per generation collections and seconds, the longest pause, the
        thresholds and the objects frozen out of collection."""
        return {
            "collections": list(self.collections),
            "seconds": [round(s, 4) for s in self.seconds],
            "total_s": round(sum(self.seconds), 4),
            "max_pause_ms": round(self.max_pause_s * 1000, 2),
            "collected": self.collected,
            "threshold": list(gc.get_threshold()),
            "frozen": gc.get_freeze_count(),
        }


_lock = threading.Lock()
_clock: GcClock | None = None


def gc_clock() -> GcClock:
    """The process's one clock (installed on first use)."""
    global _clock
    with _lock:
        if _clock is None:
            _clock = GcClock().install()
        return _clock


_frozen = False  # gc.freeze() done in this process (a host warms up again when lanes were missing)


def tune(*, freeze: bool, threshold0: int | None) -> None:
    """Apply the host's collector settings (see module doc). The freeze - a full collection
    first, a pause of up to a few hundred ms - happens once per process."""
    global _frozen
    if threshold0:
        _, t1, t2 = gc.get_threshold()
        gc.set_threshold(int(threshold0), t1, t2)
    if freeze and not _frozen:
        gc.collect()  # what is garbage now need not be frozen
        gc.freeze()
        _frozen = True
