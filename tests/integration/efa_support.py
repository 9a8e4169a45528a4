"""Ports for the EFA entities in tests: a controllable clock (offset in a file) and short
lifecycle periods. Importable by Ray workers (the kind names it by path)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from actors.efa.ports import EfaPorts
from actors.efa.settings import EfaSettings

GRACE_S = 60.0  # suspended -> retired, retired -> archived (in test-clock seconds)


def clock_file(cfg) -> Path:
    return Path(cfg.run_dir) / "tmp" / "efa-test-clock-offset"


def set_offset(cfg, offset: float) -> None:
    p = clock_file(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(repr(float(offset)))
    os.replace(tmp, p)


class FileClock:
    """time.time() + the offset in a file (re-read at most every 50 ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0
        self.read_at = 0.0

    def __call__(self) -> float:
        now = time.time()
        if now - self.read_at > 0.05:
            self.read_at = now
            try:
                self.offset = float(self.path.read_text())
            except (OSError, ValueError):
                self.offset = 0.0
        return now + self.offset


def make_ports(cfg) -> EfaPorts:
    s = EfaSettings(suspend_grace_s=GRACE_S, archive_after_s=GRACE_S)
    return EfaPorts(settings=s, clock=FileClock(clock_file(cfg)))
