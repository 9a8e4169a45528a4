"""Core-system faults that change while the system runs (chaos runs).

``AUTOMAT_KIM_CORE_FAULTS=file:<path>`` makes every worker wrap its core system in a
:class:`ControlledFaults`: the file holds a fault spec in the syntax of
``AUTOMAT_KIM_CORE_FAULTS`` (``error=1.0`` – fail; ``timeout=1.0,timeout_s=30`` – hang;
``slow=1.0,slow_s=2`` – answer slowly; ``lost_reply=0.02`` – deposit done, reply lost;
empty – healthy) and is re-read at most every ``poll_s`` seconds, so a chaos driver can
switch the core system between healthy, failing, hanging and slow at random moments.
A missing or unreadable file means no faults.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from actors.kim.core_system import CoreSystem, FaultyCoreSystem

_KEYS = {"error": "error_rate", "timeout": "timeout_rate", "lost_reply": "lost_reply_rate", "slow": "slow_rate",
         "slow_s": "slow_s", "timeout_s": "timeout_s", "seed": "seed"}
_DEFAULTS = {"error_rate": 0.0, "timeout_rate": 0.0, "lost_reply_rate": 0.0, "slow_rate": 0.0, "slow_s": 0.05,
             "timeout_s": 0.05}


def parse_fault_spec(spec: str) -> dict[str, Any]:
    """``"error=0.1,slow=0.5,slow_s=1"`` -> FaultyCoreSystem keyword arguments."""
    kw: dict[str, Any] = {}
    for part in spec.replace("\n", ",").split(","):
        if not part.strip() or part.strip().startswith("#"):
            continue
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in _KEYS:
            raise ValueError(f"core fault spec: unknown key {k!r} (known: {', '.join(_KEYS)})")
        kw[_KEYS[k]] = int(v) if k == "seed" else float(v)
    return kw


class ControlledFaults(FaultyCoreSystem):
    """A :class:`FaultyCoreSystem` whose rates come from a control file, re-read live."""

    def __init__(self, inner: CoreSystem, path: str | Path, *, poll_s: float = 0.2, seed: int = 0):
        super().__init__(inner, seed=seed)
        self.path = Path(path)
        self.poll_s = poll_s
        self._checked = 0.0
        self._mtime: float | None = None
        self.spec = ""

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.poll_s:
            return
        self._checked = now
        try:
            st = self.path.stat()
            if st.st_mtime == self._mtime:
                return
            text = self.path.read_text()
            kw = parse_fault_spec(text)
            self._mtime = st.st_mtime
        except (OSError, ValueError):
            kw, text, self._mtime = {}, "", None
        kw.pop("seed", None)
        for k, v in {**_DEFAULTS, **kw}.items():
            setattr(self, k, v)
        self.spec = text.strip()

    async def _before(self) -> None:
        self.refresh()
        await super()._before()

    async def deposit(self, record: dict[str, Any], idempotency_key: str):
        self.refresh()
        return await super().deposit(record, idempotency_key)
