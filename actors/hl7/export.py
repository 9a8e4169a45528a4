"""FT1 export: billed services back to the KIS as DFT^P03, over TCP or as a file.

``hl7.export`` is a stateless worker kind keyed by case (so the exports of one case go
out one after the other, in order). TCP: connect, send the framed message, wait for the
ACK (MSA-1 ``AA``/``CA`` is success; ``AE``/``AR``/``CE``/``CR`` or no answer raises, so
the runtime retries and finally dead-letters it - never silently dropped). File: the
message is written to ``<directory>/DFT_P03_<control id>.hl7`` atomically (temp file +
rename), so the KIS never reads half a file.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel

from actors.hl7.keys import EXPORT
from actors.hl7.messages import DftSent, ExportTarget, SendDft
from actors.runtime.entity import Entity, handles
from protocols.hl7 import FrameDecoder, FramingError, build_dft_p03


class ExportError(Exception):
    pass


class NoState(BaseModel):
    pass


def write_atomic(directory: str, name: str, data: bytes) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        final = d / name
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return final


async def send_framed(target: ExportTarget, payload: bytes) -> bytes:
    """Send one message over TCP with the target's framing and return the ACK payload."""
    framing = target.framing.to_framing()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), target.timeout_s)
    try:
        writer.write(framing.encode(payload))
        await writer.drain()
        dec = FrameDecoder(framing)
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), target.timeout_s)
            if not chunk:
                raise ExportError("the KIS closed the connection without an ACK")
            for item in dec.feed(chunk):
                if isinstance(item, FramingError):
                    raise ExportError(f"bad ACK framing: {item}")
                return item.payload
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:
            pass


def ack_code_of(ack: bytes) -> str | None:
    for seg in ack.replace(b"\n", b"\r").split(b"\r"):
        if seg.startswith(b"MSA"):
            parts = seg.decode("latin-1").split(seg[3:4].decode("latin-1") or "|")
            return parts[1] if len(parts) > 1 else None
    return None


async def export_dft(msg: SendDft) -> DftSent:
    out = build_dft_p03(msg.case, msg.services, control_id=msg.control_id)
    data = out.to_bytes()
    t = msg.target
    if t.transport == "file":
        if not t.directory:
            raise ExportError("file export needs a directory")
        path = await asyncio.to_thread(write_atomic, t.directory, f"DFT_P03_{msg.control_id}.hl7", data)
        return DftSent(control_id=msg.control_id, where=str(path))
    if t.port is None:
        raise ExportError("tcp export needs a port")
    ack = await send_framed(t, data)
    code = ack_code_of(ack)
    if code not in ("AA", "CA"):
        raise ExportError(f"the KIS answered {code or 'no MSA'} to DFT^P03 {msg.control_id}")
    return DftSent(control_id=msg.control_id, where=f"tcp://{t.host}:{t.port}", ack_code=code)


class ExportEntity(Entity[NoState]):
    kind = EXPORT
    State = NoState

    @handles
    async def on_send(self, msg: SendDft) -> DftSent:
        return await export_dft(msg)
