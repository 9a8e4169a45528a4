"""Tiny supervised child actors for tests/integration/test_supervisors.py.

Kept in their own importable module (never the test's ``__main__``): supervisors import
them by ``"tests.integration.sup_children:Worker"``; the repository root must be on
``PYTHONPATH`` before Ray starts (Ray workers do not see pytest's import path).
"""

from __future__ import annotations

import os

from supervisors.child import Supervised


class Worker(Supervised):
    """Answers its pid; ``finish()`` ends it on purpose (a normal exit)."""

    def __init__(self, label: str = "") -> None:
        self.label = label

    async def pid(self) -> int:
        return os.getpid()

    async def hello(self) -> str:
        return f"hello from {self.label or 'worker'} ({os.getpid()})"

    async def finish(self, reason: str = "done") -> None:
        await self.stop(reason)


class Broken(Supervised):
    """Its constructor fails: the supervisor must not pretend it started."""

    def __init__(self) -> None:
        raise RuntimeError("cannot open the mailbox")
