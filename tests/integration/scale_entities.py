"""Entity kinds for the scale-out tests (importable: Ray workers load them by path)."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

from actors.runtime.entity import Entity, handles


class Work(BaseModel):
    """A unit of work that blocks its host for ``ms`` (like a CPU-bound step)."""

    ms: float = 5.0
    seq: int = 0
    sender: str = ""


class Done(BaseModel):
    count: int


class WorkState(BaseModel):
    count: int = 0
    last_seq: dict[str, int] = {}
    out_of_order: int = 0


class Worker(Entity[WorkState]):
    """Counts the work it did (durably): a lost or doubled message shows in ``count``."""

    kind = "test.work"
    State = WorkState

    @handles
    async def on_work(self, msg: Work) -> Done:
        time.sleep(msg.ms / 1000.0)  # blocks the host's loop: a busy host is a slow host
        await asyncio.sleep(0)
        self.state.count += 1
        if msg.sender:
            if msg.seq != self.state.last_seq.get(msg.sender, -1) + 1:
                self.state.out_of_order += 1
            self.state.last_seq[msg.sender] = msg.seq
        return Done(count=self.state.count)


class Seq(BaseModel):
    sender: str
    seq: int


class SeqState(BaseModel):
    count: int = 0
    last_seq: dict[str, int] = {}
    out_of_order: int = 0
    violations: list[str] = []  # the first few, for a readable failure


class SeqReply(BaseModel):
    count: int
    out_of_order: int
    violations: list[str]


class Ordered(Entity[SeqState]):
    """Checks that each sender's messages arrive in the order they were sent."""

    kind = "test.ordered"
    State = SeqState

    @handles
    def on_seq(self, msg: Seq) -> SeqReply:
        import os

        s = self.state
        s.count += 1
        prev = s.last_seq.get(msg.sender, -1)
        if msg.seq != prev + 1:
            s.out_of_order += 1
            if len(s.violations) < 5:
                s.violations.append(f"{msg.sender}: got {msg.seq} after {prev} (pid {os.getpid()})")
        s.last_seq[msg.sender] = max(prev, msg.seq)
        return SeqReply(count=s.count, out_of_order=s.out_of_order, violations=s.violations)
