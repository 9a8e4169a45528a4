"""ER7 ("pipe and hat") building blocks: encoding characters, escaping, raw segments,
field paths and HL7 date/time values.

These helpers are deliberately small and positional. hl7apy parses the message (see
``parse.py``), but its tree drops empty fields and forgets the position of fields that
its schema for the message's version does not know - and it knows no field of a
Z-segment such as ZBE. Reading "PV1-19" or "ZBE-4" therefore goes through
:class:`RawSegment`, split with the encoding characters of the message itself.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

from pydantic import BaseModel, ConfigDict

#: the HL7 "explicit null" (delete the value in the receiver), see HL7 v2 2.5.3
HL7_NULL = '""'


class EncodingChars(BaseModel):
    """MSH-1 (field separator) and MSH-2 (component, repetition, escape, subcomponent and,
    from v2.7, truncation character)."""

    model_config = ConfigDict(frozen=True)

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")

    def all(self) -> str:
        return self.field + self.msh2


DEFAULT_ENCODING = EncodingChars()

_SEG_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")


def is_segment_id(name: str) -> bool:
    return bool(_SEG_ID.match(name))


def check_encoding_chars(field_sep: str, msh2: str, version: str | None = None) -> EncodingChars | str:
    """Validate MSH-1/MSH-2. Returns the characters, or a readable reason why not."""
    if len(field_sep) != 1:
        return "MSH-1 (field separator) is missing"
    bad = _bad_separator(field_sep)
    if bad:
        return f"MSH-1 field separator {field_sep!r} {bad}"
    if len(msh2) not in (4, 5):
        return (
            f"MSH-2 must hold 4 encoding characters (component, repetition, escape, "
            f"subcomponent; a 5th truncation character from v2.7), got {msh2!r}"
        )
    if len(msh2) == 5 and version is not None and _version_tuple(version) < (2, 7):
        return f"MSH-2 {msh2!r} has a 5th (truncation) character, which HL7 {version} does not know"
    for ch in msh2:
        bad = _bad_separator(ch)
        if bad:
            return f"MSH-2 encoding character {ch!r} {bad}"
    chars = field_sep + msh2
    if len(set(chars)) != len(chars):
        return f"MSH-1/MSH-2 encoding characters {chars!r} are not all different"
    return EncodingChars(
        field=field_sep,
        component=msh2[0],
        repetition=msh2[1],
        escape=msh2[2],
        subcomponent=msh2[3],
        truncation=msh2[4] if len(msh2) == 5 else None,
    )


def _bad_separator(ch: str) -> str | None:
    if ch.isalnum():
        return "is a letter or digit"
    if ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
        return "is whitespace or a control character"
    if ord(ch) > 0x7E:
        return "is not a printable ASCII character"
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def version_tuple(version: str | None) -> tuple[int, ...]:
    """``"2.5.1"`` -> ``(2, 5, 1)``; junk -> ``()``."""
    return _version_tuple(version or "")


# --------------------------------------------------------------------------- escaping

_ESCAPE_NAMES = {"F": "field", "S": "component", "T": "subcomponent", "R": "repetition", "E": "escape"}


def escape(value: str, enc: EncodingChars = DEFAULT_ENCODING) -> str:
    """Escape a plain value so that it can stand as one leaf (subcomponent) in ER7."""
    e = enc.escape
    out = []
    for ch in value:
        if ch == e:
            out.append(f"{e}E{e}")
        elif ch == enc.field:
            out.append(f"{e}F{e}")
        elif ch == enc.component:
            out.append(f"{e}S{e}")
        elif ch == enc.subcomponent:
            out.append(f"{e}T{e}")
        elif ch == enc.repetition:
            out.append(f"{e}R{e}")
        elif enc.truncation is not None and ch == enc.truncation:
            out.append(f"{e}P{e}")
        elif ch == "\r":
            out.append(f"{e}X0D{e}")
        elif ch == "\n":
            out.append(f"{e}X0A{e}")
        else:
            out.append(ch)
    return "".join(out)


def unescape(value: str, enc: EncodingChars = DEFAULT_ENCODING) -> str:
    """Undo ER7 escaping of one leaf value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\P\\`` become the separator characters, ``\\Xhh..\\``
    the bytes ``hh..`` (read as UTF-8, else Latin-1), ``\\.br\\`` a line break;
    highlighting (``\\H\\ \\N\\``) and charset switches (``\\C..\\ \\M..\\``) are dropped.
    Anything unknown or unterminated is kept literally."""
    e = enc.escape
    if e not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch != e:
            out.append(ch)
            i += 1
            continue
        j = value.find(e, i + 1)
        if j == -1:
            out.append(value[i:])
            break
        token = value[i + 1 : j]
        repl = _unescape_token(token, enc)
        if repl is None:
            out.append(value[i : j + 1])
        else:
            out.append(repl)
        i = j + 1
    return "".join(out)


def _unescape_token(token: str, enc: EncodingChars) -> str | None:
    if token in _ESCAPE_NAMES:
        return getattr(enc, _ESCAPE_NAMES[token])
    if token == "P" and enc.truncation is not None:
        return enc.truncation
    if token == ".br":
        return "\n"
    if token in ("H", "N"):
        return ""
    if token[:1] in ("C", "M") and len(token) > 1 and all(c in "0123456789ABCDEFabcdef" for c in token[1:]):
        return ""
    if token[:1] == "X" and len(token) > 1 and len(token) % 2 == 1:
        try:
            raw = bytes.fromhex(token[1:])
        except ValueError:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return None


# --------------------------------------------------------------------------- segments


class RawSegment(BaseModel):
    """One segment as ER7 text split into fields. ``fields[n]`` is SEG-n (``fields[0]`` is
    the segment id); for MSH/FHS/BHS ``fields[1]`` is the field separator and
    ``fields[2]`` the encoding characters, so MSH-n is ``fields[n]`` too. Field values are
    still escaped ER7 (repetitions, components not split)."""

    model_config = ConfigDict(frozen=True)

    name: str
    fields: list[str]

    @classmethod
    def from_er7(cls, line: str, enc: EncodingChars) -> "RawSegment":
        name = line[:3]
        if name in ("MSH", "FHS", "BHS"):
            rest = line[4:].split(enc.field) if len(line) > 4 else []
            # rest[0] is MSH-2; MSH-1 is the separator itself
            fields = [name, enc.field, *rest] if rest else [name, enc.field]
        else:
            fields = line.split(enc.field)
            fields[0] = name
        return cls(name=name, fields=fields)

    def field(self, n: int) -> str:
        """Raw (escaped) SEG-n, ``""`` when absent."""
        return self.fields[n] if 0 <= n < len(self.fields) else ""

    def to_er7(self, enc: EncodingChars) -> str:
        if self.name in ("MSH", "FHS", "BHS"):
            return self.name + enc.field + enc.field.join(self.fields[2:])
        return enc.field.join(self.fields)


_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d{1,3})(?:\[(\d{1,3})\])?(?:\.(\d{1,3}))?(?:\.(\d{1,3}))?$")


class FieldPath(BaseModel):
    """``"PID-3"``, ``"PID-3.4"``, ``"PID-3[2].1"``, ``"PV1-3.4.1"`` (1-based everywhere;
    repetition ``[r]`` defaults to the first)."""

    model_config = ConfigDict(frozen=True)

    segment: str
    field: int
    repetition: int = 1
    component: int | None = None
    subcomponent: int | None = None

    @classmethod
    def parse(cls, path: str) -> "FieldPath":
        m = _PATH.match(path.strip())
        if not m:
            raise ValueError(f"not a field path (expected e.g. 'PID-3', 'PV1-3.4', 'PID-3[2].1'): {path!r}")
        seg, f, r, c, s = m.groups()
        fp = cls(
            segment=seg,
            field=int(f),
            repetition=int(r) if r else 1,
            component=int(c) if c else None,
            subcomponent=int(s) if s else None,
        )
        positions = [fp.field, fp.repetition, fp.component, fp.subcomponent]
        if any(p is not None and p < 1 for p in positions):
            raise ValueError(f"field path positions start at 1: {path!r}")
        return fp

    def __str__(self) -> str:
        out = f"{self.segment}-{self.field}"
        if self.repetition != 1:
            out += f"[{self.repetition}]"
        if self.component is not None:
            out += f".{self.component}"
        if self.subcomponent is not None:
            out += f".{self.subcomponent}"
        return out


def read_path(seg: RawSegment, path: FieldPath, enc: EncodingChars) -> str:
    """Value at ``path`` inside ``seg`` ('' when absent). A leaf (no further components or
    subcomponents below it) is returned unescaped; a composite is returned as raw ER7."""
    raw = seg.field(path.field)
    if path.segment == "MSH" and path.field in (1, 2):
        return raw
    reps = raw.split(enc.repetition)
    if path.repetition > len(reps):
        return ""
    rep = reps[path.repetition - 1]
    if path.component is None:
        composite = enc.component in rep or enc.subcomponent in rep
        return rep if composite else unescape(rep, enc)
    comps = rep.split(enc.component)
    if path.component > len(comps):
        return ""
    comp = comps[path.component - 1]
    subs = comp.split(enc.subcomponent)
    if path.subcomponent is None:
        return comp if len(subs) > 1 else unescape(comp, enc)
    if path.subcomponent > len(subs):
        return ""
    return unescape(subs[path.subcomponent - 1], enc)


def split_field(raw: str, enc: EncodingChars) -> list[list[list[str]]]:
    """Raw field -> repetitions -> components -> unescaped subcomponents."""
    if raw == "":
        return []
    return [
        [[unescape(s, enc) for s in comp.split(enc.subcomponent)] for comp in rep.split(enc.component)]
        for rep in raw.split(enc.repetition)
    ]


def split_segments(text: str, segment_sep: str | None = None) -> list[str]:
    """Split message text into segment lines. With ``segment_sep=None`` CR is the
    separator when the text contains one (a following LF of CRLF is dropped); otherwise
    LF. Lines that are empty or whitespace-only are skipped."""
    if segment_sep is None:
        if "\r" in text:
            lines = text.replace("\r\n", "\r").split("\r")
        else:
            lines = text.split("\n")
    else:
        lines = text.split(segment_sep)
        if segment_sep == "\n":
            lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    return [ln for ln in lines if ln.strip()]


# --------------------------------------------------------------------------- date / time

_TS = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?(?:([+-])(\d{2})(\d{2}))?$"
)


def parse_ts(value: str | None) -> datetime | None:
    """HL7 TS/DTM ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`` -> datetime (aware
    when an offset is given). Pass the first component of a TS only. Invalid -> None."""
    if not value:
        return None
    value = value.strip()
    m = _TS.match(value)
    if not m:
        return None
    y, mo, d, h, mi, s, frac, sign, tzh, tzm = m.groups()
    # a component may only be present when the previous one is (regex guarantees order)
    try:
        tz = None
        if sign:
            off = timedelta(hours=int(tzh), minutes=int(tzm))
            if off >= timedelta(hours=24):
                return None
            tz = timezone(off if sign == "+" else -off)
        micro = int((frac or "0").ljust(6, "0")[:6])
        return datetime(
            int(y),
            int(mo or 1),
            int(d or 1),
            int(h or 0),
            int(mi or 0),
            int(s or 0),
            micro,
            tzinfo=tz,
        )
    except ValueError:
        return None


def parse_date(value: str | None) -> date | None:
    dt = parse_ts(value)
    return dt.date() if dt else None


def format_ts(dt: datetime | date) -> str:
    """datetime -> ``YYYYMMDDHHMMSS[+ZZZZ]``; date -> ``YYYYMMDD``."""
    if not isinstance(dt, datetime):
        return dt.strftime("%Y%m%d")
    out = dt.strftime("%Y%m%d%H%M%S")
    off = dt.utcoffset()
    if off is not None:
        total = int(off.total_seconds() // 60)
        sign = "+" if total >= 0 else "-"
        total = abs(total)
        out += f"{sign}{total // 60:02d}{total % 60:02d}"
    return out
