"""``tss.practice``: one entity per practice (TVS) owning its 116117 sync cursor.

Phases: ``new`` -> ``initial`` (paged search of every resource type, oldest first) ->
``idle`` <-> ``polling`` (continuous sync: Provenance search after the cursor, paged).

Each page is its own round, driven by the durable ``step`` timer: the page's changes,
the cursor and the next-page link are committed together, so a restart at any point
resumes at the next unapplied page — nothing applied twice (events only leave with the
commit; applying is idempotent by version) and nothing skipped (the cursor only moves
past changes that were applied, in order).

The poll rule (never more than one Provenance search per ``poll_interval_s`` >= 300 s):
a poll is *claimed* durably (``last_poll_at``) in one round and its search runs in the
next; a claim whose search did not run in the same activation (host restart in between)
is treated as spent and the next poll waits for the interval. Failed polls are not
retried before the interval either. Timer, manual ``PollNow`` and restarts all go
through the same check. Direct reads (``ReadResource``) are allowed at any time.

``Configure`` with another ``base_url`` (another Terminservice) drops the local store and
starts a fresh initial sync.

The practice's Terminservice credentials (client id + secret of its TVS) are part of the
entity state: they are per practice (one TVS login each, provisioned with ``Configure``),
and the state is stored AES-256-GCM encrypted (``personal_data = True``: key id in the
header, AAD = kind + key), so they are never in plain form in Redis; status views and
events never carry them. Bearer tokens are only held in the host's client (memory).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from actors.runtime.entity import Entity, handles
from actors.tss.client import Credentials, TssError
from protocols.events import Event
from protocols.tss import resources as R
from protocols.tss.errors import TssProtocolError
from protocols.tss.messages import (
    Configure,
    CreateResource,
    DeleteResource,
    GetStatus,
    GetStore,
    PollAccepted,
    PollDue,
    PollNow,
    PollRefused,
    PublishSlot,
    ReadResource,
    ReplaceResource,
    ResourceReply,
    SetSlotStatus,
    StartInitialSync,
    Step,
    StoreSnapshot,
    SyncStatus,
)
from protocols.tss.sync import Change, Cursor, LocalStore, apply_change, changes_of

KIND = "tss.practice"
TOPIC = "tss.appointments"
APPLIED_IDS_MAX = 5000
RETRY_BASE_S = 5.0
RETRY_MAX_S = 300.0
PAGE_RETRIES = 5


class InitialProgress(BaseModel):
    type_index: int = 0
    next_url: str | None = None
    started: str = ""  # server timestamp of the first page: the cursor to continue from
    seen: list[str] = Field(default_factory=list)


class PracticeState(BaseModel):
    base_url: str = ""
    client_id: str = ""
    client_secret: str = ""
    poll_interval_s: float = 300.0
    page_size: int = 50
    phase: Literal["new", "initial", "idle", "polling"] = "new"
    initial: InitialProgress | None = None
    initial_done: bool = False
    cursor: Cursor = Field(default_factory=Cursor)
    poll_claim: int = 0
    poll_started: bool = False
    poll_next_url: str | None = None
    last_poll_at: float | None = None
    next_poll_at: float | None = None
    step_seq: int = 0
    page_errors: int = 0
    last_sync_at: float | None = None
    last_error: str = ""
    error_code: str = ""
    errors: int = 0
    applied: int = 0
    applied_ids: list[str] = Field(default_factory=list)
    store: LocalStore = Field(default_factory=LocalStore)


class PracticeSync(Entity[PracticeState]):
    kind = KIND
    State = PracticeState
    personal_data = True  # appointments name patients

    def on_activate(self) -> None:
        self._claims: set[int] = set()  # polls claimed in this activation

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def creds(self) -> Credentials:
        s = self.state
        return Credentials(s.base_url, s.client_id, s.client_secret)

    @property
    def client(self):
        return self.ctx.ports.client

    def _step(self, delay_s: float = 0.0) -> None:
        # one timer name per step: the shard host may deliver a fired timer a second time
        # when it read it just before the commit that handled it; a stale step is a no-op
        # and deletes only its own name, never the next step's timer
        self.state.step_seq += 1
        self.ctx.set_timer(f"step-{self.state.step_seq}", Step(seq=self.state.step_seq), delay_s=delay_s)

    def _schedule_poll(self, at: float) -> None:
        self.state.next_poll_at = at
        self.ctx.set_timer("poll", PollDue(), at=at)

    def _allowed_at(self, now: float | None = None) -> float:
        """When the next Provenance search may run (``now`` when none ran yet)."""
        s = self.state
        if s.last_poll_at is not None:
            return s.last_poll_at + s.poll_interval_s
        return self.ctx.now() if now is None else now

    def _error(self, e: Exception, where: str) -> None:
        s = self.state
        s.errors += 1
        s.error_code = getattr(e, "code", type(e).__name__)
        s.last_error = f"{where}: {e}"[:500]
        self.ctx.emit(Event(topic=TOPIC, type="sync.error", key=self.key,
                            data={"phase": s.phase, "code": s.error_code, "where": where}))

    def _clear_error(self) -> None:
        self.state.last_error = ""
        self.state.error_code = ""

    def _event(self, res_type: str, res_id: str, activity: str, version: int | None, source: str,
               status: str | None = None, provenance: str | None = None) -> None:
        self.ctx.emit(Event(topic=TOPIC, type=f"{res_type.lower()}.{activity.lower()}", key=self.key,
                            data={"resource_type": res_type, "resource_id": res_id, "version": version,
                                  "activity": activity, "status": status, "provenance": provenance,
                                  "source": source}))

    def _status(self) -> SyncStatus:
        s = self.state
        now = self.ctx.now()
        counts = {t: s.store.count(t) for t in R.SYNC_TYPES}
        return SyncStatus(practice=self.key, phase=s.phase, cursor=s.cursor, last_sync_at=s.last_sync_at,
                          last_poll_at=s.last_poll_at, next_poll_at=s.next_poll_at,
                          lag_s=(now - s.last_sync_at) if s.last_sync_at else None,
                          poll_interval_s=s.poll_interval_s, applied=s.applied, resources=counts,
                          last_error=s.last_error, error_code=s.error_code, errors=s.errors,
                          initial_done=s.initial_done)

    # -- configuration and control ------------------------------------------------------------------
    @handles
    def on_configure(self, msg: Configure) -> SyncStatus:
        s = self.state
        base_url = msg.base_url.rstrip("/")
        other_server = bool(s.base_url) and s.base_url != base_url
        s.base_url, s.client_id, s.client_secret = base_url, msg.client_id, msg.client_secret
        s.poll_interval_s = msg.poll_interval_s  # validated >= 300 s by the message
        s.page_size = msg.page_size
        if other_server:
            # another Terminservice: its ids, versions and Provenance say nothing about what
            # we hold - drop the local store (with DELETE events) and sync from scratch
            for key in list(s.store.resources):
                t, i = key.split("/", 1)
                self._event(t, i, "DELETE", None, "reconfigure")
            s.store = LocalStore()
            s.cursor = Cursor()
            s.initial_done = False
            self.ctx.cancel_timer("poll")
            s.next_poll_at = None
            self._start_initial()
        elif s.phase == "new":
            self._start_initial()
        elif s.last_poll_at is not None and s.phase == "idle":
            self._schedule_poll(max(self._allowed_at(), s.next_poll_at or 0.0))
        return self._status()

    def _start_initial(self) -> None:
        self.state.phase = "initial"
        self.state.initial = InitialProgress()
        self.state.page_errors = 0
        self._step(0.0)

    @handles
    def on_start_initial(self, msg: StartInitialSync) -> SyncStatus:
        if self.state.phase in ("idle", "new") and self.state.base_url:
            self.ctx.cancel_timer("poll")
            self.state.next_poll_at = None
            self._start_initial()
        return self._status()

    @handles
    def on_poll_now(self, msg: PollNow) -> PollAccepted | PollRefused:
        return self._request_poll(manual=True)

    @handles
    def on_poll_due(self, msg: PollDue) -> PollAccepted | PollRefused:
        return self._request_poll(manual=False)

    def _request_poll(self, *, manual: bool) -> PollAccepted | PollRefused:
        s = self.state
        now = self.ctx.now()
        if s.phase == "polling":
            return PollAccepted(runs_at=s.last_poll_at or now)
        if s.phase in ("new", "initial"):
            nb = s.next_poll_at or now
            return PollRefused(reason=f"no poll during phase {s.phase!r}: the initial sync must finish first",
                               not_before=nb, retry_in_s=max(0.0, nb - now))
        allowed = self._allowed_at(now)  # the same reading of the clock: never "too early" by a tick
        if now < allowed:
            if not manual:  # a timer that fired early (clock moved back?): keep the rule
                self._schedule_poll(allowed)
            return PollRefused(reason=f"the Terminservice allows one poll per {s.poll_interval_s:.0f} s; "
                                      f"the last ran at {R.instant(s.last_poll_at or 0)}",
                               not_before=allowed, retry_in_s=allowed - now)
        # claim: durable before the search goes out (the search runs in the next round)
        s.last_poll_at = now
        s.phase = "polling"
        s.poll_claim += 1
        s.poll_started = False
        s.poll_next_url = None
        s.page_errors = 0
        self._claims.add(s.poll_claim)
        self._schedule_poll(now + s.poll_interval_s)
        self._step(0.0)
        return PollAccepted(runs_at=now)

    # -- the paged work ---------------------------------------------------------------------------------
    @handles
    async def on_step(self, msg: Step) -> None:
        if msg.seq != self.state.step_seq:
            return None  # superseded (a newer step is scheduled)
        if self.state.phase == "initial":
            await self._initial_page()
        elif self.state.phase == "polling":
            await self._poll_page()

    async def _initial_page(self) -> None:
        s = self.state
        ip = s.initial or InitialProgress()
        s.initial = ip
        rtype = R.SYNC_TYPES[ip.type_index]
        try:
            if ip.next_url:
                b = await self.client.search(self.creds, rtype, next_url=ip.next_url)
            else:
                b = await self.client.search(self.creds, rtype, {"_count": str(s.page_size)})
            matches, _, nxt = R.bundle_parts(b)
            for r in matches:
                R.check_resource(r, expect=rtype)
            R.parse_instant(b.get("timestamp") or "")
        except (TssError, TssProtocolError) as e:
            s.page_errors += 1
            self._error(e, f"initial sync {rtype}")
            self._step(min(RETRY_BASE_S * 2 ** (s.page_errors - 1), RETRY_MAX_S))
            return
        s.page_errors = 0
        if not ip.started:
            ip.started = b["timestamp"]
        for r in matches:
            key = f"{rtype}/{r['id']}"
            ip.seen.append(key)
            if s.store.put(r).applied:
                self._event(rtype, r["id"], "SYNC", R.version_of(r), "initial", r.get("status"))
        ip.next_url = nxt
        if nxt is None:
            ip.type_index += 1
        if ip.type_index < len(R.SYNC_TYPES):
            self._step(0.0)
            return
        seen = set(ip.seen)  # gone while we were away: drop
        for key in [k for k in s.store.resources if k not in seen]:
            s.store.resources.pop(key)
            t, i = key.split("/", 1)
            self._event(t, i, "DELETE", None, "initial")
        if s.cursor.recorded == "" or s.cursor.before(ip.started, ""):
            s.cursor = Cursor(recorded=ip.started, id="")
        now = self.ctx.now()
        s.phase, s.initial, s.initial_done, s.last_sync_at = "idle", None, True, now
        self._clear_error()
        self.ctx.emit(Event(topic=TOPIC, type="sync.initial_completed", key=self.key,
                            data={"resources": len(s.store.resources), "cursor": s.cursor.recorded}))
        self._schedule_poll(max(now + s.poll_interval_s, self._allowed_at()))

    def _end_poll(self) -> None:
        s = self.state
        s.phase = "idle"
        s.poll_next_url = None
        s.poll_started = False
        self._schedule_poll(max(self._allowed_at(), s.next_poll_at or 0.0))

    async def _poll_page(self) -> None:
        s = self.state
        first = not s.poll_started
        if first and s.poll_claim not in self._claims:
            # claimed before a restart: the search may have gone out; it counts as this poll
            s.last_error = "poll interrupted by a restart; it counts as a poll, the next waits for the interval"
            s.error_code = "interrupted"
            self._end_poll()
            return
        self._claims.discard(s.poll_claim)
        try:
            if first:
                params = {"_count": str(s.page_size), "_include": "Provenance:target", "_sort": "recorded"}
                if s.cursor.recorded:
                    params["recorded"] = f"ge{s.cursor.recorded}"
                b = await self.client.search(self.creds, "Provenance", params, retry=False)
            else:
                b = await self.client.search(self.creds, "Provenance", next_url=s.poll_next_url)
            provs, incs, nxt = R.bundle_parts(b)
            for p in provs:
                R.check_resource(p, expect="Provenance")
            for r in incs:
                R.check_resource(r)
            changes = changes_of(provs, incs)
        except (TssError, TssProtocolError) as e:
            self._error(e, "continuous sync (Provenance search)")
            if first:
                self._end_poll()  # a failed poll is retried at the next allowed time, not sooner
            else:
                s.page_errors += 1  # a next page of the same search: retry it, with backoff
                if s.page_errors > PAGE_RETRIES:
                    self._end_poll()
                else:
                    self._step(min(RETRY_BASE_S * 2 ** (s.page_errors - 1), RETRY_MAX_S))
            return
        s.poll_started = True
        s.page_errors = 0
        for ch in changes:
            if not s.cursor.before(ch.recorded, ch.provenance_id):
                continue  # at or before the cursor: applied already
            if ch.activity != "DELETE" and ch.resource is None:
                try:  # not included: fetch that version directly
                    ch.resource = await self.client.read(self.creds, ch.resource_type, ch.resource_id, ch.version)
                except (TssError, TssProtocolError) as e:
                    self._error(e, f"reading {ch.ref} for Provenance/{ch.provenance_id}")
                    self._end_poll()  # cursor stays before this change
                    return
            self._apply(ch)
        if nxt:
            s.poll_next_url = nxt
            self._step(0.0)
            return
        s.last_sync_at = self.ctx.now()
        self._clear_error()
        self._end_poll()

    def _apply(self, ch: Change) -> None:
        s = self.state
        out = apply_change(s.store, ch)
        s.cursor = Cursor(recorded=ch.recorded, id=ch.provenance_id)
        s.applied += 1
        s.applied_ids.append(ch.provenance_id)
        if len(s.applied_ids) > APPLIED_IDS_MAX:
            del s.applied_ids[: len(s.applied_ids) - APPLIED_IDS_MAX]
        if out.applied:
            status = (ch.resource or {}).get("status")
            self._event(ch.resource_type, ch.resource_id, ch.activity, ch.version, "poll", status, ch.provenance_id)

    # -- direct reads and writes (any time) ------------------------------------------------------------
    async def _guard(self, coro) -> ResourceReply:
        try:
            return await coro
        except (TssError, TssProtocolError) as e:
            code = getattr(e, "code", "error")
            return ResourceReply(ok=False, error=str(e)[:500], code=code)

    def _keep(self, res: dict, source: str, activity: str) -> None:
        if self.state.store.put(res).applied:
            self._event(res["resourceType"], res["id"], activity, R.version_of(res), source, res.get("status"))

    @handles
    async def on_read(self, msg: ReadResource) -> ResourceReply:
        async def go():
            res = await self.client.read(self.creds, msg.resource_type, msg.resource_id)
            self._keep(res, "read", "READ")
            return ResourceReply(ok=True, resource=res)

        return await self._guard(go())

    async def _create(self, res: dict) -> ResourceReply:
        try:
            R.check_resource(res, need_id=False)
        except TssProtocolError as e:
            return ResourceReply(ok=False, error=str(e), code=e.code)
        out = await self.client.create(self.creds, res)
        self._keep(out, "write", "CREATE")
        return ResourceReply(ok=True, resource=out)

    @handles
    async def on_publish_slot(self, msg: PublishSlot) -> ResourceReply:
        return await self._guard(self._create(R.slot(msg.schedule_id, msg.start, msg.end, msg.status)))

    @handles
    async def on_create(self, msg: CreateResource) -> ResourceReply:
        return await self._guard(self._create(msg.resource))

    @handles
    async def on_set_slot_status(self, msg: SetSlotStatus) -> ResourceReply:
        async def go():
            cur = self.state.store.resources.get(f"Slot/{msg.slot_id}")
            if cur is None:
                cur = await self.client.read(self.creds, "Slot", msg.slot_id)
            out = await self.client.update(self.creds, dict(cur, status=msg.status))
            self._keep(out, "write", "UPDATE")
            return ResourceReply(ok=True, resource=out)

        return await self._guard(go())

    async def _delete(self, rtype: str, rid: str) -> None:
        await self.client.delete(self.creds, rtype, rid)
        key = f"{rtype}/{rid}"
        v = self.state.store.version(key)
        if self.state.store.delete(key, v + 1 if v else None).applied:
            self._event(rtype, rid, "DELETE", v + 1, "write")

    @handles
    async def on_delete(self, msg: DeleteResource) -> ResourceReply:
        async def go():
            await self._delete(msg.resource_type, msg.resource_id)
            return ResourceReply(ok=True)

        return await self._guard(go())

    @handles
    async def on_replace(self, msg: ReplaceResource) -> ResourceReply:
        """Anything but a slot's status: delete and create again (the Terminservice rule)."""
        async def go():
            if msg.resource.get("resourceType") != msg.resource_type:
                return ResourceReply(ok=False, error="resource type does not match", code="invalid_resource")
            await self._delete(msg.resource_type, msg.resource_id)
            new = {k: v for k, v in msg.resource.items() if k != "id"}
            return await self._create(new)

        return await self._guard(go())

    # -- reads of the entity ------------------------------------------------------------------------------
    @handles(readonly=True)
    def on_status(self, msg: GetStatus) -> SyncStatus:
        return self._status()

    @handles(readonly=True)
    def on_store(self, msg: GetStore) -> StoreSnapshot:
        return StoreSnapshot(resources=self.state.store.resources, cursor=self.state.cursor,
                             applied_ids=list(self.state.applied_ids))


__all__ = ["PracticeSync", "PracticeState", "KIND"]
