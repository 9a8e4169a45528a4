"""The entity base: a key, a pydantic state, one handler per typed message.

An entity reads like an Akka typed behaviour::

    class Counter(Entity[CounterState]):
        kind = "demo.counter"
        State = CounterState

        @handles
        def on_add(self, msg: Add) -> Total:
            self.state.total += msg.n
            return Total(total=self.state.total)

Handlers may be plain or ``async``. Side effects go through ``self.ctx`` (the injected
ports): ``emit`` (boundary event, written atomically with the state), ``tell`` (a message
to another entity, sent only after the state is durable), ``set_timer`` /
``cancel_timer`` (durable reminders that fire after restarts too), ``ask`` (a direct
request to another entity — real I/O, so keep handlers idempotent), ``now``, ``ports``.

The runtime guarantees: one message at a time per entity, in arrival order; a reply
is sent only after the state change it reflects is durable; a handler that raises is
retried from the last durable state and, when it keeps failing, dead-lettered.
"""

from __future__ import annotations

import inspect
import time
import typing
from typing import Any, Callable, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from protocols.events import Event

S = TypeVar("S", bound=BaseModel)

_HANDLER_ATTR = "__automat_handler__"


def handles(fn: Callable | None = None, *, readonly: bool = False):
    """Mark a method as the handler of the message type its ``msg`` parameter names.

    ``readonly=True`` promises the handler does not change state (no write is made).
    """

    def mark(f: Callable) -> Callable:
        setattr(f, _HANDLER_ATTR, {"readonly": readonly})
        return f

    return mark(fn) if fn is not None else mark


class Handler(typing.NamedTuple):
    name: str
    is_async: bool
    readonly: bool


class TimerSpec(typing.NamedTuple):
    name: str
    due: float
    message: BaseModel


class Effects:
    """Side effects buffered during one round; they take effect only at commit."""

    __slots__ = ("events", "tells", "timers_set", "timers_cancelled", "delete")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.tells: list[tuple[str, str, BaseModel]] = []
        self.timers_set: dict[str, TimerSpec] = {}
        self.timers_cancelled: set[str] = set()
        self.delete = False


class EntityContext:
    """The ports an entity sees. One per entity; effects are per round."""

    __slots__ = ("kind", "key", "ports", "_effects", "_clock", "_asker")

    def __init__(self, kind: str, key: str, ports: Any, clock: Callable[[], float], asker) -> None:
        self.kind = kind
        self.key = key
        self.ports = ports
        self._clock = clock
        self._asker = asker
        self._effects = Effects()

    # -- effects (durable with the state) ---------------------------------------
    def emit(self, event: Event) -> None:
        self._effects.events.append(event)

    def tell(self, kind: str, key: str, msg: BaseModel) -> None:
        self._effects.tells.append((kind, key, msg))

    def set_timer(self, name: str, msg: BaseModel, *, delay_s: float | None = None, at: float | None = None) -> None:
        if (delay_s is None) == (at is None):
            raise ValueError("set_timer needs exactly one of delay_s / at")
        due = at if at is not None else self.now() + float(delay_s)
        self._effects.timers_cancelled.discard(name)
        self._effects.timers_set[name] = TimerSpec(name, due, msg)

    def cancel_timer(self, name: str) -> None:
        self._effects.timers_set.pop(name, None)
        self._effects.timers_cancelled.add(name)

    def delete_entity(self) -> None:
        """Remove the entity's stored state at commit (e.g. an archived record)."""
        self._effects.delete = True

    # -- direct ---------------------------------------------------------------------
    def now(self) -> float:
        return self._clock()

    async def ask(self, kind: str, key: str, msg: BaseModel, timeout_s: float | None = None) -> Any:
        return await self._asker(kind, key, msg, timeout_s)


class Entity(Generic[S]):
    """Base class of every entity kind. Subclasses set ``kind`` and ``State``."""

    kind: ClassVar[str]
    State: ClassVar[type[BaseModel]]
    #: encrypt the stored state (AES-256-GCM) — set for anything with personal data
    personal_data: ClassVar[bool] = False
    #: the kinds this entity sends to: its host opens those lanes at start (warm-up)
    talks_to: ClassVar[tuple[str, ...]] = ()
    #: message type -> handler, built at class creation from ``@handles`` methods
    _handlers: ClassVar[dict[type, Handler]] = {}
    _handlers_by_name: ClassVar[dict[str, Handler]] = {}

    def __init__(self, key: str, state: S, ctx: EntityContext) -> None:
        self.key = key
        self.state: S = state
        self.ctx = ctx

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        handlers: dict[type, Handler] = {}
        for base in reversed(cls.__mro__):
            for name, fn in vars(base).items():
                meta = getattr(fn, _HANDLER_ATTR, None)
                if meta is None:
                    continue
                hints = typing.get_type_hints(fn)
                params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
                if len(params) != 1 or params[0].name not in hints:
                    raise TypeError(f"{cls.__name__}.{name}: a handler takes exactly one annotated message")
                mtype = hints[params[0].name]
                if not (isinstance(mtype, type) and issubclass(mtype, BaseModel)):
                    raise TypeError(f"{cls.__name__}.{name}: message type must be a pydantic model")
                handlers[mtype] = Handler(name, inspect.iscoroutinefunction(fn), meta["readonly"])
        cls._handlers = handlers
        cls._handlers_by_name = {t.__qualname__: h for t, h in handlers.items()}

    @classmethod
    def initial_state(cls, key: str) -> S:
        """State of an entity that has never been stored. Override for required fields."""
        return cls.State()  # type: ignore[call-arg]

    @classmethod
    def handler_for(cls, msg: BaseModel) -> Handler | None:
        return cls._handlers.get(type(msg))

    def on_activate(self) -> None:
        """Called after the state was loaded (or created). Override if needed."""

    def at_rest(self) -> bool:
        """Is this entity's work over (a finished mail, a closed case)? Its host then lets
        it go as soon as its state is stored and nothing is queued for it, instead of
        keeping it ``passivate_after_s`` in memory; a later message activates it again
        from the store. Override where the state says so; default: never."""
        return False


def wall_clock() -> float:
    return time.time()
