"""EFA data model: consent, partitions, documents, relationships, the record state."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

RelType = Literal["RPLC", "APND", "XFRM", "XFRM_RPLC", "signs"]
RecordStatus = Literal["none", "open", "suspended", "retired", "archived"]
DocStatus = Literal["approved", "deprecated"]


class Caller(BaseModel):
    """The verified identity of a call (from the signed assertion)."""

    sub: str
    org: str
    role: str = ""
    jti: str = ""

    def ids(self) -> tuple[str, str]:
        return (self.sub, self.org)


class Consent(BaseModel):
    """The patient's consent: the access rule (patient, purpose) -> (participants, validity)."""

    participants: list[str] = Field(default_factory=list, max_length=500)  # person or organisation ids
    valid_until: float  # epoch seconds
    may_extend: bool = False  # others than the named participants may be added later (merge)
    may_merge: bool = False  # this consent authorises merging into an existing record
    revoked: bool = False


class Relationship(BaseModel):
    """``source`` is the submission-local id (or index) of a new document; ``target`` an
    existing document id of the same record."""

    source: str = Field(min_length=1, max_length=128)
    target: str = Field(min_length=1, max_length=200)
    type: RelType


class DocumentIn(BaseModel):
    """A document as registered (bytes already in the repository under ``blob_ref``)."""

    local_id: str = Field(min_length=1, max_length=128)
    title: str = Field("", max_length=500)
    mime_type: str = Field("application/octet-stream", max_length=200)
    class_code: str = Field("", max_length=200)
    size: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)
    blob_ref: str


class Document(BaseModel):
    id: str
    partition_id: str
    title: str = ""
    mime_type: str = ""
    class_code: str = ""
    size: int = 0
    sha256: str = ""
    blob_ref: str = ""
    author: str = ""
    author_org: str = ""
    created_at: float = 0.0
    status: DocStatus = "approved"
    relationships: list[Relationship] = Field(default_factory=list)  # outgoing (source = this id)


class Partition(BaseModel):
    id: str
    title: str = ""
    owner: str = ""
    owner_org: str = ""
    created_at: float = 0.0
    reason: str = ""  # initial | merge | added
    documents: list[str] = Field(default_factory=list)


class AccessEntry(BaseModel):
    at: float
    sub: str
    org: str
    op: str
    outcome: str  # "ok" or the refusal code
    detail: str = ""


class RecordState(BaseModel):
    status: RecordStatus = "none"
    ecr_ref: str = ""
    patient: str = ""  # personal data: the state of efa.record is encrypted at rest
    purpose: str = ""
    consent: Consent | None = None
    participants: list[str] = Field(default_factory=list)
    partitions: dict[str, Partition] = Field(default_factory=dict)
    documents: dict[str, Document] = Field(default_factory=dict)
    next_partition: int = 1
    next_document: int = 1
    created_at: float = 0.0
    status_since: float = 0.0
    close_reason: str = ""
    generation: int = 0
    access_log: list[AccessEntry] = Field(default_factory=list)
    access_log_dropped: int = 0
