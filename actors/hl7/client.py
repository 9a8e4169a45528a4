"""A small MLLP (or custom framing) client: tests, ``automat bench hl7``, the demo."""

from __future__ import annotations

import asyncio

from protocols.hl7 import MLLP, FrameDecoder, Framing, FramingError


class Hl7Client:
    def __init__(self, host: str, port: int, framing: Framing = MLLP, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.framing, self.timeout = host, port, framing, timeout_s
        self.decoder = FrameDecoder(framing)
        self.pending: list[bytes] = []

    async def __aenter__(self) -> "Hl7Client":
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except Exception:
            pass

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, message: bytes | str) -> None:
        if isinstance(message, str):
            message = message.encode()
        await self.send_raw(self.framing.encode(message))

    async def recv(self, timeout_s: float | None = None) -> bytes:
        """The next framed answer (payload)."""
        while not self.pending:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout_s or self.timeout)
            if not chunk:
                raise ConnectionError("connection closed by the listener")
            for item in self.decoder.feed(chunk):
                if isinstance(item, FramingError):
                    raise ConnectionError(f"bad framing from the listener: {item}")
                self.pending.append(item.payload)
        return self.pending.pop(0)

    async def request(self, message: bytes | str) -> bytes:
        await self.send(message)
        return await self.recv()


async def send_messages(host: str, port: int, messages: list[bytes | str], framing: Framing = MLLP) -> list[bytes]:
    async with Hl7Client(host, port, framing) as c:
        return [await c.request(m) for m in messages]


def msa(ack: bytes) -> list[str]:
    """MSA fields of an ACK (``[MSA, code, control id, text?]``)."""
    text = ack.decode("latin-1")
    for seg in text.replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            return seg.split(seg[3])
    return []


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (tests, bench)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
