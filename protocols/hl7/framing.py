"""Configurable message framing for HL7 over TCP (MLLP and DURIA-style custom framing).

MLLP (HL7 v2 Minimal Lower Layer Protocol) wraps every message as
``<VT=0x0B> message <FS=0x1C><CR=0x0D>``. DURIA lets the operator choose each of these
bytes ("Start-Zeichen", "Ende-Zeichen", "Zeichen hinter Ende-Zeichen" - the latter may be
empty - and the segment separator), which :class:`Framing` models.

:class:`FrameDecoder` is a pure, incremental state machine in the style of python-hl7's
MLLP reader: feed it whatever ``recv()`` returned and it hands back complete
:class:`Frame` objects and :class:`FramingError` objects, in stream order. It never
raises on input and it never blocks; it keeps at most ``max_frame_bytes`` buffered.

Behaviour in detail:

* a message split across reads is reassembled; several messages in one read all come out;
* bytes outside a frame are reported once as ``garbage`` (whitespace between frames - a
  stray CR/LF after the trailer - is ignored unless ``report_whitespace=True``);
* data terminated by the end char without a start char is ``missing_start`` (its bytes
  are kept in ``data`` so the caller can still NAK it by control id);
* a start char inside an open frame means the open frame lost its end char:
  ``missing_end`` for the old one, and the new frame starts there (resynchronisation);
* a frame longer than ``max_frame_bytes`` is ``frame_too_large``; its remaining bytes are
  skipped up to its end char (or the next start char);
* a start char immediately followed by the end char is ``empty_frame``;
* a missing "after end" char is tolerated (the frame is complete at the end char);
* :meth:`FrameDecoder.finish` reports a pending half frame when the peer goes away.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocols.hl7.errors import ErrorCode, Hl7Error

#: how many bytes of a broken frame an error keeps (enough for the MSH segment)
ERROR_DATA_LIMIT = 4096
_WS = b" \t\r\n"


class Framing(BaseModel):
    """Framing characters. ``start`` and ``after_end`` may be empty (``b""``); ``end`` is
    one byte. Defaults are MLLP."""

    model_config = ConfigDict(frozen=True)

    start: bytes = b"\x0b"
    end: bytes = b"\x1c"
    after_end: bytes = b"\r"
    segment_sep: bytes = b"\r"
    max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=64)
    report_whitespace: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Framing":
        if len(self.start) > 1:
            raise ValueError("start must be one byte or empty")
        if len(self.end) != 1:
            raise ValueError("end must be exactly one byte")
        if len(self.after_end) > 1:
            raise ValueError("after_end must be one byte or empty")
        if len(self.segment_sep) != 1:
            raise ValueError("segment_sep must be exactly one byte")
        if self.start and self.start == self.end:
            raise ValueError("start and end must differ")
        if self.end == self.segment_sep:
            raise ValueError("end must differ from the segment separator")
        if self.start and self.start == self.segment_sep:
            raise ValueError("start must differ from the segment separator")
        if self.after_end and self.after_end in (self.start, self.end):
            raise ValueError("after_end must differ from start and end")
        return self

    def encode(self, message: bytes) -> bytes:
        """Wrap one message: ``start + message + end + after_end``. The message gets a
        trailing segment separator if it lacks one (MLLP: the last segment ends with CR).
        Raises :class:`FrameEncodeError` if the message contains a framing byte - that
        is a bug of the caller (our own outgoing data), not bad input."""
        for name, b in (("start", self.start), ("end", self.end)):
            if b and b in message:
                raise FrameEncodeError(f"message contains the {name} byte {b!r}; it cannot be framed")
        if not message.endswith(self.segment_sep):
            message = message + self.segment_sep
        return self.start + message + self.end + self.after_end


#: the standard MLLP framing
MLLP = Framing()


class FrameEncodeError(ValueError):
    code = "payload_contains_framing_byte"


def encode(message: bytes, framing: Framing = MLLP) -> bytes:
    """Module-level shortcut for :meth:`Framing.encode`."""
    return framing.encode(message)


class Frame(BaseModel):
    """One complete message as received (bytes between start and end char)."""

    model_config = ConfigDict(frozen=True)

    payload: bytes
    offset: int  # stream offset of the first payload byte


class FramingError(Hl7Error):
    """A framing problem. ``data`` holds (up to 4 KiB of) the affected bytes,
    ``offset`` where they began in the stream."""

    data: bytes = Field(default=b"", repr=False)  # raw message bytes: personal data
    offset: int = 0


class _State(Enum):
    HUNT = 0  # between frames, looking for the start char
    IN_FRAME = 1
    AFTER_END = 2  # just saw the end char; an after_end char may follow
    SKIP = 3  # dropping the rest of an oversized frame


class FrameDecoder:
    """Incremental decoder. ``feed()`` returns what became complete with that chunk."""

    def __init__(self, framing: Framing = MLLP) -> None:
        self.framing = framing
        self._state = _State.HUNT
        self._buf = bytearray()  # current frame payload
        self._frame_off = 0
        self._garbage = bytearray()  # bytes outside frames (kept up to ERROR_DATA_LIMIT)
        self._garbage_len = 0
        self._garbage_off = 0
        self._pos = 0  # total bytes consumed so far

    # ----------------------------------------------------------------- public API

    def feed(self, data: bytes) -> list[Frame | FramingError]:
        out: list[Frame | FramingError] = []
        data = bytes(data)
        base = self._pos
        self._pos += len(data)
        f = self.framing
        start = f.start
        end = f.end
        i = 0
        n = len(data)
        while i < n:
            st = self._state
            if st is _State.AFTER_END:
                self._state = _State.HUNT
                if f.after_end and data[i : i + 1] == f.after_end:
                    i += 1
                continue
            if st is _State.HUNT:
                if not start:
                    self._state = _State.IN_FRAME
                    self._frame_off = base + i
                    self._buf.clear()
                    continue
                s = data.find(start, i)
                e = data.find(end, i)
                if e != -1 and (s == -1 or e < s):
                    # data ended by the end char but never started
                    self._add_garbage(data[i:e], base + i)
                    out.append(self._missing_start(base + e))
                    i = e + 1
                    self._state = _State.AFTER_END
                    continue
                if s == -1:
                    self._add_garbage(data[i:], base + i)
                    self._cap_garbage(out)
                    i = n
                    break
                self._add_garbage(data[i:s], base + i)
                self._flush_garbage(out)
                self._state = _State.IN_FRAME
                self._buf.clear()
                self._frame_off = base + s + 1
                i = s + 1
                continue
            if st is _State.IN_FRAME:
                e = data.find(end, i)
                s = data.find(start, i) if start else -1
                if s != -1 and (e == -1 or s < e):
                    # a new frame starts before this one ended
                    self._append(data[i:s], out)
                    if self._state is _State.IN_FRAME:  # (not already reported as too large)
                        out.append(self._error(
                            ErrorCode.MISSING_END,
                            "a new start character arrived before the end character of this frame",
                            bytes(self._buf), self._frame_off))
                    self._state = _State.IN_FRAME
                    self._buf.clear()
                    self._frame_off = base + s + 1
                    i = s + 1
                    continue
                if e == -1:
                    self._append(data[i:], out)
                    i = n
                    break
                ok = self._append(data[i:e], out)
                if ok:
                    out.append(self._complete())
                self._state = _State.AFTER_END
                i = e + 1
                continue
            # SKIP: drop the rest of an oversized frame
            e = data.find(end, i)
            s = data.find(start, i) if start else -1
            if s != -1 and (e == -1 or s < e):
                self._state = _State.IN_FRAME
                self._buf.clear()
                self._frame_off = base + s + 1
                i = s + 1
                continue
            if e == -1:
                i = n
                break
            self._state = _State.AFTER_END
            i = e + 1
        return out

    def finish(self) -> list[FramingError]:
        """The stream ended (peer closed). Reports a half-received frame or trailing
        garbage and resets the decoder."""
        out: list[FramingError] = []
        if self._state is _State.IN_FRAME:
            if self.framing.start or self._buf.strip(_WS):
                out.append(self._error(
                    ErrorCode.MISSING_END,
                    "the stream ended before the end character of this frame",
                    bytes(self._buf), self._frame_off))
        tmp: list[Frame | FramingError] = []
        self._flush_garbage(tmp)
        out.extend(e for e in tmp if isinstance(e, FramingError))
        self._state = _State.HUNT
        self._buf.clear()
        return out

    @property
    def buffered(self) -> int:
        """Bytes currently held for an unfinished frame."""
        return len(self._buf)

    # ----------------------------------------------------------------- internals

    def _append(self, chunk: bytes, out: list) -> bool:
        """Add payload bytes; on overflow report once and switch to SKIP."""
        if self._state is _State.SKIP:
            return False
        limit = self.framing.max_frame_bytes
        if len(self._buf) + len(chunk) > limit:
            head = bytes(self._buf[:ERROR_DATA_LIMIT])
            if len(head) < ERROR_DATA_LIMIT:
                head += chunk[: ERROR_DATA_LIMIT - len(head)]
            out.append(self._error(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame exceeds the limit of {limit} bytes; it is skipped",
                head, self._frame_off))
            self._buf.clear()
            self._state = _State.SKIP
            return False
        self._buf += chunk
        return True

    def _complete(self) -> Frame | FramingError:
        payload = bytes(self._buf)
        self._buf.clear()
        if not payload.strip(_WS):
            return self._error(ErrorCode.EMPTY_FRAME, "frame holds no message", payload, self._frame_off)
        return Frame(payload=payload, offset=self._frame_off)

    def _add_garbage(self, chunk: bytes, offset: int) -> None:
        if not chunk:
            return
        if self._garbage_len == 0:
            self._garbage_off = offset
        room = ERROR_DATA_LIMIT - len(self._garbage)
        if room > 0:
            self._garbage += chunk[:room]
        self._garbage_len += len(chunk)

    def _garbage_is_blank(self) -> bool:
        return (
            not self.framing.report_whitespace
            and self._garbage_len == len(self._garbage)
            and not self._garbage.strip(_WS)
        )

    def _flush_garbage(self, out: list) -> None:
        if self._garbage_len and not self._garbage_is_blank():
            out.append(self._error(
                ErrorCode.GARBAGE,
                f"{self._garbage_len} bytes outside any frame were discarded",
                bytes(self._garbage), self._garbage_off))
        self._garbage.clear()
        self._garbage_len = 0

    def _cap_garbage(self, out: list) -> None:
        # never hold more than the frame limit of junk: report and restart counting
        if self._garbage_len > self.framing.max_frame_bytes:
            self._flush_garbage(out)

    def _missing_start(self, end_offset: int) -> FramingError | Frame:
        if self._garbage_len == 0 or self._garbage_is_blank():
            self._garbage.clear()
            self._garbage_len = 0
            return self._error(
                ErrorCode.GARBAGE, "end character without a frame", self.framing.end, end_offset)
        err = self._error(
            ErrorCode.MISSING_START,
            f"{self._garbage_len} bytes ended by the end character arrived without a start character",
            bytes(self._garbage).lstrip(_WS), self._garbage_off)
        self._garbage.clear()
        self._garbage_len = 0
        return err

    @staticmethod
    def _error(code: ErrorCode, reason: str, data: bytes, offset: int) -> FramingError:
        return FramingError(code=code, reason=reason, data=data[:ERROR_DATA_LIMIT], offset=offset)
