"""One supervised listener actor per HL7 interface: TCP (configurable framing) or file drop.

TCP: an asyncio server on the configured address. Each connection has its own
:class:`~protocols.hl7.FrameDecoder`, so a message split across reads is reassembled and
several messages in one read all come out; frames are handled one after the other (ADT
order matters) and each message is answered with one ACK (AA/AE/AR, or CA/CE/CR when
MSH-15/16 ask for enhanced mode) - after its data is durable. Broken framing and garbage
are answered with a reject ACK (best effort MSA-2); the connection stays open.

File drop: ``directory`` + ``wildcard``; a file is taken only once its mtime is older than
``file_settle_s`` (a writer still appending keeps it fresh), then renamed into
``<directory>/.processing/`` (so it is never read twice), processed, and moved to the
archive together with a ``.ack`` file holding the ACKs. Files left in ``.processing``
by a crash are processed again at start (entities drop repeated control ids).

Every frame or file is kept encrypted in the blob store (kind ``hl7-message``) with the
outcome of each message; the stream ``automat:hl7:log`` indexes them without personal
data (interface, control id, message type, ACK code, error code, blob ref).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path

from actors.hl7.keys import CASE, PATIENT, case_key, patient_key, pseudonymizer_for
from actors.hl7.messages import CaseImport, DiagnosisData, PatientImport, PersonData, ServiceData
from actors.hl7.settings import InterfaceSettings
from protocols.hl7 import (
    Ack,
    CaseCreation,
    ErrorCode,
    FrameDecoder,
    FramingError,
    Hl7Error,
    Hl7Message,
    build_ack,
    build_reject_ack,
    decide_import,
    parse_messages,
)
from supervisors.child import Supervised

log = logging.getLogger("automat.hl7.listener")

LOG_STREAM = "automat:hl7:log"
LOG_MAXLEN = 200_000
BLOB_KIND = "hl7-message"


class ImportFailure(Hl7Error):
    """Our side failed (store unreachable, timeout): AE with HL7 code 207, resend later."""

    code: str = "internal"  # type: ignore[assignment]

    @property
    def severity(self) -> str:
        return "error"

    def __str__(self) -> str:
        return f"internal: {self.reason}"


def listener_name(interface: str) -> str:
    return f"hl7.listener.{interface}"


class Hl7Listener(Supervised):
    def __init__(self, cfg, settings: dict, moped_url: str | None = None) -> None:
        self.cfg = cfg
        self.settings = InterfaceSettings.model_validate(settings)
        self.iface = self.settings.config
        self.moped_url = moped_url
        self.port: int | None = None
        self._started = False
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task] = set()
        self._server = None
        self._scan_lock: asyncio.Lock | None = None
        self.stats_counters: dict[str, int] = {"frames": 0, "messages": 0, "files": 0, "connections": 0}

    # ------------------------------------------------------------------ lifecycle
    async def _ensure_started(self) -> None:
        if self._started:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._started:
                return
            import redis.asyncio as aioredis

            from actors.runtime.blobs import BlobStore
            from actors.runtime.crypto import KeyRing
            from actors.runtime.router import Router

            self.router = Router(self.cfg)
            self.redis = aioredis.from_url(self.cfg.redis.url)
            self.blobs = BlobStore(self.cfg.blob.dir, KeyRing.from_file(self.cfg.crypto.keys_file))
            self.pseud = pseudonymizer_for(self.cfg)
            self._scan_lock = asyncio.Lock()
            if self.iface.transport == "tcp":
                tcp = self.iface.tcp
                self.framing = tcp.framing.to_framing()
                self._server = await asyncio.start_server(self._connection, tcp.bind_host, tcp.port,
                                                          limit=1 << 20)
                self.port = self._server.sockets[0].getsockname()[1]
                log.info("hl7 interface %s listening on %s:%s", self.iface.name, tcp.bind_host, self.port)
            else:
                fs = self.iface.file
                for d in (fs.directory, fs.archive_directory, self._processing_dir()):
                    Path(d).mkdir(parents=True, exist_ok=True)
                self._started = True  # scan() needs it
                await self._resume()
                if self.settings.autopoll():
                    self._spawn(self._poll_loop())
            self._started = True

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def supervised_info(self) -> dict:
        await self._ensure_started()
        return await super().supervised_info()

    async def ready(self) -> dict:
        await self._ensure_started()
        return {"name": self.iface.name, "transport": self.iface.transport, "port": self.port}

    async def stats(self) -> dict:
        return dict(self.stats_counters)

    async def on_stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._started:
            await self.router.close()
            await self.redis.aclose()

    # ------------------------------------------------------------------ TCP
    def _frame_ack(self, ack: Ack) -> bytes:
        sep = self.framing.segment_sep.decode("latin-1")
        return self.framing.encode(ack.er7.replace("\r", sep).encode(ack.charset, errors="replace"))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        allowed = self.iface.tcp.allowed_client
        if allowed and peer and peer[0] != allowed:
            log.warning("hl7 interface %s: refused connection from %s", self.iface.name, peer[0])
            writer.close()
            return
        self.stats_counters["connections"] += 1
        source = f"tcp:{peer[0]}:{peer[1]}" if peer else "tcp"
        dec = FrameDecoder(self.framing)
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    for err in dec.finish():  # half a frame: nobody left to answer, but kept
                        await self._handle_framing_error(err, source)
                    break
                for item in dec.feed(chunk):
                    if isinstance(item, FramingError):
                        acks = await self._handle_framing_error(item, source)
                    else:
                        acks = await self.process(item.payload, source)
                    for ack in acks:
                        writer.write(self._frame_ack(ack))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("hl7 interface %s: connection %s failed", self.iface.name, source)
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _handle_framing_error(self, err: FramingError, source: str) -> list[Ack]:
        ack = build_reject_ack(err.data, err, **self._ack_kw())
        await self._keep(err.data, source, [self._outcome(None, err, ack)])
        return [ack] if ack is not None else []

    # ------------------------------------------------------------------ processing
    def _ack_kw(self) -> dict:
        return {"sending_application": self.iface.ack.sending_application,
                "sending_facility": self.iface.ack.sending_facility}

    @staticmethod
    def _outcome(msg: Hl7Message | None, err: Hl7Error | None, ack: Ack | None, note: str = "") -> dict:
        return {
            "control_id": (msg.control_id if msg else (err.control_id if err else None))
            or (ack.acked_control_id if ack else "") or "",
            "type": (f"{msg.message_type}^{msg.trigger_event or ''}" if msg else ""),
            "ack": ack.code.value if ack else "",
            "ack_er7": ack.er7 if ack else "",
            "error": err.code if err else "",
            "reason": err.reason if err else note,
        }

    async def process(self, payload: bytes, source: str, segment_sep: bytes | None = None) -> list[Ack]:
        """Parse, import and keep one frame (or file): the ACKs to send, in order."""
        self.stats_counters["frames"] += 1
        received_at = time.time()
        sep = segment_sep if segment_sep is not None else (
            self.framing.segment_sep if self.iface.transport == "tcp" else None)
        results = await asyncio.to_thread(parse_messages, payload, segment_sep=sep, charset=self.iface.charset,
                                          validate=self.settings.validate_hl7apy)
        acks: list[Ack] = []
        outcomes: list[dict] = []
        for r in results:
            self.stats_counters["messages"] += 1
            if isinstance(r, Hl7Error):
                ack = build_reject_ack(payload, r, **self._ack_kw())
                if ack is None and r.code in (ErrorCode.BATCH_STRUCTURE, ErrorCode.UNEXPECTED_BATCH):
                    # a broken batch is not a message: the MSH-15 of a message inside it does
                    # not speak for the file, and a rejected file is never silently dropped
                    ack = build_reject_ack(b"", r, **self._ack_kw())
                outcomes.append(self._outcome(None, r, ack))
            elif r.message_type == "ACK":
                # HL7: an acknowledgement is never acknowledged; kept, nothing imported
                outcomes.append(self._outcome(r, None, None, note="acknowledgement received: not imported"))
                continue
            else:
                err = await self._import(r, received_at)
                ack = build_ack(r, err, **self._ack_kw())
                outcomes.append(self._outcome(r, err, ack))
            if ack is not None:
                acks.append(ack)
        await self._keep(payload, source, outcomes, received_at)
        return acks

    async def _keep(self, payload: bytes, source: str, outcomes: list[dict], received_at: float | None = None) -> str:
        at = received_at or time.time()
        record = {"interface": self.iface.name, "source": source, "received_at": at,
                  "raw": base64.b64encode(payload).decode(), "outcomes": outcomes}
        ref = await asyncio.to_thread(self.blobs.put, json.dumps(record).encode(), kind=BLOB_KIND)
        pipe = self.redis.pipeline(transaction=False)
        for o in outcomes:
            pipe.xadd(LOG_STREAM, {"ref": ref, "iface": self.iface.name, "cid": o["control_id"][:64],
                                   "type": o["type"], "ack": o["ack"], "error": str(o["error"]), "at": f"{at:.3f}"},
                      maxlen=LOG_MAXLEN, approximate=True)
        await pipe.execute()
        return ref

    async def _import(self, msg: Hl7Message, received_at: float) -> Hl7Error | None:
        d = decide_import(msg, self.iface)
        if isinstance(d, Hl7Error):
            return d
        try:
            return await self._apply(msg, d, received_at)
        except Exception as e:  # the store or a host is unreachable: AE, the sender resends
            log.warning("hl7 interface %s: import of %s failed: %s", self.iface.name, msg.control_id, e)
            return ImportFailure(reason=f"temporary failure, message not stored - please resend ({type(e).__name__})",
                                 control_id=msg.control_id)

    async def _apply(self, msg: Hl7Message, d, received_at: float) -> None:
        cfg = self.iface
        bu = d.billing.billing_unit
        ids = d.ids
        pk = patient_key(self.pseud, bu, ids.patient_number)
        p = msg.patient
        name = p.names[0] if p and p.names else None
        person = PersonData(family=name.family if name else None, given=name.given if name else None,
                            birth_date=p.birth_date if p else None, sex=p.sex if p else None)
        v = msg.visit
        ev = msg.event
        event_at = (ev.occurred_at or ev.recorded_at) if ev else None
        event_at = event_at or msg.header.sent_at
        trig = msg.trigger_event
        discharged = (v.discharge_at if v else None) or (event_at if msg.message_type == "ADT" and trig == "A03" else None)
        digest = hashlib.sha256(msg.to_er7().encode("utf-8", "replace")).hexdigest()[:16]
        mode = cfg.case_creation.value if isinstance(cfg.case_creation, CaseCreation) else str(cfg.case_creation)
        case_keys: list[str] = []
        if d.create_case:
            diagnoses = [DiagnosisData(code=x.code, text=x.text, coding_system=x.coding_system,
                                       diagnosis_type=x.diagnosis_type, primary=x.is_primary)
                         for x in d.diagnoses if x.code]
            billed = {x.code for x in diagnoses}
            others = [DiagnosisData(code=x.code, text=x.text, coding_system=x.coding_system,
                                    diagnosis_type=x.diagnosis_type, primary=x.is_primary)
                      for x in msg.diagnoses if x.code and x.code not in billed
                      and (x.action_code or "").upper() != "D"]
            services = [ServiceData(transaction_id=t.transaction_id,
                                    code=t.code.code if t.code else None, text=(t.code.text if t.code else None)
                                    or t.description, coding_system=t.code.coding_system if t.code else None,
                                    service_date=t.transaction_date,
                                    quantity=str(t.quantity) if t.quantity is not None else None,
                                    transaction_type=t.transaction_type)
                        for t in msg.transactions]
            loc = v.location if v else None
            mv = msg.movement
            for dk in d.case_keys:
                ck = case_key(self.pseud, dk)
                order = dk.split("/", 2)[2] if cfg.case_per_order_segment and dk.count("/") >= 2 else None
                await self.router.ask(CASE, ck, CaseImport(
                    interface=cfg.name, control_id=msg.control_id, digest=digest, message_type=msg.message_type, trigger=trig,
                    received_at=received_at, billing_unit=bu,
                    case_type=d.billing.case_type.value if d.billing.case_type else None,
                    case_scope=cfg.case_scope.value, case_number=ids.case_number, order_number=order,
                    patient_key=pk, patient_number=ids.patient_number,
                    create=mode in ("background", "all_background"),
                    patient_class=v.patient_class if v else None, contract_code=v.contract_code if v else None,
                    point_of_care=loc.point_of_care if loc else None, facility=loc.facility if loc else None,
                    admit_at=v.admit_at if v else None, discharge_at=v.discharge_at if v else None,
                    event_at=event_at, movement_id=mv.movement_id if mv else None,
                    movement_action=mv.action.value if mv and mv.action else None,
                    diagnoses=diagnoses, other_diagnoses=others, services=services, person=person,
                    moped_url=self.moped_url,
                ))
                case_keys.append(ck)
        await self.router.ask(PATIENT, pk, PatientImport(
            interface=cfg.name, control_id=msg.control_id, digest=digest, message_type=msg.message_type, trigger=trig,
            received_at=received_at, billing_unit=bu, patient_number=ids.patient_number,
            case_number=ids.case_number, case_keys=case_keys, mode=mode, person=person,
            discharged_at=discharged, purge_after_days=cfg.purge_after_days,
            documentation={k: v for k, v in ((cfg.store_patient_number_in, ids.patient_number),
                                             (cfg.store_case_number_in, ids.case_number)) if k and v},
        ))
        return None

    # ------------------------------------------------------------------ file drop
    def _processing_dir(self) -> Path:
        return Path(self.iface.file.directory) / ".processing"

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("hl7 interface %s: scan failed", self.iface.name)
            await asyncio.sleep(self.settings.file_poll_s)

    async def _resume(self) -> None:
        for p in sorted(self._processing_dir().iterdir()):
            if p.is_file():
                await self._process_file(p, p.name.split("_", 1)[-1])

    async def scan(self) -> dict:
        """Read every settled file of the drop directory once (``automat hl7 fetch``)."""
        await self._ensure_started()
        if self.iface.transport != "file":
            return {"files": 0, "messages": 0, "waiting": 0}
        fs = self.iface.file
        done = msgs = waiting = 0
        async with self._scan_lock:
            now = time.time()
            d = Path(fs.directory)
            names = sorted(n for n in os.listdir(d) if not n.startswith(".") and fnmatch(n, fs.wildcard))
            for n in names:
                p = d / n
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if not p.is_file():
                    continue
                if now - st.st_mtime < self.settings.file_settle_s:
                    waiting += 1  # possibly still being written
                    continue
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
                claimed = self._processing_dir() / f"{stamp}_{n}"
                try:
                    os.rename(p, claimed)  # atomic: a file is claimed exactly once
                except FileNotFoundError:
                    continue
                msgs += await self._process_file(claimed, n)
                done += 1
        return {"files": done, "messages": msgs, "waiting": waiting}

    async def _process_file(self, claimed: Path, original: str) -> int:
        data = await asyncio.to_thread(claimed.read_bytes)
        self.stats_counters["files"] += 1
        acks = await self.process(data, f"file:{original}", segment_sep=None)
        archive = Path(self.iface.file.archive_directory)
        target = archive / claimed.name
        ack_text = "".join(a.er7.replace("\r", "\n") + "\n" for a in acks)
        await asyncio.to_thread((archive / (claimed.name + ".ack")).write_text, ack_text)
        os.replace(claimed, target)
        return len(acks)
