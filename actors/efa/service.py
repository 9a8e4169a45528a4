"""The EFA provider's operations behind the HTTP API (resource manager, registry and
repository front): verifies the context, stores document bytes in the encrypted blob
store, asks the record entities through the router. Raises ``Refusal`` on every refusal;
``nothing stored half``: blobs written for a refused or failed submission are removed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections import defaultdict

from actors.efa.identity import ContextManager, IdentityProvider, load_or_create_signing_key, signing_key_path
from actors.efa.settings import EfaSettings
from actors.runtime.router import EntityError, Router
from protocols.efa import api
from protocols.efa.messages import (
    CloseECR,
    CreateECR,
    CreatePartition,
    GetPolicy,
    IndexAdd,
    IndexList,
    ListContent,
    ListPartitions,
    ProvideData,
    RegisterConsent,
    Reply,
    RetrieveDocs,
)
from protocols.efa.model import Caller, DocumentIn
from protocols.efa.rules import Refusal, partition_record

RECORD = "efa.record"
PATIENT = "efa.patient"
BLOB_KIND = "efa"


def record_key(pseudonymizer, patient: str, purpose: str) -> str:
    return pseudonymizer.pseudonym(f"{patient}\x1f{purpose}", "efa.record")


def patient_key(pseudonymizer, patient: str) -> str:
    return pseudonymizer.pseudonym(patient, "efa.patient")


def _check_ref(ecr: str, what: str = "unknown_record") -> str:
    if len(ecr) != 32 or any(ch not in "0123456789abcdef" for ch in ecr):
        raise Refusal(what, f"no such {what.split('_')[1]} {ecr[:80]!r}")
    return ecr


class EfaService:
    def __init__(self, cfg, *, router: Router | None = None, settings: EfaSettings | None = None,
                 clock=time.time) -> None:
        import redis.asyncio as aioredis

        from actors.runtime.blobs import BlobStore
        from actors.runtime.crypto import KeyRing, Pseudonymizer

        self.cfg = cfg
        self.settings = settings or EfaSettings()
        self.router = router or Router(cfg)
        self.clock = clock
        self.redis = aioredis.from_url(cfg.redis.url)
        self.pseudonymizer = Pseudonymizer.from_file(cfg.crypto.pseudonym_key_file)
        self.blobs = BlobStore(cfg.blob.dir, KeyRing.from_file(cfg.crypto.keys_file))
        self.idp = IdentityProvider(load_or_create_signing_key(signing_key_path(cfg)), self.settings.issuer,
                                    self.settings.token_ttl_s)
        self.contexts = ContextManager(self.idp, self.redis)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- context ---------------------------------------------------------------------------
    def open_context(self, cred: api.Credential) -> api.ContextOut:
        return self.contexts.open_context(cred, self.clock())

    async def caller(self, token: str | None) -> Caller:
        return await self.contexts.verify(token, self.clock())

    async def close_context(self, token: str) -> None:
        await self.contexts.close_context(token, self.clock())

    # -- plumbing ------------------------------------------------------------------------
    async def _ask(self, kind: str, key: str, msg) -> Reply:
        try:
            r = await self.router.ask(kind, key, msg)
        except EntityError as e:
            raise Refusal("unavailable", f"record service unavailable: {e.failure.code}") from None
        if not r.ok:
            raise Refusal(r.code, r.message)
        return r

    def _decode(self, docs: list[api.DocumentBody]) -> list[tuple[api.DocumentBody, bytes]]:
        out, total = [], 0
        limit = self.settings.max_document_bytes
        for d in docs:
            if len(d.content_b64) > (limit + 2) // 3 * 4 + 8:  # cheap pre-check before decoding
                raise Refusal("document_too_large", f"document {d.local_id!r} exceeds {limit} bytes")
            try:
                data = base64.b64decode(d.content_b64, validate=True)
            except (binascii.Error, ValueError):
                raise Refusal("invalid_input", f"document {d.local_id!r}: content_b64 is not valid base64") from None
            if len(data) > limit:
                raise Refusal("document_too_large", f"document {d.local_id!r} has {len(data)} bytes; limit {limit}")
            total += len(data)
            if total > self.settings.max_submission_bytes:
                raise Refusal("submission_too_large", f"submission exceeds {self.settings.max_submission_bytes} bytes")
            out.append((d, data))
        return out

    async def _store(self, docs: list[api.DocumentBody]) -> list[DocumentIn]:
        """Repository: encrypt and store the bytes; registry entries to hand to the record."""
        decoded = self._decode(docs)
        seen = set()
        for d, _ in decoded:
            if d.local_id in seen:
                raise Refusal("duplicate_local_id", f"document local id {d.local_id!r} given twice")
            seen.add(d.local_id)
        stored: list[DocumentIn] = []
        try:
            for d, data in decoded:
                ref = await asyncio.to_thread(self.blobs.put, data, kind=BLOB_KIND)
                stored.append(DocumentIn(local_id=d.local_id, title=d.title, mime_type=d.mime_type,
                                         class_code=d.class_code, size=len(data),
                                         sha256=hashlib.sha256(data).hexdigest(), blob_ref=ref))
        except BaseException:
            await self._discard(stored)
            raise
        return stored

    async def _discard(self, stored: list[DocumentIn]) -> None:
        for s in stored:
            try:
                await asyncio.to_thread(self.blobs.delete, s.blob_ref)
            except Exception:
                pass

    async def _submit(self, docs: list[api.DocumentBody], key: str, make_msg) -> Reply:
        stored = await self._store(docs)
        try:
            return await self._ask(RECORD, key, make_msg(stored))
        except BaseException:
            await self._discard(stored)
            raise

    # -- operations ----------------------------------------------------------------------
    async def create_ecr(self, caller: Caller, body: api.CreateECRBody) -> api.CreatedOut:
        key = record_key(self.pseudonymizer, body.patient, body.purpose)
        # index first: listPartitions finds the record as soon as it exists (a stale entry
        # for a refused creation is harmless: the record answers unknown_record)
        await self._ask(PATIENT, patient_key(self.pseudonymizer, body.patient), IndexAdd(ecr_ref=key))
        docs = [body.consent_document] if body.consent_document else []
        r = await self._submit(docs, key, lambda stored: CreateECR(
            caller=caller, patient=body.patient, purpose=body.purpose, consent=body.consent, title=body.title,
            documents=stored))
        return api.CreatedOut(**r.data)

    async def create_partition(self, caller: Caller, ecr: str, body: api.CreatePartitionBody) -> api.CreatedOut:
        key = _check_ref(ecr)
        r = await self._submit(body.documents, key, lambda stored: CreatePartition(
            caller=caller, title=body.title, documents=stored, relationships=body.relationships))
        return api.CreatedOut(outcome="created", **r.data)

    async def close_ecr(self, caller: Caller, ecr: str, body: api.CloseBody) -> api.ClosedOut:
        key = _check_ref(ecr)
        r = await self._submit(body.documents, key, lambda stored: CloseECR(
            caller=caller, reason=body.reason, documents=stored))
        return api.ClosedOut(**r.data)

    async def register_consent(self, caller: Caller, ecr: str, body: api.ConsentBody) -> api.ConsentOut:
        key = _check_ref(ecr)
        docs = [body.consent_document] if body.consent_document else []
        r = await self._submit(docs, key, lambda stored: RegisterConsent(
            caller=caller, consent=body.consent, documents=stored))
        return api.ConsentOut(**r.data)

    async def list_partitions(self, caller: Caller, patient: str) -> api.PartitionsOut:
        idx = await self._ask(PATIENT, patient_key(self.pseudonymizer, patient), IndexList())
        keys = idx.data["records"]
        replies = await asyncio.gather(*[self.router.ask(RECORD, k, ListPartitions(caller=caller),
                                                         raise_failure=False) for k in keys])
        parts = []
        for r in replies:
            if isinstance(r, Reply) and r.ok:
                parts.extend(r.data["partitions"])
        return api.PartitionsOut(partitions=parts)

    async def list_content(self, caller: Caller, partition_id: str) -> api.ContentOut:
        key = _check_ref(partition_record(partition_id), "unknown_partition")
        r = await self._ask(RECORD, key, ListContent(caller=caller, partition_id=partition_id))
        return api.ContentOut(**r.data)

    async def provide(self, caller: Caller, partition_id: str, body: api.ProvideBody) -> api.ProvidedOut:
        key = _check_ref(partition_record(partition_id), "unknown_partition")
        r = await self._submit(body.documents, key, lambda stored: ProvideData(
            caller=caller, partition_id=partition_id, documents=stored, relationships=body.relationships))
        return api.ProvidedOut(**r.data)

    async def retrieve(self, caller: Caller, document_ids: list[str]) -> api.RetrievedOut:
        by_record: dict[str, list[str]] = defaultdict(list)
        for did in document_ids:
            by_record[_check_ref(partition_record(did), "unknown_document")].append(did)
        replies = await asyncio.gather(*[self._ask(RECORD, k, RetrieveDocs(caller=caller, document_ids=ids))
                                         for k, ids in by_record.items()], return_exceptions=True)
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        metas = {d["id"]: d for r in replies for d in r.data["documents"]}
        out = []
        for did in document_ids:
            m = metas[did]
            data = await asyncio.to_thread(self.blobs.get, m.pop("blob_ref"))
            out.append(api.RetrievedDocument(**m, content_b64=base64.b64encode(data).decode()))
        return api.RetrievedOut(documents=out)

    async def policy(self, caller: Caller, ecr: str) -> api.PolicyOut:
        r = await self._ask(RECORD, _check_ref(ecr), GetPolicy(caller=caller))
        return api.PolicyOut(**r.data)
