"""Child and supervisor specifications (pydantic v2), validated before anything starts.

A tree is a :class:`SupervisorSpec` whose ``children`` are :class:`ChildSpec` (a worker
actor, given as ``"module.path:ClassName"``) or nested :class:`SupervisorSpec` (a subtree,
run as its own supervisor actor). Names are logical: the running actor of child
``kim.host.0`` is called ``kim.host.0#<generation>`` (see ``supervisors.resolve``), so a
name must not contain ``#`` and must be unique in the whole tree.

Specs are plain data: validating one imports no capability code and needs no Ray, so a
tree written in YAML/JSON (``SupervisorSpec.model_validate(data)``) fails early with a
message naming the offending field. In dict form a child is a supervisor when it has
``children`` or ``strategy`` (or ``kind: supervisor``), otherwise a worker.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

RestartType = Literal["permanent", "transient", "temporary"]
Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]

#: separator between a logical name and its generation: ``kim.host.0#3``
GENERATION_SEP = "#"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,119}$")
_ACTOR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")

#: Ray actor options a spec may set. The supervisor owns naming, namespace, lifetime and
#: restarts (``name``, ``namespace``, ``lifetime``, ``get_if_exists``, ``max_restarts``):
#: a child restarted by Ray itself would re-run its constructor behind our back.
#: (tests/unit/test_supervisor_specs.py checks this list against Ray's own.)
ALLOWED_ACTOR_OPTIONS = frozenset(
    {
        "num_cpus",
        "num_gpus",
        "memory",
        "object_store_memory",
        "resources",
        "accelerator_type",
        "max_concurrency",
        "max_pending_calls",
        "max_task_retries",
        "concurrency_groups",
        "runtime_env",
        "scheduling_strategy",
        "placement_group",
        "placement_group_bundle_index",
        "placement_group_capture_child_tasks",
        "label_selector",
        "fallback_strategy",
        "enable_task_events",
        "allow_out_of_order_execution",
        "_labels",
    }
)
RESERVED_ACTOR_OPTIONS = frozenset({"name", "namespace", "lifetime", "get_if_exists", "max_restarts"})


def _check_name(v: str) -> str:
    if GENERATION_SEP in v:
        raise ValueError(f"name {v!r} must not contain {GENERATION_SEP!r} (it separates the generation)")
    if not _NAME_RE.match(v):
        raise ValueError(
            f"name {v!r} must be 1-120 characters of letters, digits, '_', '.', '-' "
            "and not start with '.' or '-'"
        )
    return v


def _check_options(v: dict[str, Any]) -> dict[str, Any]:
    reserved = sorted(set(v) & RESERVED_ACTOR_OPTIONS)
    if reserved:
        raise ValueError(
            f"options {reserved} are set by the supervisor (names, lifetime, restarts); remove them"
        )
    unknown = sorted(set(v) - ALLOWED_ACTOR_OPTIONS)
    if unknown:
        raise ValueError(f"unknown Ray actor options {unknown}; allowed: {sorted(ALLOWED_ACTOR_OPTIONS)}")
    for key in ("num_cpus", "num_gpus", "memory", "object_store_memory"):
        if key in v and (not isinstance(v[key], (int, float)) or isinstance(v[key], bool) or v[key] < 0):
            raise ValueError(f"options.{key} must be a number >= 0, got {v[key]!r}")
    if "max_concurrency" in v and (
        not isinstance(v["max_concurrency"], int) or isinstance(v["max_concurrency"], bool) or v["max_concurrency"] < 1
    ):
        raise ValueError(f"options.max_concurrency must be an integer >= 1, got {v['max_concurrency']!r}")
    if "resources" in v:
        res = v["resources"]
        if not isinstance(res, dict) or not all(
            isinstance(k, str) and isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0
            for k, n in res.items()
        ):
            raise ValueError(f"options.resources must map resource names to numbers >= 0, got {res!r}")
    return v


class ChildSpec(BaseModel):
    """A worker child: one Ray actor of class ``actor`` (which mixes in ``Supervised``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["worker"] = "worker"
    name: str
    actor: str = Field(description='"module.path:ClassName" (a plain class or a @ray.remote class)')
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    restart: RestartType = "permanent"
    options: dict[str, Any] = Field(default_factory=dict, description="Ray actor options")
    start_timeout_s: float = Field(60.0, gt=0, le=3600, description="constructor → serving, at most")
    shutdown_timeout_s: float = Field(5.0, ge=0, le=600, description="stop() before the process is killed")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("options")
    @classmethod
    def _valid_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_options(v)

    @field_validator("actor")
    @classmethod
    def _actor_path(cls, v: str) -> str:
        if not _ACTOR_RE.match(v):
            raise ValueError(f'actor must look like "module.path:ClassName", got {v!r}')
        return v

    @field_validator("kwargs")
    @classmethod
    def _kwargs_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise ValueError(f"kwargs keys must be Python identifiers, got {bad!r}")
        return v


def _child_kind(v: Any) -> str:
    if isinstance(v, dict):
        kind = v.get("kind")
        if kind in ("worker", "supervisor"):
            return kind
        return "supervisor" if ("children" in v or "strategy" in v) else "worker"
    return getattr(v, "kind", "worker")


AnyChildSpec = Annotated[
    Union[Annotated[ChildSpec, Tag("worker")], Annotated["SupervisorSpec", Tag("supervisor")]],
    Discriminator(_child_kind),
]


class SupervisorSpec(BaseModel):
    """A supervisor and its children, started in order, stopped in reverse order.

    ``restart``/``options``/timeouts apply to this supervisor as a child of its parent
    (ignored for the root). ``max_restarts`` restarts within ``max_seconds`` are allowed;
    one more and the supervisor stops its children and fails, so its parent decides.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["supervisor"] = "supervisor"
    name: str
    strategy: Strategy = "one_for_one"
    max_restarts: int = Field(5, ge=0, le=10_000)
    max_seconds: float = Field(30.0, gt=0, le=86_400)
    backoff_base_s: float = Field(0.05, ge=0, le=600)
    backoff_max_s: float = Field(5.0, ge=0, le=3600)
    parallel_start: bool = Field(
        False,
        description="start (and group-restart) children all at once instead of one after the other; "
        "for independent children such as shard hosts (stop order stays reverse spec order)",
    )
    restart: RestartType = "permanent"
    options: dict[str, Any] = Field(default_factory=dict, description="Ray options of this supervisor actor")
    start_timeout_s: float = Field(120.0, gt=0, le=3600, description="start of the whole subtree, at most")
    shutdown_timeout_s: float = Field(30.0, ge=0, le=3600, description="stop of the whole subtree, at most")
    children: list[AnyChildSpec] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("options")
    @classmethod
    def _valid_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_options(v)

    @model_validator(mode="after")
    def _consistent(self) -> "SupervisorSpec":
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_base_s ({self.backoff_base_s})"
            )
        seen: dict[str, str] = {}
        dups: list[str] = []
        for path, spec in self.walk():
            if spec.name in seen:
                dups.append(f"{spec.name!r} at {seen[spec.name]} and {path}")
            else:
                seen[spec.name] = path
        if dups:
            raise ValueError("child names must be unique in the whole tree: " + "; ".join(dups))
        return self

    def walk(self, prefix: str = "") -> list[tuple[str, "ChildSpec | SupervisorSpec"]]:
        """(path, spec) of this supervisor and every descendant, depth first, in order."""
        path = f"{prefix}/{self.name}" if prefix else self.name
        out: list[tuple[str, ChildSpec | SupervisorSpec]] = [(path, self)]
        for c in self.children:
            if isinstance(c, SupervisorSpec):
                out.extend(c.walk(path))
            else:
                out.append((f"{path}/{c.name}", c))
        return out

    def child(self, name: str) -> "ChildSpec | SupervisorSpec":
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(f"supervisor {self.name!r} has no child {name!r}")


SupervisorSpec.model_rebuild()

__all__ = [
    "ALLOWED_ACTOR_OPTIONS",
    "GENERATION_SEP",
    "RESERVED_ACTOR_OPTIONS",
    "AnyChildSpec",
    "ChildSpec",
    "RestartType",
    "Strategy",
    "SupervisorSpec",
]
