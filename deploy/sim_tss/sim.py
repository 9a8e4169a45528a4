"""The simulated 116117 Terminservice: practices, resources, history, Provenance.

Kept apart from the client (``actors/tss``): it imports only ``protocols.tss``. Every
change it makes (scheduled changes by "patients", the "116117 Terminservice",
physicians) or receives (from a TVS) gets a new resource version and a Provenance.
It also enforces the poll rule: a second Provenance search of a practice within the
poll interval is answered 429 and recorded in ``violations``.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from protocols.tss import resources as R
from protocols.tss.resources import instant


@dataclass
class Practice:
    pid: str
    client_id: str
    secret: str
    current: dict[str, dict] = field(default_factory=dict)  # Type/id -> resource
    history: dict[tuple[str, int], dict] = field(default_factory=dict)  # (Type/id, v) -> resource
    order: dict[str, int] = field(default_factory=dict)  # Type/id -> creation sequence (sort key)
    versions: dict[str, int] = field(default_factory=dict)
    provenance: list[dict] = field(default_factory=list)  # in recorded order
    last_poll: float | None = None
    polls: int = 0


@dataclass
class Fault:
    status: int | None = None  # 401 / 500 / ...
    payload: str | None = None  # "malformed", "json", "wrong_profile"
    remaining: int = 1
    paths: str = ""  # substring of the path it applies to ("" = all)


class TerminService:
    def __init__(self, *, clock: Callable[[], float] = time.time, poll_interval_s: float = 300.0,
                 seed: int = 116117) -> None:
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self.rng = random.Random(seed)
        self.practices: dict[str, Practice] = {}
        self.by_client: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        self.faults: list[Fault] = []
        self.delay_s = 0.0
        self.violations: list[tuple[str, float, float]] = []  # (practice, previous, now)
        self.requests = 0
        self._seq = itertools.count(1)
        self._last_recorded = 0.0

    # -- practices ------------------------------------------------------------------------------
    def add_practice(self, pid: str, *, slots: int = 6, appointments: int = 2) -> Practice:
        p = self.practices[pid] = Practice(pid=pid, client_id=f"tvs-{pid}", secret=f"secret-{pid}")
        self.by_client[p.client_id] = pid
        rng = random.Random(f"{pid}")
        org = self.change(p, "CREATE", R.organization(f"{rng.randrange(10**8, 10**9)}", f"Praxis {pid}"),
                          agent="116117")
        roles = []
        for i in range(2):
            pr = self.change(p, "CREATE", R.practitioner(f"{rng.randrange(10**8, 10**9)}", f"Arzt{i}", "Dr"),
                             agent="116117")
            roles.append(self.change(p, "CREATE", R.practitioner_role(pr["id"], org["id"], "ALLG"),
                                     agent="116117"))
        scheds = [self.change(p, "CREATE", R.schedule(r["id"], "124", f"Sprechstunde {i}"), agent="practice")
                  for i, r in enumerate(roles)]
        base = 1_900_000_000 + rng.randrange(0, 10**6) * 60
        made = []
        for i in range(slots):
            s = scheds[i % len(scheds)]
            made.append(self.change(p, "CREATE", R.slot(s["id"], instant(base + i * 900), instant(base + i * 900 + 900)),
                                    agent="practice"))
        for s in made[:appointments]:
            self.book(p, s)
        return p

    def practice_of_token(self, token: str) -> Practice | None:
        pid = self.tokens.get(token)
        return self.practices.get(pid) if pid else None

    def issue_token(self, client_id: str, secret: str) -> str | None:
        pid = self.by_client.get(client_id)
        if pid is None or self.practices[pid].secret != secret:
            return None
        tok = f"tok-{next(self._seq)}-{self.rng.randrange(10**12)}"
        self.tokens[tok] = pid
        return tok

    def revoke_tokens(self) -> None:
        """Every issued token becomes invalid (the next calls get 401)."""
        self.tokens.clear()

    # -- changes ----------------------------------------------------------------------------------
    def _recorded(self) -> str:
        t = max(self.clock(), self._last_recorded + 1e-6)
        self._last_recorded = t
        return instant(t)

    def change(self, p: Practice, activity: str, res: dict | None = None, *, key: str | None = None,
               agent: str = "116117") -> dict:
        """Make one change (new version + Provenance); returns the stored resource version."""
        now = self._recorded()
        if activity == "CREATE":
            rid = f"{res['resourceType'][:3].lower()}-{next(self._seq)}"
            key = f"{res['resourceType']}/{rid}"
            p.order[key] = next(self._seq)
        else:
            assert key is not None
            rid = key.split("/", 1)[1]
        v = p.versions.get(key, 0) + 1
        p.versions[key] = v
        rtype = key.split("/", 1)[0]
        out: dict = {}
        if activity == "DELETE":
            p.current.pop(key, None)
        else:
            out = R.with_meta(res, rid, v, now)
            p.current[key] = out
            p.history[(key, v)] = out
        who = {"practice": ("author", f"Praxis {p.pid}"), "patient": ("informant", "Patient"),
               "physician": ("performer", "Arzt"), "116117": ("custodian", "116117 Terminservice")}[agent]
        p.provenance.append(R.provenance(f"prov-{next(self._seq):09d}", R.ref(rtype, rid, v), now, activity,
                                         who[0], who[1]))
        return out

    def book(self, p: Practice, slot: dict) -> dict:
        s = dict(slot, status="busy")
        self.change(p, "UPDATE", s, key=f"Slot/{slot['id']}", agent="patient")
        return self.change(p, "CREATE", R.appointment(slot["id"], slot["start"], slot["end"],
                                                      f"Patient {self.rng.randrange(10**6)}"), agent="patient")

    def random_change(self, p: Practice) -> None:
        """One plausible change by a patient, the 116117 service or a physician."""
        slots = [r for k, r in p.current.items() if k.startswith("Slot/")]
        appts = [r for k, r in p.current.items() if k.startswith("Appointment/") and r["status"] == "booked"]
        free = [s for s in slots if s["status"] == "free"]
        roll = self.rng.random()
        if roll < 0.35 and free:
            self.book(p, self.rng.choice(free))
        elif roll < 0.6 and appts:
            a = self.rng.choice(appts)
            self.change(p, "UPDATE", dict(a, status="cancelled"), key=f"Appointment/{a['id']}", agent="patient")
            sref = a["slot"][0]["reference"]
            if sref in p.current:
                self.change(p, "UPDATE", dict(p.current[sref], status="free"), key=sref, agent="116117")
        elif roll < 0.8 or not slots:
            scheds = [r for k, r in p.current.items() if k.startswith("Schedule/")]
            if scheds:
                base = 1_950_000_000 + self.rng.randrange(0, 10**6) * 60
                self.change(p, "CREATE", R.slot(self.rng.choice(scheds)["id"], instant(base), instant(base + 900)),
                            agent="physician")
        else:
            s = self.rng.choice(slots)
            if s["status"] == "free":
                self.change(p, "DELETE", key=f"Slot/{s['id']}", agent="physician")

    def mutate(self, n: int, practices: list[str] | None = None) -> int:
        ids = practices or list(self.practices)
        for _ in range(n):
            self.random_change(self.practices[self.rng.choice(ids)])
        return n

    # -- faults -------------------------------------------------------------------------------------
    def inject(self, *, status: int | None = None, payload: str | None = None, count: int = 1,
               paths: str = "") -> None:
        self.faults.append(Fault(status=status, payload=payload, remaining=count, paths=paths))

    def take_fault(self, path: str) -> Fault | None:
        for f in self.faults:
            if f.remaining > 0 and f.paths in path:
                f.remaining -= 1
                if f.remaining == 0:
                    self.faults.remove(f)
                return f
        return None

    # -- search -------------------------------------------------------------------------------------
    def note_poll(self, p: Practice) -> bool:
        """A Provenance search (first page). False (and recorded) when within the interval."""
        now = self.clock()
        if p.last_poll is not None and now < p.last_poll + self.poll_interval_s - 1e-6:
            self.violations.append((p.pid, p.last_poll, now))
            return False
        p.last_poll = now
        p.polls += 1
        return True

    def search(self, p: Practice, rtype: str, params: dict[str, str]) -> tuple[list[dict], list[dict], str | None]:
        """(matches, includes, next-page position) oldest first, stable across pages."""
        count = max(1, min(int(params.get("_count") or 50), 1000))
        after = params.get("_after")
        if rtype == "Provenance":
            rows = p.provenance
            since = params.get("recorded", "")
            op, since = (since[:2], since[2:]) if since[:2] in ("ge", "gt") else ("ge", since)
            key = lambda r: (r["recorded"], r["id"])  # noqa: E731  instants sort as text (fixed format)
            if since:
                rows = [r for r in rows if (r["recorded"] >= since if op == "ge" else r["recorded"] > since)]
            if after:
                a_rec, a_id = after.split("|", 1)
                rows = [r for r in rows if key(r) > (a_rec, a_id)]
            page = rows[:count]
            more = len(rows) > count
            includes = []
            if "Provenance:target" in params.get("_include", ""):
                for r in page:
                    t = r["target"][0]["reference"]
                    rt, rid, v = R.split_ref(t)
                    inc = p.history.get((f"{rt}/{rid}", v))
                    if inc is not None:
                        includes.append(inc)
            nxt = f"{page[-1]['recorded']}|{page[-1]['id']}" if more and page else None
            return page, includes, nxt
        keys = sorted((k for k in p.current if k.startswith(rtype + "/")), key=lambda k: p.order[k])
        if after:
            keys = [k for k in keys if p.order[k] > int(after)]
        page = keys[:count]
        nxt = str(p.order[page[-1]]) if len(keys) > count else None
        return [p.current[k] for k in page], [], nxt

    def snapshot(self, pid: str) -> dict[str, dict]:
        return dict(self.practices[pid].current)
