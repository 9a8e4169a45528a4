"""Entity kinds used by the runtime tests (importable: Ray workers load them by path)."""

from __future__ import annotations

from pydantic import BaseModel

from actors.runtime.entity import Entity, handles
from protocols.events import Event


class Add(BaseModel):
    n: int
    seq: int = 0
    sender: str = ""


class Get(BaseModel):
    pass


class Boom(BaseModel):
    """Raises inside the handler after mutating state."""

    times: int = 99  # fail this many attempts


class Remind(BaseModel):
    delay_s: float
    n: int


class Unhandled(BaseModel):
    pass


class Total(BaseModel):
    total: int
    seen: dict[str, int]
    count: int
    out_of_order: int = 0


class CounterState(BaseModel):
    total: int = 0
    count: int = 0
    last_seq: dict[str, int] = {}
    out_of_order: int = 0
    boom_attempts: int = 0


class Counter(Entity[CounterState]):
    kind = "test.counter"
    State = CounterState

    @handles
    def on_add(self, msg: Add) -> Total:
        self.state.total += msg.n
        self.state.count += 1
        if msg.sender:
            prev = self.state.last_seq.get(msg.sender, -1)
            if msg.seq != prev + 1:
                self.state.out_of_order += 1
            self.state.last_seq[msg.sender] = msg.seq
        if msg.n >= 1000:
            self.ctx.emit(Event(topic="test.counter", type="counter.big", key=self.key, data={"n": msg.n}))
        return self.total()

    @handles(readonly=True)
    def on_get(self, msg: Get) -> Total:
        return self.total()

    @handles
    def on_boom(self, msg: Boom) -> Total:
        self.state.total += 1_000_000  # must be rolled back
        raise RuntimeError("boom")

    @handles
    def on_remind(self, msg: Remind) -> None:
        self.ctx.set_timer("remind", Add(n=msg.n), delay_s=msg.delay_s)

    def total(self) -> Total:
        return Total(total=self.state.total, seen=dict(self.state.last_seq), count=self.state.count,
                     out_of_order=self.state.out_of_order)


class Secret(Entity[CounterState]):
    kind = "test.secret"
    State = CounterState
    personal_data = True

    @handles
    def on_add(self, msg: Add) -> Total:
        self.state.total += msg.n
        return Total(total=self.state.total, seen={}, count=0)


class Tally(Counter):
    """A counter whose work is over at a total of 100 or more (``at_rest``)."""

    kind = "test.tally"

    def at_rest(self) -> bool:
        return self.state.total >= 100
