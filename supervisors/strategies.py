"""The pure decisions of a supervisor: whom to restart, whether, when, and how often.

No Ray here, so every rule is unit-tested without processes
(tests/unit/test_supervisor_specs.py); ``supervisors.supervisor`` applies them.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence

from supervisors.spec import RestartType, Strategy


def should_restart(restart: RestartType, normal_exit: bool) -> bool:
    """permanent: always; transient: only after an abnormal exit; temporary: never."""
    if restart == "permanent":
        return True
    if restart == "transient":
        return not normal_exit
    return False


def restart_group(strategy: Strategy, names: Sequence[str], failed: str) -> list[str]:
    """Children (in spec order) that are stopped and started again when ``failed`` died.

    one_for_one: just ``failed``; one_for_all: all; rest_for_one: ``failed`` and every
    child after it in start order. The caller leaves out siblings that were not running
    (a transient child that ended normally, a temporary one) — they stay as they are.
    """
    if failed not in names:
        raise KeyError(failed)
    if strategy == "one_for_one":
        return [failed]
    if strategy == "one_for_all":
        return list(names)
    if strategy == "rest_for_one":
        return list(names[names.index(failed):])
    raise ValueError(f"unknown strategy {strategy!r}")


def backoff_delay(streak: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform(0, min(max_s, base_s * 2**streak)).

    ``streak`` counts the restarts of the same child in a row (0 for the first), so the
    first restart waits at most ``base_s`` and a crash loop slows down to ``max_s``.
    """
    cap = min(max_s, base_s * (2 ** min(streak, 62)))
    return (rng or random).uniform(0.0, cap)


class RestartIntensity:
    """At most ``max_restarts`` restarts in any ``max_seconds`` window (OTP intensity/period).

    ``record()`` notes one restart and returns False when this one is too many — then the
    supervisor stops its children and fails itself, so its parent decides.
    """

    def __init__(self, max_restarts: int, max_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self._clock = clock
        self._times: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.max_seconds:
            self._times.popleft()

    def record(self) -> bool:
        now = self._clock()
        self._times.append(now)
        self._trim(now)
        return len(self._times) <= self.max_restarts

    def in_window(self) -> int:
        self._trim(self._clock())
        return len(self._times)


class BackoffStreak:
    """Per-child count of restarts in a row; a child that stayed up ``reset_after_s`` starts over."""

    def __init__(self, reset_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.reset_after_s = reset_after_s
        self._clock = clock
        self.streak = 0
        self._last: float | None = None

    def next_delay(self, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
        now = self._clock()
        if self._last is not None and now - self._last > self.reset_after_s:
            self.streak = 0
        delay = backoff_delay(self.streak, base_s, max_s, rng)
        self.streak += 1
        self._last = now
        return delay
