"""The JSON bodies of the EFA HTTP API (shared by the Serve ingress and the typed client)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from protocols.efa.model import Consent, Relationship, RelType  # noqa: F401  (re-exported)


class Credential(BaseModel):
    """What the consumer system hands to openContext (authenticated by the identity provider)."""

    subject: str = Field(min_length=1, max_length=200)
    organisation: str = Field(min_length=1, max_length=200)
    role: str = Field("arzt", min_length=1, max_length=64)
    secret: str = Field(min_length=1, max_length=200)


class ContextOut(BaseModel):
    context_id: str  # the signed identity assertion; send as "Authorization: Bearer <context_id>"
    subject: str
    organisation: str
    role: str
    expires_at: float


class DocumentBody(BaseModel):
    local_id: str = Field(min_length=1, max_length=128)
    title: str = Field("", max_length=500)
    mime_type: str = Field("application/octet-stream", max_length=200)
    class_code: str = Field("", max_length=200)
    content_b64: str


class CreateECRBody(BaseModel):
    patient: str = Field(min_length=1, max_length=200)
    purpose: str = Field(min_length=1, max_length=200)
    consent: Consent
    title: str = Field("", max_length=500)
    consent_document: DocumentBody | None = None


class CreatePartitionBody(BaseModel):
    title: str = Field("", max_length=500)
    documents: list[DocumentBody] = Field(default_factory=list, max_length=100)
    relationships: list[Relationship] = Field(default_factory=list, max_length=200)


class CloseBody(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)
    documents: list[DocumentBody] = Field(default_factory=list, max_length=100)


class ConsentBody(BaseModel):
    consent: Consent
    consent_document: DocumentBody | None = None


class PatientQuery(BaseModel):
    patient: str = Field(min_length=1, max_length=200)


class ProvideBody(BaseModel):
    documents: list[DocumentBody] = Field(min_length=1, max_length=100)
    relationships: list[Relationship] = Field(default_factory=list, max_length=200)


class RetrieveBody(BaseModel):
    document_ids: list[str] = Field(min_length=1, max_length=100)


class ErrorOut(BaseModel):
    error: str  # the rule's code, e.g. "already_participant"
    message: str


# -- responses --------------------------------------------------------------------------
class CreatedOut(BaseModel):
    outcome: str = "created"  # "created" | "merged" (createECR); "created" (createPartition)
    ecr_ref: str
    partition_id: str
    document_ids: list[str] = Field(default_factory=list)


class ClosedOut(BaseModel):
    ecr_ref: str
    status: str
    partition_id: str
    document_ids: list[str] = Field(default_factory=list)


class ConsentOut(BaseModel):
    ecr_ref: str
    status: str
    participants: int
    document_ids: list[str] = Field(default_factory=list)


class PartitionOut(BaseModel):
    partition_id: str
    ecr_ref: str
    title: str
    owner: str
    owner_org: str
    created_at: float
    reason: str
    documents: int
    purpose: str
    status: str


class PartitionsOut(BaseModel):
    partitions: list[PartitionOut]


class DocumentMeta(BaseModel):
    id: str
    partition_id: str
    title: str
    mime_type: str
    class_code: str
    size: int
    sha256: str
    author: str
    author_org: str
    created_at: float
    status: str
    relationships: list[Relationship]


class ContentOut(BaseModel):
    partition: PartitionOut
    documents: list[DocumentMeta]


class ProvidedOut(BaseModel):
    partition_id: str
    document_ids: dict[str, str]  # local id -> document id


class RetrievedDocument(DocumentMeta):
    content_b64: str


class RetrievedOut(BaseModel):
    documents: list[RetrievedDocument]


class PolicyOut(BaseModel):
    ecr_ref: str
    status: str
    rights: list[str]
