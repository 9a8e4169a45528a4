"""Road maps of the KIM mail statemachine (pure: pydantic + YAML, no I/O but reading files).

A :class:`RoadMap` is the ordered list of steps one procedure's mails go through, with
branches on step outcomes. The stateshifter owns the slips and asks the road map what
comes next (:meth:`RoadMap.decide`); the step workers run the step implementations named
by :attr:`RoadStep.impl` (``actors.kim.steps.STEPS``).

Transitions of a step (:meth:`RoadMap.decide` applied to a :class:`StepResult`):

* ``result.error is None`` – ``on[outcome]``; for ``"ok"`` the default is the next step
  in the list (an outcome that is neither in ``on`` nor ``"ok"`` is a road map error at
  run time: the slip is parked with reason ``unknown_outcome``).
* ``result.error.retryable`` – retry the same step after an exponential backoff with
  jitter, until ``max_attempts`` (step, else ``max_attempts_default``); then ``@parked``.
* ``result.error`` not retryable – ``on_error`` (step, else ``on_error_default`` of the
  map, else ``@rejected``). The facts ``error_code``, ``error_step`` and ``error_reason``
  are added to the slip so an answer step can name the fault.

Targets are step names or one of the terminal markers ``@done``, ``@rejected``,
``@workbasket`` (handed to a clerk queue: the slip's status is ``done`` with
``terminal=@workbasket``) and ``@parked`` (dead letter, re-drivable).

Files: ``<dir>/<name>.yaml`` is the current version of a road map; older versions stay
loadable as ``<dir>/<name>.v<version>.yaml`` (a slip keeps the name+version it started
with). :func:`load_roadmaps` returns the newest version per name,
:func:`load_roadmap_versions` all of them.
"""

from __future__ import annotations

import random
from functools import cached_property
from email.parser import BytesHeaderParser
from email import policy
from pathlib import Path
from typing import Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocols.kim.messages import StepResult
from protocols.kim.mime import parse_dienstkennung
from protocols.kim.procedures import DEFAULT_RULES, Procedure, match_rules

DONE = "@done"
REJECTED = "@rejected"
WORKBASKET = "@workbasket"
PARKED = "@parked"
TERMINALS: frozenset[str] = frozenset({DONE, REJECTED, WORKBASKET, PARKED})

#: Slip status for each terminal marker (``protocols.kim.messages.SlipStatus``).
TERMINAL_STATUS: dict[str, str] = {DONE: "done", WORKBASKET: "done", REJECTED: "rejected", PARKED: "parked"}


class RoadMapError(ValueError):
    """A road map is invalid (the message names the map, the step and the problem)."""


class RoadStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    impl: str = ""  # step implementation (``STEPS`` key); defaults to ``name``
    layer: Literal["technical", "domain"]
    on: dict[str, str] = Field(default_factory=dict)  # outcome -> step name | terminal marker
    on_error: str | None = None  # non-retryable error -> step | marker (None: the map's default)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    description: str = ""

    @model_validator(mode="after")
    def _default_impl(self) -> "RoadStep":
        if not self.impl:
            self.impl = self.name
        return self


class Decision(BaseModel):
    """What the stateshifter does after a step result."""

    action: Literal["next", "retry", "terminal"]
    next_step: str | None = None  # action == "next" (also the step to retry for "retry")
    terminal: str | None = None  # action == "terminal": one of TERMINALS
    status: str | None = None  # slip status for a terminal (done / rejected / parked)
    delay_s: float = 0.0  # action == "retry"
    attempt: int = 1  # the attempt number of the next order
    facts: dict[str, str] = Field(default_factory=dict)  # facts to merge into the slip
    reason: str = ""


class RoadMap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: int = Field(ge=1)
    procedure: str  # protocols.kim.procedures.Procedure value
    description: str = ""
    steps: list[RoadStep]
    max_attempts_default: int = Field(default=5, ge=1, le=100)
    backoff_base_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=60.0, ge=0)
    on_error_default: str = REJECTED

    # ------------------------------------------------------------------ structure
    @property
    def first(self) -> str:
        return self.steps[0].name

    @cached_property
    def positions(self) -> dict[str, int]:
        """Step name -> its index, built on first use (``decide`` asks for every step
        result; before, three linear scans of a 44-step map each time). The first of equal
        names wins, as in a scan; a changed ``steps`` list falls back to scanning."""
        pos: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            pos.setdefault(s.name, i)
        return pos

    def index(self, name: str) -> int:
        i = self.positions.get(name)
        if i is not None and i < len(self.steps) and self.steps[i].name == name:
            return i
        for j, s in enumerate(self.steps):  # the steps changed after the table was built
            if s.name == name:
                return j
        raise KeyError(f"road map {self.name} v{self.version} has no step {name!r}")

    def step(self, name: str) -> RoadStep:
        return self.steps[self.index(name)]

    def layer_counts(self) -> dict[str, int]:
        out = {"technical": 0, "domain": 0}
        for s in self.steps:
            out[s.layer] += 1
        return out

    def ok_target(self, name: str) -> str:
        i = self.index(name)
        s = self.steps[i]
        if "ok" in s.on:
            return s.on["ok"]
        return self.steps[i + 1].name if i + 1 < len(self.steps) else DONE

    def error_target(self, name: str) -> str:
        s = self.step(name)
        return s.on_error if s.on_error is not None else self.on_error_default

    def edges(self, name: str) -> dict[str, str]:
        """Every possible target of ``name``: outcome (and ``!error``) -> target."""
        s = self.step(name)
        out = dict(s.on)
        out["ok"] = self.ok_target(name)
        out["!error"] = self.error_target(name)
        return out

    def attempts_for(self, name: str) -> int:
        s = self.step(name)
        return s.max_attempts or self.max_attempts_default

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before attempt ``attempt + 1``: exponential, capped, full jitter in [½d, d]."""
        d = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempt - 1)))
        r = (rng or random).random()
        return d * (0.5 + 0.5 * r)

    # ------------------------------------------------------------------ validation
    def validate_map(self, known_impls: Iterable[str] | None = None) -> "RoadMap":
        """Raise :class:`RoadMapError` on unknown targets/implementations, duplicate step
        names, cycles or unreachable steps."""
        where = f"road map {self.name} v{self.version}"
        if not self.steps:
            raise RoadMapError(f"{where}: has no steps")
        try:
            Procedure(self.procedure)
        except ValueError:
            raise RoadMapError(f"{where}: unknown procedure {self.procedure!r}") from None
        names = [s.name for s in self.steps]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RoadMapError(f"{where}: duplicate step names {dup}")
        for n in names:
            if n.startswith("@"):
                raise RoadMapError(f"{where}: step name {n!r} must not start with '@'")
        known = set(names)
        if self.on_error_default not in known and self.on_error_default not in TERMINALS:
            raise RoadMapError(f"{where}: on_error_default targets unknown step {self.on_error_default!r}")
        if known_impls is not None:
            impls = set(known_impls)
            for s in self.steps:
                if s.impl not in impls:
                    raise RoadMapError(f"{where}: step {s.name!r} names unknown implementation {s.impl!r}")
        for s in self.steps:
            for outcome, target in self.edges(s.name).items():
                if target not in known and target not in TERMINALS:
                    what = "on_error" if outcome == "!error" else f"on[{outcome!r}]"
                    raise RoadMapError(f"{where}: step {s.name!r} {what} targets unknown step {target!r}")
                if target == s.name:
                    raise RoadMapError(f"{where}: cycle: step {s.name!r} targets itself")
        # cycles (DFS over all edges)
        state: dict[str, int] = {}

        def visit(n: str, path: list[str]) -> None:
            state[n] = 1
            for t in self.edges(n).values():
                if t in TERMINALS:
                    continue
                if state.get(t) == 1:
                    cyc = path[path.index(t):] + [t] if t in path else [n, t]
                    raise RoadMapError(f"{where}: cycle {' -> '.join(cyc)}")
                if state.get(t) is None:
                    visit(t, path + [t])
            state[n] = 2

        for n in names:
            if n not in state:
                visit(n, [n])
        # reachability from the first step
        seen = {self.first}
        todo = [self.first]
        while todo:
            n = todo.pop()
            for t in self.edges(n).values():
                if t not in TERMINALS and t not in seen:
                    seen.add(t)
                    todo.append(t)
        unreachable = [n for n in names if n not in seen]
        if unreachable:
            raise RoadMapError(f"{where}: unreachable steps {unreachable}")
        return self

    # ------------------------------------------------------------------ transitions
    def decide(self, result: StepResult, *, rng: random.Random | None = None) -> Decision:
        """The transition for one step result (see module doc)."""
        step = self.step(result.step)
        if result.error is not None:
            err = result.error
            if err.retryable:
                limit = self.attempts_for(step.name)
                if result.attempt < limit:
                    return Decision(
                        action="retry", next_step=step.name, attempt=result.attempt + 1,
                        delay_s=self.backoff_s(result.attempt, rng), reason=f"{err.code}: retry {result.attempt + 1}/{limit}",
                    )
                return self._terminal(
                    PARKED, {"error_code": err.code, "error_step": step.name, "error_reason": err.reason[:300], "park_reason": "attempts_exhausted"},
                    f"{err.code}: {limit} attempts exhausted",
                )
            target = self.error_target(step.name)
            facts = {"error_code": err.code, "error_step": step.name, "error_reason": err.reason[:300]}
            return self._goto(target, facts, f"{err.code} at {step.name}")
        outcome = result.outcome or "ok"
        if outcome in step.on:
            target = step.on[outcome]
        elif outcome == "ok":
            target = self.ok_target(step.name)
        else:
            return self._terminal(
                PARKED, {"park_reason": "unknown_outcome", "error_step": step.name, "error_code": f"unknown_outcome:{outcome}"},
                f"step {step.name} returned outcome {outcome!r} the road map does not know",
            )
        return self._goto(target, {}, outcome)

    def _goto(self, target: str, facts: dict[str, str], reason: str) -> Decision:
        if target in TERMINALS:
            return self._terminal(target, facts, reason)
        return Decision(action="next", next_step=target, attempt=1, facts=facts, reason=reason)

    @staticmethod
    def _terminal(marker: str, facts: dict[str, str], reason: str) -> Decision:
        return Decision(
            action="terminal", terminal=marker, status=TERMINAL_STATUS[marker], facts={**facts, "terminal": marker}, reason=reason
        )


# ---------------------------------------------------------------------------- loading


def parse_roadmap(text: str, *, source: str = "<string>", known_impls: Iterable[str] | None = None) -> RoadMap:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RoadMapError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RoadMapError(f"{source}: a road map must be a mapping")
    for st in data.get("steps") or []:
        # YAML 1.1 reads a bare ``on`` key as the boolean True
        if isinstance(st, dict) and True in st and "on" not in st:
            st["on"] = st.pop(True)
    try:
        rm = RoadMap(**data)
    except ValidationError as e:
        probs = "; ".join(f"{'.'.join(str(p) for p in er['loc'])}: {er['msg']}" for er in e.errors())
        raise RoadMapError(f"{source}: {probs}") from None
    return rm.validate_map(known_impls)


def load_roadmap_versions(directory: str | Path, known_impls: Iterable[str] | None = None) -> dict[tuple[str, int], RoadMap]:
    """Every road map file in ``directory`` by (name, version)."""
    directory = Path(directory)
    known = set(known_impls) if known_impls is not None else None
    out: dict[tuple[str, int], RoadMap] = {}
    for p in sorted(directory.glob("*.yaml")):
        rm = parse_roadmap(p.read_text(encoding="utf-8"), source=str(p), known_impls=known)
        key = (rm.name, rm.version)
        if key in out:
            raise RoadMapError(f"{p}: road map {rm.name} v{rm.version} is defined twice")
        out[key] = rm
    return out


def load_roadmaps(directory: str | Path, known_impls: Iterable[str] | None = None) -> dict[str, RoadMap]:
    """The newest version of every road map in ``directory`` by name."""
    out: dict[str, RoadMap] = {}
    for (name, version), rm in load_roadmap_versions(directory, known_impls).items():
        if name not in out or out[name].version < version:
            out[name] = rm
    return out


# ---------------------------------------------------------------------------- selection

#: procedure -> road map name
ROADMAP_OF: dict[str, str] = {
    Procedure.EAU_LIEFERUNG.value: "eau",
    Procedure.EAU_STORNO.value: "eau_storno",
    Procedure.EEB_ANFRAGE.value: "eeb_anfrage",
    Procedure.EEB_BESCHEINIGUNG.value: "eeb_received",
    Procedure.EEB_FEHLER.value: "eeb_received",
    Procedure.EBZ.value: "ebz",
    Procedure.AAR.value: "aar",
    Procedure.EMAILPLUS.value: "emailplus",
}


def select_roadmap(procedure: str | Procedure) -> str:
    """Road map name for a procedure (unknown procedures go to the eMailPLUS work basket)."""
    return ROADMAP_OF.get(str(Procedure(procedure).value if isinstance(procedure, Procedure) else procedure), "emailplus")


def peek_procedure(raw: bytes, rules=None) -> Procedure:
    """Cheap procedure guess from the header block only (for the mailbox to pick the road
    map before the full technical layer runs; ``classify_procedure`` re-checks it).
    Never raises: anything unreadable is eMailPLUS."""
    try:
        end = raw.find(b"\r\n\r\n")
        end2 = raw.find(b"\n\n")
        cut = min(x for x in (end, end2, len(raw)) if x >= 0)
        msg = BytesHeaderParser(policy=policy.compat32).parsebytes(raw[: cut + 4])
        values = msg.get_all("X-KIM-Dienstkennung") or []
        dk = parse_dienstkennung([str(v) for v in values])
        proc, _ = match_rules(dk, rules if rules is not None else DEFAULT_RULES)
        return proc or Procedure.EMAILPLUS
    except Exception:
        return Procedure.EMAILPLUS
