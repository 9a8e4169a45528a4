"""A trivial entity for ``automat bench runtime`` (importable by Ray workers).

It lives beside the protocols because it is only messages and a counter; it imports the
runtime's entity base, which is why the class is defined lazily below.
"""

from __future__ import annotations

from pydantic import BaseModel


class Add(BaseModel):
    n: int


class Get(BaseModel):
    pass


class Count(BaseModel):
    total: int


class CountState(BaseModel):
    total: int = 0


def __getattr__(name: str):  # BenchCounter needs actors.runtime; keep protocols import-pure
    if name == "BenchCounter":
        from actors.runtime.entity import Entity, handles

        class BenchCounter(Entity[CountState]):
            kind = "bench.counter"
            State = CountState

            @handles
            def on_add(self, msg: Add) -> None:
                self.state.total += msg.n

            @handles(readonly=True)
            def on_get(self, msg: Get) -> Count:
                return Count(total=self.state.total)

        globals()["BenchCounter"] = BenchCounter
        return BenchCounter
    raise AttributeError(name)
