"""Messages to the EFA entities (``efa.record``, ``efa.patient``, ``efa.janitor``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from protocols.efa.model import Caller, Consent, DocumentIn, Relationship


class Reply(BaseModel):
    """Every EFA operation answers with this: ``ok`` or a refusal ``code`` naming the rule."""

    ok: bool = True
    code: str = ""
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


# -- efa.record (key: ecr ref = pseudonym of patient + purpose) ---------------------------
class CreateECR(BaseModel):
    caller: Caller
    patient: str
    purpose: str
    consent: Consent
    title: str = ""
    documents: list[DocumentIn] = Field(default_factory=list)  # e.g. the scanned consent


class CreatePartition(BaseModel):
    caller: Caller
    title: str = ""
    documents: list[DocumentIn] = Field(default_factory=list)
    relationships: list[Relationship] = Field(default_factory=list)


class CloseECR(BaseModel):
    caller: Caller
    reason: str
    documents: list[DocumentIn] = Field(default_factory=list)


class RegisterConsent(BaseModel):
    caller: Caller
    consent: Consent
    documents: list[DocumentIn] = Field(default_factory=list)


class ListPartitions(BaseModel):
    caller: Caller


class ListContent(BaseModel):
    caller: Caller
    partition_id: str


class ProvideData(BaseModel):
    caller: Caller
    partition_id: str
    documents: list[DocumentIn]
    relationships: list[Relationship] = Field(default_factory=list)


class RetrieveDocs(BaseModel):
    caller: Caller
    document_ids: list[str]


class GetPolicy(BaseModel):
    caller: Caller


class RecordStatusQuery(BaseModel):
    """Operator view (no personal data in the answer)."""


class AccessLogQuery(BaseModel):
    limit: int = 100


class ConsentLapsed(BaseModel):
    """Durable timer at the consent's validity date."""

    generation: int
    valid_until: float


class LifecycleStep(BaseModel):
    """Durable timer: move on from ``expected`` (suspended -> retired -> archived)."""

    generation: int
    expected: str


# -- efa.patient (key: pseudonym of the patient id): the pseudonymous patient index -------
class IndexAdd(BaseModel):
    ecr_ref: str


class IndexList(BaseModel):
    pass


# -- efa.janitor (stateless): deletes repository content of archived records --------------
class DeleteBlobs(BaseModel):
    refs: list[str]
