"""OTP-style supervisors made of Ray actors.

A :class:`Supervisor` is a light async Ray actor (``num_cpus=0``) that owns the children
of a :class:`~supervisors.spec.SupervisorSpec`:

* it starts them in spec order as named actors ``<name>#<generation>`` in its namespace
  (a dead actor's name stays taken while any handle to it lives, so every incarnation
  gets a fresh name; ``supervisors.resolve`` finds the current one);
* it keeps one pending ``watch()`` call per child in a task set it holds on to — a
  SIGKILLed child fails that call with ``ActorDiedError`` within ~10-20 ms, a child that
  stops on purpose makes it return (a normal exit);
* it restarts by strategy (one_for_one, one_for_all, rest_for_one) and restart type
  (permanent, transient, temporary), waiting a full-jitter exponential backoff between
  restarts of the same child, and counting restarts against the intensity
  (``max_restarts`` in ``max_seconds``): one more, and it stops its children in reverse
  order, lets its ``watch()`` callers know why, and exits its process — its parent sees
  it die and applies its own strategy;
* nested ``SupervisorSpec`` children are supervisor actors themselves (subtrees). Child
  actors are not detached: if a supervisor process is killed, Ray takes its children
  with it, and the parent restarts the whole subtree.

Every child carries state (starting/running/restarting/stopped/failed), restart count,
last death reason, last restart duration (death noticed → new incarnation serving, ms,
backoff included), pid and node id; ``tree()`` returns it all, recursing into subtrees.
Restarts are counted in the Ray metric ``automat_restarts_total{supervisor,child}``.

The root tree is one detached actor, ``automat.root`` (:func:`start_root`,
:func:`stop_root`); ``automat status`` prints its ``tree()`` (``supervisors.status``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.util.metrics
from ray.exceptions import ActorAlreadyExistsError, ActorUnavailableError, RayActorError, RayTaskError

from supervisors.child import Supervised
from supervisors.spec import GENERATION_SEP, ChildSpec, SupervisorSpec
from supervisors.strategies import BackoffStreak, RestartIntensity, restart_group, should_restart

log = logging.getLogger("automat.supervisors")

NAMESPACE = "automat"
ROOT_NAME = "automat.root"

STARTING, RUNNING, RESTARTING, STOPPED, FAILED = "starting", "running", "restarting", "stopped", "failed"


class SupervisorFailed(RuntimeError):
    """The supervisor exceeded its restart intensity (raised to its ``watch()`` callers)."""


class SupervisorStartError(RuntimeError):
    """A child could not be started when the supervisor (or root) started."""


def incarnation_name(logical: str, generation: int) -> str:
    return f"{logical}{GENERATION_SEP}{generation}"


_INCARNATION_RE = re.compile(r"^(?P<logical>.+)" + re.escape(GENERATION_SEP) + r"(?P<gen>\d+)$")


def parse_incarnation(actor_name: str) -> tuple[str, int] | None:
    """``"kim.host.0#3"`` → ``("kim.host.0", 3)``; None for a name without a generation."""
    m = _INCARNATION_RE.match(actor_name)
    return (m["logical"], int(m["gen"])) if m else None


def describe_exit(exc: BaseException) -> str:
    """A one-line reason for a child's end, short enough for ``automat status``."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"[:300]
        return f"task error: {str(exc).splitlines()[0]}"[:300]
    if isinstance(exc, RayActorError):
        text = str(exc)
        kind = re.search(r"Worker exit type: (\w+)", text)
        detail = re.search(r"Worker exit detail: (.*?)(?: Some common causes|$)", text, re.S)
        if "creation task" in text:
            m = re.search(r"(\w+(?:Error|Exception)[^\n]*)", text.split("creation task", 1)[1])
            return f"constructor failed: {m.group(1) if m else 'see the actor log'}"[:300]
        if kind:
            more = f": {' '.join(detail.group(1).split())}" if detail else ""
            return f"died ({kind.group(1)}){more}"[:300]
        return f"died: {' '.join(text.split())}"[:300]
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:300]


_class_cache: dict[str, Any] = {}


def load_actor_class(path: str) -> Any:
    """``"module.path:ClassName"`` → a Ray actor class (plain classes are wrapped)."""
    if path in _class_cache:
        return _class_cache[path]
    module, _, name = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot import actor {path!r}: {type(e).__name__}: {e}") from None
    if isinstance(obj, ray.actor.ActorClass):
        cls = obj
    elif isinstance(obj, type):
        if not issubclass(obj, Supervised):
            raise TypeError(f"actor {path!r} must mix in supervisors.child.Supervised")
        cls = ray.remote(obj)
    else:
        raise TypeError(f"{path!r} is not a class")
    _class_cache[path] = cls
    return cls


@dataclass
class _Child:
    spec: ChildSpec | SupervisorSpec
    generation: int = -1
    actor_name: str | None = None
    handle: Any = None
    state: str = STOPPED
    restarts: int = 0
    last_death_reason: str | None = None
    last_restart_ms: float | None = None
    pid: int | None = None
    node_id: str | None = None
    started_at: float | None = None  # wall clock, of the current incarnation
    watch_task: asyncio.Task | None = None
    backoff: BackoffStreak | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_supervisor(self) -> bool:
        return isinstance(self.spec, SupervisorSpec)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "supervisor" if self.is_supervisor else "worker",
            "actor_name": self.actor_name,
            "generation": self.generation,
            "restart": self.spec.restart,
            "state": self.state,
            "restarts": self.restarts,
            "last_death_reason": self.last_death_reason,
            "last_restart_ms": self.last_restart_ms,
            "pid": self.pid,
            "node_id": self.node_id,
            "started_at": self.started_at,
        }


class _Exit:
    __slots__ = ("normal", "reason", "noticed")

    def __init__(self, normal: bool, reason: str, noticed: float):
        self.normal, self.reason, self.noticed = normal, reason, noticed


@ray.remote(num_cpus=0, max_restarts=0)
class Supervisor(Supervised):
    """One supervisor of a tree (see the module docstring). Call ``start()`` after creating it."""

    def __init__(self, spec: SupervisorSpec | dict, namespace: str = NAMESPACE, actor_name: str | None = None):
        self.spec = spec if isinstance(spec, SupervisorSpec) else SupervisorSpec.model_validate(spec)
        self.namespace = namespace
        self.actor_name = actor_name
        self._children = [_Child(spec=c, backoff=BackoffStreak(self.spec.max_seconds)) for c in self.spec.children]
        self._by_name = {c.name: c for c in self._children}
        self._intensity = RestartIntensity(self.spec.max_restarts, self.spec.max_seconds)
        self._state = STARTING
        self._failure: str | None = None
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task] = set()  # strong refs: unreferenced tasks get collected
        try:
            self._restarts_metric = ray.util.metrics.Counter(
                "automat_restarts_total",
                description="Child restarts performed by automat supervisors",
                tag_keys=("supervisor", "child"),
            )
        except Exception as e:  # metrics are evidence, not a reason to fail
            log.warning("restart metric unavailable: %s", e)
            self._restarts_metric = None

    # ------------------------------------------------------------------ helpers
    def _ops(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _seed_generations(self) -> None:
        """Continue generations after any live incarnation (e.g. orphans of a killed predecessor)."""
        try:
            listed = ray.util.list_named_actors(all_namespaces=True)
        except Exception as e:
            log.warning("list_named_actors failed (%s); generations start at 0", e)
            return
        for entry in listed:
            if entry.get("namespace") != self.namespace:
                continue
            parsed = parse_incarnation(entry["name"])
            if parsed and parsed[0] in self._by_name:
                child = self._by_name[parsed[0]]
                child.generation = max(child.generation, parsed[1])

    def _create(self, child: _Child) -> Any:
        spec = child.spec
        if isinstance(spec, SupervisorSpec):
            cls, args, kwargs = Supervisor, (spec, self.namespace), {}
            options = {"num_cpus": 0, **spec.options}
        else:
            cls, args, kwargs = load_actor_class(spec.actor), tuple(spec.args), dict(spec.kwargs)
            options = dict(spec.options)
        for _ in range(100):
            child.generation += 1
            name = incarnation_name(child.name, child.generation)
            if isinstance(spec, SupervisorSpec):
                kwargs = {"actor_name": name}
            try:
                handle = cls.options(name=name, namespace=self.namespace, max_restarts=0, **options).remote(
                    *args, **kwargs
                )
            except ActorAlreadyExistsError:
                continue  # a dead incarnation whose handle someone still holds
            child.actor_name = name
            return handle
        raise RuntimeError(f"no free actor name for {child.name!r} after 100 generations")

    async def _start_child(self, child: _Child) -> None:
        """Create the next incarnation, wait until it serves, then watch it."""
        handle = self._create(child)
        child.handle = handle
        try:
            if child.is_supervisor:
                info = await asyncio.wait_for(handle.start.remote(), child.spec.start_timeout_s)
            else:
                info = await asyncio.wait_for(handle.supervised_info.remote(), child.spec.start_timeout_s)
        except BaseException:
            self._kill(child)
            raise
        child.pid, child.node_id = info.get("pid"), info.get("node_id")
        child.started_at = time.time()
        child.state = RUNNING
        child.watch_task = self._spawn(self._watch(child, child.generation, handle))

    async def _watch(self, child: _Child, generation: int, handle: Any) -> None:
        while True:
            try:
                reason = await handle.watch.remote()
                exit_ = _Exit(True, f"normal: {reason}", time.monotonic())
            except asyncio.CancelledError:
                raise
            except ActorUnavailableError:  # transient unreachability: ask again
                await asyncio.sleep(0.05)
                continue
            except BaseException as e:  # noqa: BLE001 - any failure of watch() is an abnormal exit
                exit_ = _Exit(False, describe_exit(e), time.monotonic())
            break
        self._spawn(self._on_exit(child, generation, exit_))

    def _kill(self, child: _Child) -> None:
        """Make sure the incarnation is gone and drop our handle (frees its name)."""
        if child.watch_task is not None:
            child.watch_task.cancel()
            child.watch_task = None
        if child.handle is not None:
            try:
                ray.kill(child.handle, no_restart=True)
            except Exception:
                pass
            child.handle = None

    async def _stop_child(self, child: _Child, reason: str = "shutdown") -> None:
        """Stop deliberately: no restart follows (the watch task is cancelled first)."""
        if child.watch_task is not None:
            child.watch_task.cancel()
            child.watch_task = None
        if child.handle is not None:
            try:
                await asyncio.wait_for(child.handle.stop.remote(reason), child.spec.shutdown_timeout_s)
            except Exception as e:  # dead already, or too slow: kill anyway
                log.debug("stop of %s: %s", child.actor_name, describe_exit(e))
            self._kill(child)
        child.pid = None

    def _count_restart(self, child: _Child, noticed: float) -> None:
        child.restarts += 1
        child.last_restart_ms = round((time.monotonic() - noticed) * 1000.0, 1)
        if self._restarts_metric is not None:
            try:
                self._restarts_metric.inc(1, tags={"supervisor": self.spec.name, "child": child.name})
            except Exception:
                pass

    # ------------------------------------------------------------------ reactions
    async def _on_exit(self, child: _Child, generation: int, exit_: _Exit) -> None:
        async with self._ops():
            if child.generation != generation or child.handle is None or self._state != RUNNING:
                return  # stale: that incarnation was already replaced or stopped on purpose
            child.watch_task = None
            self._kill(child)
            child.pid = None
            child.last_death_reason = exit_.reason
            if not should_restart(child.spec.restart, exit_.normal):
                child.state = STOPPED if exit_.normal else FAILED
                log.info("%s/%s ended (%s), %s: not restarted", self.spec.name, child.name, exit_.reason,
                         child.spec.restart)
                return
            log.warning("%s/%s ended (%s): restarting (%s)", self.spec.name, child.name, exit_.reason,
                        self.spec.strategy)
            if not self._intensity.record():
                await self._fail(
                    f"restart intensity exceeded: more than {self.spec.max_restarts} restarts in "
                    f"{self.spec.max_seconds:g} s (last: {child.name}: {exit_.reason})"
                )
                return
            names = [c.name for c in self._children]
            affected = [self._by_name[n] for n in restart_group(self.spec.strategy, names, child.name)]
            # running siblings in the group are stopped (reverse order); all but temporary
            # ones come back; siblings that had already ended stay as they are (OTP-like)
            running = [c for c in affected if c is not child and c.handle is not None]
            for sibling in reversed(running):
                await self._stop_child(sibling, "shutdown")
                if sibling.spec.restart == "temporary":
                    sibling.state = STOPPED
                    sibling.last_death_reason = f"stopped: {child.name} restarted ({self.spec.strategy})"
            group = [c for c in affected if c is child or (c in running and c.spec.restart != "temporary")]
            for c in group:
                c.state = RESTARTING
            await asyncio.sleep(child.backoff.next_delay(self.spec.backoff_base_s, self.spec.backoff_max_s))
            pending = list(group)
            while pending:
                if self._state != RUNNING:
                    return
                started, failures = await self._start_batch(pending)
                for c in started:
                    self._count_restart(c, exit_.noticed)
                    log.warning("%s/%s restarted as %s in %.0f ms", self.spec.name, c.name, c.actor_name,
                                c.last_restart_ms)
                if not failures:
                    return
                for c, e in failures:
                    c.last_death_reason = f"restart failed: {describe_exit(e)}"
                    log.warning("%s/%s: %s", self.spec.name, c.name, c.last_death_reason)
                pending = [c for c in pending if c not in started]
                first = failures[0][0]
                if not self._intensity.record():
                    await self._fail(
                        f"restart intensity exceeded: more than {self.spec.max_restarts} restarts in "
                        f"{self.spec.max_seconds:g} s (last: {first.name}: {first.last_death_reason})"
                    )
                    return
                await asyncio.sleep(first.backoff.next_delay(self.spec.backoff_base_s, self.spec.backoff_max_s))

    async def _start_batch(self, batch: list[_Child]) -> tuple[list[_Child], list[tuple[_Child, BaseException]]]:
        """Start children in order (or all at once with ``parallel_start``).

        Returns (started, failures). In order, the first failure ends the batch: the
        children after it are not tried (they may depend on it).
        """
        if self.spec.parallel_start and len(batch) > 1:
            results = await asyncio.gather(*(self._start_child(c) for c in batch), return_exceptions=True)
            started = [c for c, r in zip(batch, results) if not isinstance(r, BaseException)]
            failures = [(c, r) for c, r in zip(batch, results) if isinstance(r, BaseException)]
            return started, failures
        started = []
        for c in batch:
            try:
                await self._start_child(c)
            except Exception as e:
                return started, [(c, e)]
            started.append(c)
        return started, []

    async def _stop_all(self) -> None:
        for c in reversed(self._children):
            await self._stop_child(c, "shutdown")
            if c.state != FAILED:
                c.state = STOPPED

    async def _fail(self, reason: str) -> None:
        """Stop all children, tell watchers why, and end this process (the parent decides)."""
        log.error("supervisor %s fails: %s", self.spec.name, reason)
        self._state = FAILED
        self._failure = reason
        await self._stop_all()
        self._stop_event().set()  # pending watch() calls raise SupervisorFailed(reason)
        asyncio.get_running_loop().call_later(0.2, os._exit, 1)

    # ------------------------------------------------------------------ API
    async def start(self) -> dict:
        """Start all children (in spec order unless ``parallel_start``); idempotent.

        If a child cannot start, the ones started are stopped again and
        SupervisorStartError is raised (the supervisor is then ``failed``).
        """
        async with self._ops():
            if self._state == RUNNING:
                return self._self_info()
            if self._state != STARTING:
                raise SupervisorStartError(f"supervisor {self.spec.name} is {self._state}")
            self._seed_generations()
            for c in self._children:
                c.state = STARTING
            started, failures = await self._start_batch(self._children)
            if failures:
                for c, e in failures:
                    c.state = FAILED
                    c.last_death_reason = f"start failed: {describe_exit(e)}"
                for c in reversed(started):
                    await self._stop_child(c, "shutdown")
                for c in self._children:
                    if c.state != FAILED:
                        c.state = STOPPED
                self._state = FAILED
                c = failures[0][0]
                raise SupervisorStartError(
                    f"supervisor {self.spec.name}: child {c.name} did not start: {c.last_death_reason}"
                )
            self._state = RUNNING
            return self._self_info()

    async def watch(self) -> str:
        """Pending while the supervisor lives; raises SupervisorFailed when it gives up."""
        await self._stop_event().wait()
        if self._failure is not None:
            raise SupervisorFailed(self._failure)
        return self._stop_reason

    async def on_stop(self) -> None:
        """``stop(reason)``: stop children in reverse order, deliberately (no restarts)."""
        async with self._ops():
            if self._state in (STOPPED, FAILED):
                return
            self._state = STOPPED
            await self._stop_all()

    async def supervised_info(self) -> dict:
        return self._self_info()

    def _self_info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "name": self.spec.name,
            "kind": "supervisor",
            "actor_name": self.actor_name,
            "strategy": self.spec.strategy,
            "state": self._state,
            "failure": self._failure,
            "max_restarts": self.spec.max_restarts,
            "max_seconds": self.spec.max_seconds,
            "restarts_in_window": self._intensity.in_window(),
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
        }

    async def get_spec(self) -> SupervisorSpec:
        return self.spec

    async def which_children(self) -> list[dict]:
        """Direct children: name, kind, actor_name, generation, restart type, state (no recursion)."""
        keys = ("name", "kind", "actor_name", "generation", "restart", "state")
        return [{k: c.info()[k] for k in keys} for c in self._children]

    async def tree(self, timeout_s: float = 5.0) -> dict:
        """This supervisor and all descendants with state, restarts, timings, pid, node id."""
        out = self._self_info()
        children = []
        for c in self._children:
            info = c.info()
            if c.is_supervisor:
                info["strategy"] = c.spec.strategy
                info["children"] = []
                if c.handle is not None and c.state == RUNNING:
                    try:
                        sub = await asyncio.wait_for(c.handle.tree.remote(timeout_s * 0.8), timeout_s)
                        info["children"] = sub["children"]
                        info["restarts_in_window"] = sub.get("restarts_in_window")
                    except Exception as e:
                        info["error"] = f"tree unavailable: {describe_exit(e)}"
            children.append(info)
        out["children"] = children
        return out

    async def current(self, name: str) -> str | None:
        """Actor name of the running incarnation of direct child ``name`` (None while down)."""
        c = self._by_name.get(name)
        return c.actor_name if c is not None and c.state == RUNNING else None

    async def add_child(self, spec: ChildSpec | dict) -> dict:
        """Start a new worker child at run time (OTP ``start_child``), e.g. one more pool
        host. Idempotent: a running child of that name is left alone; a stopped or failed
        one is started again with the new spec. Added children are supervised like the
        others but are not part of ``spec``: a restart of this supervisor brings back the
        spec's children only (the autoscaler re-adds its hosts). Returns the child's info.
        """
        spec = spec if isinstance(spec, ChildSpec) else ChildSpec.model_validate(spec)
        async with self._ops():
            if self._state != RUNNING:
                raise RuntimeError(f"supervisor {self.spec.name} is {self._state}")
            c = self._by_name.get(spec.name)
            if c is not None and c.state in (RUNNING, STARTING, RESTARTING):
                return c.info()
            if c is None:
                c = _Child(spec=spec, backoff=BackoffStreak(self.spec.max_seconds))
                self._children.append(c)
                self._by_name[spec.name] = c
            else:
                c.spec = spec
            c.state = STARTING
        # started outside the lock: a child waiting for capacity must not hold up restarts
        try:
            await self._start_child(c)
        except Exception as e:
            async with self._ops():
                c.state = FAILED
                c.last_death_reason = f"start failed: {describe_exit(e)}"
            raise RuntimeError(f"{self.spec.name}/{spec.name}: {c.last_death_reason}") from None
        return c.info()

    async def remove_child(self, name: str, reason: str = "removed") -> bool:
        """Stop a child deliberately and forget it (OTP ``terminate_child`` +
        ``delete_child``). Returns False when there is no such child."""
        async with self._ops():
            c = self._by_name.get(name)
            if c is None:
                return False
            await self._stop_child(c, reason)
            c.state = STOPPED
            self._children.remove(c)
            del self._by_name[name]
            return True

    async def restart_child(self, name: str) -> dict:
        """Operator restart of one child: stop it deliberately and start a new incarnation.

        Only that child (no strategy), not counted against the restart intensity; works
        for stopped/failed children too. Returns the child's new info.
        """
        if name not in self._by_name:
            raise KeyError(f"supervisor {self.spec.name} has no child {name!r}")
        async with self._ops():
            if self._state != RUNNING:
                raise RuntimeError(f"supervisor {self.spec.name} is {self._state}")
            c = self._by_name[name]
            noticed = time.monotonic()
            await self._stop_child(c, "restart")
            c.state = RESTARTING
            try:
                await self._start_child(c)
            except Exception as e:
                c.state = FAILED
                c.last_death_reason = f"restart failed: {describe_exit(e)}"
                raise RuntimeError(f"{self.spec.name}/{name}: {c.last_death_reason}") from None
            c.last_death_reason = "restarted on request"
            self._count_restart(c, noticed)
            return c.info()


# ---------------------------------------------------------------------- root tree
def start_root(
    spec: SupervisorSpec,
    *,
    namespace: str = NAMESPACE,
    name: str = ROOT_NAME,
    timeout_s: float | None = None,
) -> Any:
    """Start (or find) the root supervisor: a detached named actor ``automat.root``.

    Needs a connected Ray (``ray.init(namespace=...)``). If a root is already running with
    the same spec its handle is returned; with a different spec this raises RuntimeError
    (``stop_root()`` first). If a child cannot start, the root is removed again and
    SupervisorStartError is raised.
    """
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init(namespace='automat') first")
    handle = Supervisor.options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, **spec.options
    ).remote(spec, namespace, name)
    running = ray.get(handle.get_spec.remote(), timeout=60)
    if running != spec:
        raise RuntimeError(f"{name} is already running with a different spec; call stop_root() first")
    try:
        ray.get(handle.start.remote(), timeout=timeout_s or spec.start_timeout_s)
    except Exception:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
        raise
    return handle


def stop_root(*, namespace: str = NAMESPACE, name: str = ROOT_NAME, timeout_s: float = 60.0) -> bool:
    """Stop the root tree (children in reverse order, deliberately) and remove the actor.

    Returns False when no root was running.
    """
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    try:
        ray.get(handle.stop.remote("shutdown"), timeout=timeout_s)
    except Exception as e:
        log.warning("root did not stop cleanly (%s); killing it", describe_exit(e))
    ray.kill(handle, no_restart=True)
    return True


__all__ = [
    "NAMESPACE",
    "ROOT_NAME",
    "Supervisor",
    "SupervisorFailed",
    "SupervisorStartError",
    "describe_exit",
    "incarnation_name",
    "parse_incarnation",
    "start_root",
    "stop_root",
]
