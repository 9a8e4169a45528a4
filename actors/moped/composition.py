"""The Composition entity ``moped.composition``: one per inpatient stay (key = case UUID).

Every accepted operation writes the new Composition version and its Provenance into the
entity state in one commit (with the ``composition.version`` event in the outbox); a
refused one changes nothing. The state holds personal data: stored AES-GCM encrypted.
"""

from __future__ import annotations

from actors.runtime.entity import Entity, handles
from protocols.events import Event
from protocols.moped.case import apply_operation, build_composition
from protocols.moped.messages import (
    CaseState,
    OpResult,
    Operate,
    ReadComposition,
    ReadDocument,
    ReadHistory,
    ReadProvenance,
    ReadResult,
)

KIND = "moped.composition"
TOPIC = "moped.composition"
DEFAULT_CUSTODIAN = "Organization/moped-server"


class CompositionEntity(Entity[CaseState]):
    kind = KIND
    State = CaseState
    personal_data = True

    def _custodian(self) -> str:
        return getattr(self.ctx.ports, "custodian", None) or DEFAULT_CUSTODIAN

    @handles
    def on_operate(self, msg: Operate) -> OpResult:
        new, result = apply_operation(self.state, msg, self.key, self._custodian())
        if new is not None:
            self.state = new
            self.ctx.emit(Event(
                topic=TOPIC, type="composition.version", key=self.key,
                # control information only: no personal data in events
                data={"case": self.key, "vid": result.vid, "activity": msg.op, "workflow": new.workflow,
                      "composition": f"Composition/{self.key}/_history/{result.vid}",
                      "provenance": f"Provenance/{self.key}-{result.vid}"},
            ))
        return result

    @handles(readonly=True)
    def on_read(self, msg: ReadComposition) -> ReadResult:
        st = self.state
        if not st.versions:
            return ReadResult(found=False)
        if msg.vid is None:
            return ReadResult(found=True, current_vid=st.vid, items=[build_composition(st, st.vid, self._custodian())])
        if not 1 <= msg.vid <= st.vid:
            return ReadResult(found=True, current_vid=st.vid, items=[])
        return ReadResult(found=True, current_vid=st.vid, items=[build_composition(st, msg.vid, self._custodian())])

    @handles(readonly=True)
    def on_history(self, msg: ReadHistory) -> ReadResult:
        st = self.state
        return ReadResult(found=bool(st.versions), current_vid=st.vid,
                          items=[{"vid": v.vid, "activity": v.activity, "recorded": v.recorded,
                                  "composition": build_composition(st, v.vid, self._custodian()),
                                  "provenance": v.provenance}
                                 for v in reversed(st.versions)])

    @handles(readonly=True)
    def on_provenance(self, msg: ReadProvenance) -> ReadResult:
        st = self.state
        items = [v.provenance for v in reversed(st.versions) if msg.vid is None or v.vid == msg.vid]
        return ReadResult(found=bool(st.versions), current_vid=st.vid, items=items)

    @handles(readonly=True)
    def on_document(self, msg: ReadDocument) -> ReadResult:
        st = self.state
        if not st.versions:
            return ReadResult(found=False)
        return ReadResult(found=True, current_vid=st.vid,
                          items=[build_composition(st, st.vid, self._custodian())] + list(st.resources.values()))
