"""The pseudonymous patient index ``efa.patient`` (key: pseudonym of the patient id; the
value: the ecr refs of that patient's records) and the repository janitor ``efa.janitor``."""

from __future__ import annotations

from pydantic import BaseModel, Field

from actors.runtime.entity import Entity, handles
from protocols.efa.messages import DeleteBlobs, IndexAdd, IndexList, Reply


class PatientIndexState(BaseModel):
    records: list[str] = Field(default_factory=list)


class PatientIndex(Entity[PatientIndexState]):
    kind = "efa.patient"
    State = PatientIndexState
    personal_data = True  # links the records of one person

    @handles
    def on_add(self, msg: IndexAdd) -> Reply:
        if msg.ecr_ref not in self.state.records:
            self.state.records.append(msg.ecr_ref)
        return Reply(data={"records": list(self.state.records)})

    @handles(readonly=True)
    def on_list(self, msg: IndexList) -> Reply:
        return Reply(data={"records": list(self.state.records)})


class JanitorState(BaseModel):
    pass


class Janitor(Entity[JanitorState]):
    """Deletes repository blobs of archived records (idempotent; stateless kind)."""

    kind = "efa.janitor"
    State = JanitorState

    @handles
    def on_delete(self, msg: DeleteBlobs) -> Reply:
        n = 0
        for ref in msg.refs:
            try:
                n += bool(self.ctx.ports.blobs.delete(ref))
            except ValueError:
                pass
        return Reply(data={"deleted": n})
