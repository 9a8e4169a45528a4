"""Find the running incarnation of a supervised child by its logical name.

Supervisors name every incarnation ``<logical>#<generation>`` (``kim.host.0#3``): a dead
named actor's name stays taken while any handle to it is alive, so a restart cannot
reuse the old name. ``resolve("kim.host.0")`` returns a handle to the current one.

How, and why this way (measured on Ray 2.60 here):

* ``ray.util.list_named_actors(all_namespaces=True)`` lists **live** actors only: a
  SIGKILLed incarnation disappears from the list within ~20 ms of its death (while
  ``ray.get_actor`` on its name still returns a handle to the dead actor as long as
  handles exist). One GCS call, no extra process, no dependency on the supervisor
  being reachable, and it works from any driver or actor of the cluster.
* Generations only grow (a restarted supervisor continues after the live ones and skips
  names still taken), so the highest live generation is the current incarnation.
* Before returning, the handle answers ``ping()``: a caller never gets a handle to an
  actor that is still in its constructor or already dead. While a restart is in progress
  (no live incarnation, or only one that does not answer yet) we poll every 50 ms until
  ``timeout_s``.

The alternatives were worse: asking the supervisor means knowing which one and it may be
restarting itself; a registry actor is one more process and a single point of failure;
Ray's internal KV is a private API.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from supervisors.spec import GENERATION_SEP

NAMESPACE = "automat"
_POLL_S = 0.05


class ResolveTimeout(LookupError):
    """No serving incarnation of the logical name appeared within the timeout."""


def _candidates(logical_name: str, namespace: str) -> list[str]:
    """Live actor names for ``logical_name``, newest generation first (exact name last)."""
    prefix = logical_name + GENERATION_SEP
    gens: list[tuple[int, str]] = []
    exact = False
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != namespace:
            continue
        name = entry["name"]
        if name == logical_name:
            exact = True
        elif name.startswith(prefix) and name[len(prefix):].isdigit():
            gens.append((int(name[len(prefix):]), name))
    out = [n for _, n in sorted(gens, reverse=True)]
    if exact:  # e.g. "automat.root": not a generation-named child
        out.append(logical_name)
    return out


def _ensure_ray(namespace: str) -> None:
    if not ray.is_initialized():
        ray.init(address="auto", namespace=namespace, log_to_driver=False)


def resolve(logical_name: str, namespace: str = NAMESPACE, timeout_s: float = 10.0) -> Any:
    """Handle of the serving incarnation of ``logical_name``; waits while it restarts.

    Raises :class:`ResolveTimeout` when none answers within ``timeout_s``. For use in
    drivers and threaded code; inside async actors use :func:`resolve_async`.
    """
    _ensure_ray(namespace)
    deadline = time.monotonic() + timeout_s
    while True:
        for name in _candidates(logical_name, namespace):
            left = deadline - time.monotonic()
            try:
                handle = ray.get_actor(name, namespace=namespace)
                ray.get(handle.ping.remote(), timeout=max(0.05, min(left, 2.0)))
                return handle
            except Exception:
                continue  # dead, not serving yet, or gone meanwhile: try the next one
        if time.monotonic() >= deadline:
            raise ResolveTimeout(
                f"no serving incarnation of {logical_name!r} in namespace {namespace!r} within {timeout_s:g} s"
            )
        time.sleep(_POLL_S)


async def resolve_async(logical_name: str, namespace: str = NAMESPACE, timeout_s: float = 10.0) -> Any:
    """:func:`resolve` for async code (does not block the event loop while waiting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for name in await asyncio.to_thread(_candidates, logical_name, namespace):
            left = deadline - time.monotonic()
            try:
                handle = ray.get_actor(name, namespace=namespace)
                await asyncio.wait_for(handle.ping.remote(), max(0.05, min(left, 2.0)))
                return handle
            except Exception:
                continue
        if time.monotonic() >= deadline:
            raise ResolveTimeout(
                f"no serving incarnation of {logical_name!r} in namespace {namespace!r} within {timeout_s:g} s"
            )
        await asyncio.sleep(_POLL_S)


__all__ = ["ResolveTimeout", "resolve", "resolve_async"]
