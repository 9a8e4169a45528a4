"""The case record entity ``efa.record``: one per (patient, purpose), so every operation
on a record — including the merge decision of createECR — is serialised (race-free).

Key: ``Pseudonymizer.pseudonym(patient + "\\x1f" + purpose, "efa.record")`` (the
``ecrRef``); partition ids are ``<ecrRef>.p<n>``, document ids ``<ecrRef>.d<n>``. The state
(patient, purpose, consent, registry metadata, access log) is encrypted at rest. Document
bytes are not here: they are in the encrypted blob store (repository), referenced by
``blob_ref``. Refusals are replies (``Reply(ok=False, code=...)``), audited in the access
log; they change nothing else.
"""

from __future__ import annotations

from actors.runtime.entity import Entity, handles
from protocols.efa.messages import (
    AccessLogQuery,
    CloseECR,
    ConsentLapsed,
    CreateECR,
    CreatePartition,
    DeleteBlobs,
    GetPolicy,
    LifecycleStep,
    ListContent,
    ListPartitions,
    ProvideData,
    RecordStatusQuery,
    RegisterConsent,
    Reply,
    RetrieveDocs,
)
from protocols.efa.model import AccessEntry, Caller, Document, DocumentIn, Partition, RecordState, Relationship
from protocols.efa.rules import Refusal, advance, check_consent, check_submission, merge_decision, require, rights, union
from protocols.events import Event

TOPIC = "efa.record"
KIND = "efa.record"
PATIENT_KIND = "efa.patient"
JANITOR_KIND = "efa.janitor"


def _refused(r: Refusal) -> Reply:
    return Reply(ok=False, code=r.code, message=r.message)


class CaseRecord(Entity[RecordState]):
    kind = KIND
    State = RecordState
    personal_data = True

    # -- helpers -------------------------------------------------------------------------
    @property
    def settings(self):
        return self.ctx.ports.settings

    def _audit(self, caller: Caller, op: str, outcome: str = "ok", detail: str = "") -> None:
        st = self.state
        if st.status == "none":
            return
        st.access_log.append(AccessEntry(at=self.ctx.now(), sub=caller.sub, org=caller.org, op=op,
                                         outcome=outcome, detail=detail[:200]))
        over = len(st.access_log) - self.settings.access_log_max
        if over > 0:
            del st.access_log[:over]
            st.access_log_dropped += over

    def _refuse(self, caller: Caller, op: str, r: Refusal) -> Reply:
        if self.state.status == "none":
            self.ctx.delete_entity()  # nothing to keep for a record that does not exist
        else:
            self._audit(caller, op, r.code)
        return _refused(r)

    def _event(self, type_: str, **data) -> None:
        self.ctx.emit(Event(topic=TOPIC, type=type_, key=self.key,
                            data={"ecr_ref": self.key, "status": self.state.status, **data}))

    def _new_partition(self, caller: Caller, title: str, reason: str) -> Partition:
        st = self.state
        p = Partition(id=f"{self.key}.p{st.next_partition}", title=title, owner=caller.sub, owner_org=caller.org,
                      created_at=self.ctx.now(), reason=reason)
        st.next_partition += 1
        st.partitions[p.id] = p
        return p

    def _register(self, caller: Caller, part: Partition, docs: list[DocumentIn], rels: list[Relationship]) -> dict:
        """Registry: give the (already checked) documents ids, link them to the partition,
        record their outgoing relationships; RPLC / XFRM_RPLC deprecate the target."""
        st = self.state
        ids: dict[str, str] = {}
        now = self.ctx.now()
        for d in docs:
            did = f"{self.key}.d{st.next_document}"
            st.next_document += 1
            ids[d.local_id] = did
            st.documents[did] = Document(id=did, partition_id=part.id, title=d.title, mime_type=d.mime_type,
                                         class_code=d.class_code, size=d.size, sha256=d.sha256,
                                         blob_ref=d.blob_ref, author=caller.sub, author_org=caller.org,
                                         created_at=now)
            part.documents.append(did)
        for r in rels:
            src = ids[r.source]
            st.documents[src].relationships.append(Relationship(source=src, target=r.target, type=r.type))
            if r.type in ("RPLC", "XFRM_RPLC"):
                st.documents[r.target].status = "deprecated"
        if docs:
            self._event("document.provided", partition_id=part.id, documents=list(ids.values()),
                        relationships=[r.type for r in rels])
        return ids

    def _move(self, status: str, reason: str) -> None:
        st = self.state
        st.status = status  # type: ignore[assignment]
        st.status_since = self.ctx.now()
        self.ctx.cancel_timer("lapse")
        if status == "suspended":
            st.close_reason = reason
            self.ctx.set_timer("lifecycle", LifecycleStep(generation=st.generation, expected="suspended"),
                               delay_s=self.settings.suspend_grace_s)
            self._event("record.closed", reason=reason)
        elif status == "retired":
            self.ctx.set_timer("lifecycle", LifecycleStep(generation=st.generation, expected="retired"),
                               delay_s=self.settings.archive_after_s)
            self._event("record.retired")
        elif status == "archived":
            refs = [d.blob_ref for d in st.documents.values() if d.blob_ref]
            for d in st.documents.values():  # references stay, content goes
                d.blob_ref = d.title = d.mime_type = d.class_code = d.sha256 = ""
            if refs:
                self.ctx.tell(JANITOR_KIND, self.key, DeleteBlobs(refs=refs))
            self._event("record.archived", deleted_documents=len(refs))

    def _schedule_lapse(self) -> None:
        c = self.state.consent
        self.ctx.set_timer("lapse", ConsentLapsed(generation=self.state.generation, valid_until=c.valid_until),
                           at=c.valid_until)

    def _home_partition(self, caller: Caller) -> Partition:
        mine = [p for p in self.state.partitions.values() if p.owner == caller.sub]
        return mine[-1] if mine else next(iter(self.state.partitions.values()))

    def _partition_view(self, p: Partition) -> dict:
        st = self.state
        return {"partition_id": p.id, "ecr_ref": st.ecr_ref, "title": p.title, "owner": p.owner,
                "owner_org": p.owner_org, "created_at": p.created_at, "reason": p.reason,
                "documents": len(p.documents), "purpose": st.purpose, "status": st.status}

    # -- createECR: new record or merge --------------------------------------------------
    @handles
    def on_create(self, msg: CreateECR) -> Reply:
        st, c, now = self.state, msg.caller, self.ctx.now()
        try:
            check_consent(msg.consent, now)
            if st.status in ("none", "archived"):
                check_submission(st, msg.documents, [])
                keep_log, dropped, gen = st.access_log, st.access_log_dropped, st.generation + 1
                np, nd = st.next_partition, st.next_document
                self.state = st = RecordState(status="open", ecr_ref=self.key, patient=msg.patient, purpose=msg.purpose,
                                              consent=msg.consent, created_at=now, status_since=now, generation=gen,
                                              access_log=keep_log, access_log_dropped=dropped,
                                              next_partition=np, next_document=nd)
                st.participants = union(msg.consent.participants, [c.sub])
                part = self._new_partition(c, msg.title, "initial")
                ids = self._register(c, part, msg.documents, [])
                self._schedule_lapse()
                self._audit(c, "createECR", "ok", "created")
                self._event("record.created", partition_id=part.id, participants=len(st.participants))
                return Reply(data={"outcome": "created", "ecr_ref": self.key, "partition_id": part.id,
                                   "document_ids": list(ids.values())})
            if st.status != "open":
                raise Refusal("record_not_open", f"the case record for this patient and purpose is {st.status}; "
                                                 "it cannot be merged")
            merge_decision(st, c, msg.consent)
            check_submission(st, msg.documents, [])
        except Refusal as r:
            return self._refuse(c, "createECR", r)
        st.participants = union(st.participants, union(msg.consent.participants, [c.sub]))
        if msg.consent.valid_until > st.consent.valid_until:
            st.consent.valid_until = msg.consent.valid_until
            self._schedule_lapse()
        part = self._new_partition(c, msg.title, "merge")
        ids = self._register(c, part, msg.documents, [])
        self._audit(c, "createECR", "ok", "merged")
        self._event("record.merged", partition_id=part.id, participants=len(st.participants))
        return Reply(data={"outcome": "merged", "ecr_ref": self.key, "partition_id": part.id,
                           "document_ids": list(ids.values())})

    @handles
    def on_create_partition(self, msg: CreatePartition) -> Reply:
        c = msg.caller
        try:
            require(self.state, c, "write")
            check_submission(self.state, msg.documents, msg.relationships)
        except Refusal as r:
            return self._refuse(c, "createPartition", r)
        part = self._new_partition(c, msg.title, "added")
        ids = self._register(c, part, msg.documents, msg.relationships)
        self._audit(c, "createPartition", "ok", part.id)
        return Reply(data={"ecr_ref": self.key, "partition_id": part.id, "document_ids": list(ids.values())})

    @handles
    def on_close(self, msg: CloseECR) -> Reply:
        c = msg.caller
        try:
            require(self.state, c, "write")
            check_submission(self.state, msg.documents, [])
        except Refusal as r:
            return self._refuse(c, "closeECR", r)
        part = self._home_partition(c)
        ids = self._register(c, part, msg.documents, [])
        self._audit(c, "closeECR", "ok", msg.reason)
        self._move("suspended", "closed")
        self.state.close_reason = msg.reason
        return Reply(data={"ecr_ref": self.key, "status": self.state.status, "partition_id": part.id,
                           "document_ids": list(ids.values())})

    @handles
    def on_register_consent(self, msg: RegisterConsent) -> Reply:
        c, st = msg.caller, self.state
        try:
            require(st, c, "write")
            if not msg.consent.revoked and msg.consent.valid_until <= self.ctx.now():
                raise Refusal("invalid_consent", "consent validity lies in the past")
            check_submission(st, msg.documents, [])
        except Refusal as r:
            return self._refuse(c, "registerConsent", r)
        part = self._home_partition(c)
        ids = self._register(c, part, msg.documents, [])
        if msg.consent.revoked:
            st.consent.revoked = True
            self._audit(c, "registerConsent", "ok", "revoked")
            self._move("suspended", "consent_revoked")
        else:
            st.consent = msg.consent.model_copy()
            st.participants = union(st.participants, msg.consent.participants)
            self._schedule_lapse()
            self._audit(c, "registerConsent", "ok", "registered")
            self._event("record.consent_registered", participants=len(st.participants))
        return Reply(data={"ecr_ref": self.key, "status": st.status, "participants": len(st.participants),
                           "document_ids": list(ids.values())})

    # -- reads (audited) -----------------------------------------------------------------
    @handles
    def on_list_partitions(self, msg: ListPartitions) -> Reply:
        c = msg.caller
        try:
            require(self.state, c, "read")
        except Refusal as r:
            return self._refuse(c, "listPartitions", r)
        self._audit(c, "listPartitions")
        return Reply(data={"partitions": [self._partition_view(p) for p in self.state.partitions.values()]})

    @handles
    def on_list_content(self, msg: ListContent) -> Reply:
        c, st = msg.caller, self.state
        try:
            require(st, c, "read")
            part = st.partitions.get(msg.partition_id)
            if part is None:
                raise Refusal("unknown_partition", f"no partition {msg.partition_id!r} in this record")
        except Refusal as r:
            return self._refuse(c, "listPartitionContent", r)
        self._audit(c, "listPartitionContent", "ok", part.id)
        docs = [st.documents[d].model_dump(exclude={"blob_ref"}) for d in part.documents]
        return Reply(data={"partition": self._partition_view(part), "documents": docs})

    @handles
    def on_provide(self, msg: ProvideData) -> Reply:
        c, st = msg.caller, self.state
        try:
            require(st, c, "write")
            part = st.partitions.get(msg.partition_id)
            if part is None:
                raise Refusal("unknown_partition", f"no partition {msg.partition_id!r} in this record")
            check_submission(st, msg.documents, msg.relationships)
        except Refusal as r:
            return self._refuse(c, "provideData", r)
        ids = self._register(c, part, msg.documents, msg.relationships)
        self._audit(c, "provideData", "ok", part.id)
        return Reply(data={"partition_id": part.id, "document_ids": ids})

    @handles
    def on_retrieve(self, msg: RetrieveDocs) -> Reply:
        c, st = msg.caller, self.state
        try:
            require(st, c, "read")
            out = []
            for did in msg.document_ids:
                d = st.documents.get(did)
                if d is None or not d.blob_ref:
                    raise Refusal("unknown_document", f"no document {did!r} in this record")
                out.append(d.model_dump())
        except Refusal as r:
            return self._refuse(c, "retrieveData", r)
        self._audit(c, "retrieveData", "ok", ",".join(msg.document_ids)[:200])
        return Reply(data={"documents": out})

    @handles(readonly=True)
    def on_policy(self, msg: GetPolicy) -> Reply:
        st = self.state
        if st.status == "none":
            return Reply(ok=False, code="unknown_record", message="no such case record")
        return Reply(data={"ecr_ref": self.key, "status": st.status, "rights": sorted(rights(st, msg.caller))})

    # -- operators -----------------------------------------------------------------------
    @handles(readonly=True)
    def on_status(self, msg: RecordStatusQuery) -> Reply:
        st = self.state
        if st.status == "none":
            return Reply(ok=False, code="unknown_record", message="no such case record")
        c = st.consent
        return Reply(data={
            "ecr_ref": self.key, "status": st.status, "status_since": st.status_since, "created_at": st.created_at,
            "generation": st.generation, "close_reason": st.close_reason, "partitions": len(st.partitions),
            "documents": len(st.documents), "participants": len(st.participants),
            "consent": None if c is None else {"valid_until": c.valid_until, "may_extend": c.may_extend,
                                               "may_merge": c.may_merge, "revoked": c.revoked},
            "access_log_entries": len(st.access_log) + st.access_log_dropped,
        })

    @handles(readonly=True)
    def on_access_log(self, msg: AccessLogQuery) -> Reply:
        st = self.state
        if st.status == "none":
            return Reply(ok=False, code="unknown_record", message="no such case record")
        entries = st.access_log[-msg.limit:] if msg.limit > 0 else []
        return Reply(data={"entries": [e.model_dump() for e in entries], "dropped": st.access_log_dropped})

    # -- lifecycle timers ----------------------------------------------------------------
    @handles
    def on_lapsed(self, msg: ConsentLapsed) -> None:
        st = self.state
        if st.status == "open" and msg.generation == st.generation and st.consent \
                and st.consent.valid_until <= self.ctx.now():
            self._move("suspended", "consent_expired")

    @handles
    def on_step(self, msg: LifecycleStep) -> None:
        st = self.state
        if msg.generation == st.generation and st.status == msg.expected:
            self._move(advance(st.status), "")
