"""The practice's sync cursor and local appointment store, and applying changes (pure).

The cursor is the last applied Provenance: (``recorded``, ``id``); Provenances are
ordered by that pair (oldest first). Applying is idempotent by resource version: a
change older than (or equal to) what the store holds is skipped, a DELETE leaves a
tombstone so an older CREATE/UPDATE replayed later cannot resurrect the resource.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from protocols.tss.resources import parse_instant, provenance_change, version_of

_EPOCH = "1970-01-01T00:00:00.000000Z"


class Cursor(BaseModel):
    """Last applied Provenance (``recorded`` instant, ``id``); empty = nothing yet."""

    recorded: str = ""
    id: str = ""

    def key(self) -> tuple[datetime, str]:
        return parse_instant(self.recorded or _EPOCH), self.id

    def before(self, recorded: str, pid: str) -> bool:
        """Is the Provenance (recorded, pid) after this cursor (i.e. not applied yet)?"""
        return (parse_instant(recorded), pid) > self.key()


class Change(BaseModel):
    """One Provenance, resolved: what changed, and the resource version (unless DELETE)."""

    provenance_id: str
    recorded: str
    activity: Literal["CREATE", "UPDATE", "DELETE"]
    resource_type: str
    resource_id: str
    version: int | None = None
    resource: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        return f"{self.resource_type}/{self.resource_id}"


class Outcome(BaseModel):
    applied: bool
    reason: str = ""  # "stale", "deleted", "absent" when skipped


class LocalStore(BaseModel):
    """The practice's appointment store: ``Type/id`` -> resource (FHIR JSON shape)."""

    resources: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tombstones: dict[str, int] = Field(default_factory=dict)  # Type/id -> version deleted at

    def version(self, key: str) -> int:
        r = self.resources.get(key)
        return version_of(r) if r is not None else 0

    def put(self, res: dict[str, Any]) -> Outcome:
        """Keep ``res`` unless the store already holds that version or a newer one."""
        key = f"{res['resourceType']}/{res['id']}"
        v = version_of(res)
        if key in self.resources and self.version(key) >= v:
            return Outcome(applied=False, reason="stale")
        if self.tombstones.get(key, 0) >= v:
            return Outcome(applied=False, reason="deleted")
        self.resources[key] = res
        self.tombstones.pop(key, None)
        return Outcome(applied=True)

    def delete(self, key: str, version: int | None) -> Outcome:
        cur = self.resources.get(key)
        if version is not None and cur is not None and self.version(key) > version:
            return Outcome(applied=False, reason="stale")  # recreated with a newer version
        if version is not None:
            self.tombstones[key] = max(version, self.tombstones.get(key, 0))
        if cur is None:
            return Outcome(applied=False, reason="absent")
        del self.resources[key]
        return Outcome(applied=True)

    def count(self, rtype: str) -> int:
        p = rtype + "/"
        return sum(1 for k in self.resources if k.startswith(p))


def changes_of(provenances: list[dict[str, Any]], included: list[dict[str, Any]]) -> list[Change]:
    """Resolve Provenances (oldest first) against the included target versions."""
    by_ver = {(r["resourceType"], r.get("id"), version_of(r)): r for r in included}
    latest: dict[tuple[str, str], dict] = {}
    for r in included:
        k = (r["resourceType"], r.get("id"))
        if k not in latest or version_of(r) > version_of(latest[k]):
            latest[k] = r
    out = []
    for p in provenances:
        pid, recorded, rtype, rid, version, act = provenance_change(p)
        res = None
        if act != "DELETE":
            res = by_ver.get((rtype, rid, version)) if version is not None else latest.get((rtype, rid))
        out.append(Change(provenance_id=pid, recorded=recorded, activity=act, resource_type=rtype,
                          resource_id=rid, version=version, resource=res))
    out.sort(key=lambda c: (parse_instant(c.recorded), c.provenance_id))
    return out


def apply_change(store: LocalStore, change: Change) -> Outcome:
    """Apply one resolved change (the resource must be present unless DELETE)."""
    if change.activity == "DELETE":
        return store.delete(change.ref, change.version)
    if change.resource is None:
        raise ValueError(f"{change.activity} of {change.ref} without its resource")
    return store.put(change.resource)
