"""Typed Python client of the EFA HTTP API (the consumer / Teilnehmersystem).

```python
async with EfaClient("http://127.0.0.1:18000/efa") as efa:
    await efa.open_context(Credential(subject=..., organisation=..., role="arzt", secret=...))
    rec = await efa.create_ecr(patient, "I21.0", Consent(participants=[...], valid_until=..., may_merge=True))
    out = await efa.provide(rec.partition_id, [efa.document("d1", b"...", title="Arztbrief")])
    docs = await efa.retrieve(list(out.document_ids.values()))
```
Every refusal raises :class:`EfaError` (``status``, ``code`` naming the rule, ``message``).
"""

from __future__ import annotations

import base64

import httpx

from protocols.efa import api
from protocols.efa.model import Consent, Relationship


class EfaError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class EfaClient:
    def __init__(self, base_url: str, *, context_id: str | None = None, timeout_s: float = 60.0,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.context_id = context_id
        self._own = client is None
        self._http = client or httpx.AsyncClient(timeout=timeout_s)

    async def __aenter__(self) -> "EfaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    # -- plumbing ---------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body=None, *, auth: bool = True):
        headers = {}
        if auth and self.context_id:
            headers["Authorization"] = f"Bearer {self.context_id}"
        payload = body.model_dump(mode="json") if hasattr(body, "model_dump") else body
        r = await self._http.request(method, self.base_url + path, json=payload, headers=headers)
        if r.status_code >= 400:
            try:
                j = r.json()
                code, msg = j.get("error", "error"), j.get("message", r.text)
            except ValueError:
                code, msg = "error", r.text[:500]
            raise EfaError(r.status_code, code, msg)
        return r.json() if r.content else None

    @staticmethod
    def document(local_id: str, data: bytes, *, title: str = "", mime_type: str = "application/octet-stream",
                 class_code: str = "") -> api.DocumentBody:
        return api.DocumentBody(local_id=local_id, title=title, mime_type=mime_type, class_code=class_code,
                                content_b64=base64.b64encode(data).decode())

    # -- context -----------------------------------------------------------------------------
    async def open_context(self, cred: api.Credential) -> api.ContextOut:
        out = api.ContextOut(**await self._call("POST", "/context", cred, auth=False))
        self.context_id = out.context_id
        return out

    async def close_context(self) -> None:
        await self._call("DELETE", "/context")

    # -- operations ---------------------------------------------------------------------------
    async def create_ecr(self, patient: str, purpose: str, consent: Consent, *, title: str = "",
                         consent_document: api.DocumentBody | None = None) -> api.CreatedOut:
        body = api.CreateECRBody(patient=patient, purpose=purpose, consent=consent, title=title,
                                 consent_document=consent_document)
        return api.CreatedOut(**await self._call("POST", "/records", body))

    async def create_partition(self, ecr_ref: str, *, title: str = "", documents: list[api.DocumentBody] = (),
                               relationships: list[Relationship] = ()) -> api.CreatedOut:
        body = api.CreatePartitionBody(title=title, documents=list(documents), relationships=list(relationships))
        return api.CreatedOut(**await self._call("POST", f"/records/{ecr_ref}/partitions", body))

    async def close_ecr(self, ecr_ref: str, reason: str, documents: list[api.DocumentBody] = ()) -> api.ClosedOut:
        body = api.CloseBody(reason=reason, documents=list(documents))
        return api.ClosedOut(**await self._call("POST", f"/records/{ecr_ref}/close", body))

    async def register_consent(self, ecr_ref: str, consent: Consent,
                               consent_document: api.DocumentBody | None = None) -> api.ConsentOut:
        body = api.ConsentBody(consent=consent, consent_document=consent_document)
        return api.ConsentOut(**await self._call("POST", f"/records/{ecr_ref}/consent", body))

    async def policy(self, ecr_ref: str) -> api.PolicyOut:
        return api.PolicyOut(**await self._call("GET", f"/records/{ecr_ref}/policy"))

    async def list_partitions(self, patient: str) -> list[api.PartitionOut]:
        out = api.PartitionsOut(**await self._call("POST", "/partitions/query", api.PatientQuery(patient=patient)))
        return out.partitions

    async def list_content(self, partition_id: str) -> api.ContentOut:
        return api.ContentOut(**await self._call("GET", f"/partitions/{partition_id}/documents"))

    async def provide(self, partition_id: str, documents: list[api.DocumentBody],
                      relationships: list[Relationship] = ()) -> api.ProvidedOut:
        body = api.ProvideBody(documents=documents, relationships=list(relationships))
        return api.ProvidedOut(**await self._call("POST", f"/partitions/{partition_id}/documents", body))

    async def retrieve(self, document_ids: list[str]) -> list[api.RetrievedDocument]:
        out = api.RetrievedOut(**await self._call("POST", "/documents/retrieve",
                                                  api.RetrieveBody(document_ids=document_ids)))
        return out.documents

    @staticmethod
    def content(doc: api.RetrievedDocument) -> bytes:
        return base64.b64decode(doc.content_b64)


def enrol_credential(cfg, subject: str, organisation: str, role: str = "arzt") -> api.Credential:
    """A credential for ``subject`` (operators / tests / demo: needs the IdP's key file)."""
    from actors.efa.identity import IdentityProvider, load_or_create_signing_key, signing_key_path
    from actors.efa.settings import EfaSettings

    s = EfaSettings()
    idp = IdentityProvider(load_or_create_signing_key(signing_key_path(cfg)), s.issuer, s.token_ttl_s)
    return api.Credential(subject=subject, organisation=organisation, role=role,
                          secret=idp.enrol_secret(subject, organisation, role))
