"""Encryption at rest and pseudonyms: AES-256-GCM with key ids, HMAC-SHA256 pseudonyms.

Wire format of an encrypted blob (``KeyRing.encrypt``)::

    b"AMG1" | len(kid): 1 byte | kid: ascii | nonce: 12 bytes | ciphertext || tag (16 bytes)

The header (magic, kid length, kid) is authenticated together with the caller's ``aad``
(GCM additional data = header + aad), so a blob cannot be re-labelled to another key id
and a blob bound to one ``aad`` (e.g. its blob ref or entity key) does not decrypt
under another. Several keys are readable, one is active for writing; ``rotate`` adds a
fresh active key and ``reencrypt`` moves old blobs to it.

Keys file (mode 0600, never in the repository)::

    {"active": "k1", "keys": {"k1": "<base64 of 32 random bytes>"}}

Pseudonym key file: base64 of ≥16 (normally 32) random bytes.

Nothing in this module logs or puts key material or plaintext into exception messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "MAGIC",
    "CryptoError",
    "IntegrityError",
    "UnknownKeyError",
    "KeyFileError",
    "KeyRing",
    "Pseudonymizer",
]

MAGIC = b"AMG1"
#: a ring read from a file looks at the file again at most this often when it encrypts, so a
#: rotation (``automat keys rotate``) reaches every running process within this time
RELOAD_CHECK_S = 5.0
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32
_KID_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_KNUM_RE = re.compile(r"^k(\d+)$")


class CryptoError(Exception):
    """Base class of every error raised by this module."""


class IntegrityError(CryptoError):
    """The blob is not what was written: bad magic, truncated, or the GCM tag does not verify."""


class UnknownKeyError(CryptoError):
    """The blob names a key id that this key ring does not hold."""

    def __init__(self, kid: str, known: list[str] | None = None):
        self.kid = kid
        extra = f" (known: {', '.join(sorted(known))})" if known else ""
        super().__init__(f"unknown key id {kid!r}{extra}")


class KeyFileError(CryptoError):
    """A keys file is missing, unreadable or malformed (the message names the file)."""


def _check_kid(kid: str) -> str:
    if not isinstance(kid, str) or not _KID_RE.match(kid):
        raise ValueError(f"invalid key id {kid!r}: 1-255 chars of [A-Za-z0-9._-]")
    return kid


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _parse(blob: bytes) -> tuple[str, bytes, bytes, bytes]:
    """-> (kid, header, nonce, ciphertext||tag); IntegrityError names what is wrong."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, not {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < len(MAGIC) + 1:
        raise IntegrityError(f"truncated blob: {len(blob)} bytes, no header")
    if blob[: len(MAGIC)] != MAGIC:
        raise IntegrityError("bad magic: not an AMG1 blob")
    klen = blob[len(MAGIC)]
    hlen = len(MAGIC) + 1 + klen
    if klen == 0:
        raise IntegrityError("bad header: empty key id")
    if len(blob) < hlen + NONCE_LEN + TAG_LEN:
        raise IntegrityError(
            f"truncated blob: {len(blob)} bytes, need at least {hlen + NONCE_LEN + TAG_LEN}"
        )
    try:
        kid = blob[len(MAGIC) + 1 : hlen].decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("bad header: key id is not ascii") from None
    if not _KID_RE.match(kid):
        raise IntegrityError("bad header: malformed key id")
    return kid, blob[:hlen], blob[hlen : hlen + NONCE_LEN], blob[hlen + NONCE_LEN :]


def _load_keys_file(path: Path) -> tuple[dict[str, bytes], str]:
    path = Path(path)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise KeyFileError(f"keys file {path} does not exist") from None
    except OSError as e:
        raise KeyFileError(f"keys file {path} is not readable: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise KeyFileError(f"keys file {path} is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict) or "active" not in doc:
        raise KeyFileError(f'keys file {path} must be {{"active": kid, "keys": {{kid: base64}}}}')
    keys: dict[str, bytes] = {}
    for kid, b64 in doc["keys"].items():
        if not isinstance(kid, str) or not _KID_RE.match(kid):
            raise KeyFileError(f"keys file {path}: invalid key id {kid!r}")
        try:
            key = base64.b64decode(b64, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise KeyFileError(f"keys file {path}: key {kid!r} is not valid base64") from None
        if len(key) != KEY_LEN:
            raise KeyFileError(f"keys file {path}: key {kid!r} has {len(key)} bytes, need {KEY_LEN}")
        keys[kid] = key
    active = doc["active"]
    if active not in keys:
        raise KeyFileError(f"keys file {path}: active key {active!r} is not among the keys")
    return keys, active


class KeyRing:
    """Several AES-256 keys by id; one active for writing, all readable. Thread-safe."""

    def __init__(self, keys: dict[str, bytes], active: str):
        if not keys:
            raise ValueError("a key ring needs at least one key")
        checked: dict[str, bytes] = {}
        for kid, key in keys.items():
            _check_kid(kid)
            if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
                raise ValueError(f"key {kid!r} must be {KEY_LEN} bytes")
            checked[kid] = bytes(key)
        if active not in checked:
            raise ValueError(f"active key {active!r} is not among the keys")
        self._lock = threading.RLock()
        self._keys = checked
        self._aead = {kid: AESGCM(k) for kid, k in checked.items()}
        self._active = active
        self._path: Path | None = None
        self._checked = 0.0  # monotonic time of the last look at the file
        self._mtime: int | None = None

    # ---- construction / files -------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "KeyRing":
        keys, active = _load_keys_file(Path(path))
        ring = cls(keys, active)
        ring._path = Path(path)
        ring._note_file()
        return ring

    def _note_file(self) -> None:
        self._checked = time.monotonic()
        try:
            self._mtime = self._path.stat().st_mtime_ns if self._path else None
        except OSError:
            self._mtime = None

    def _maybe_reload(self) -> None:
        """Pick up a rotation done by another process (file changed since the last look)."""
        if self._path is None or time.monotonic() - self._checked < RELOAD_CHECK_S:
            return
        self._checked = time.monotonic()
        try:
            mtime = self._path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            try:
                self.reload()
                self._mtime = mtime
            except CryptoError:
                pass  # keep the keys we have; reload() names the problem when called directly

    @classmethod
    def generate(cls, kid: str = "k1") -> "KeyRing":
        """A fresh ring with one random key (for tests and first-time setup)."""
        return cls({kid: AESGCM.generate_key(bit_length=256)}, kid)

    @classmethod
    def create_file(cls, path: str | Path, kid: str = "k1") -> "KeyRing":
        """Write a new keys file (mode 0600) with one random key; refuses to overwrite."""
        path = Path(path)
        if path.exists():
            raise KeyFileError(f"keys file {path} already exists; use rotate() to add a key")
        ring = cls.generate(kid)
        ring._write(path)
        ring._path = path
        return ring

    def _doc(self) -> bytes:
        keys = {kid: base64.b64encode(k).decode() for kid, k in self._keys.items()}
        return (json.dumps({"active": self._active, "keys": keys}, indent=2) + "\n").encode()

    def _write(self, path: Path) -> None:
        _atomic_write(Path(path), self._doc(), 0o600)

    def _add(self, kid: str, key: bytes) -> None:
        self._keys[kid] = key
        self._aead[kid] = AESGCM(key)

    def reload(self) -> bool:
        """Merge keys (and the active id) from the file this ring came from.

        Lets long-running processes read blobs written under a key that another process
        rotated in. Returns True when something changed."""
        if self._path is None:
            return False
        keys, active = _load_keys_file(self._path)
        with self._lock:
            changed = active != self._active
            for kid, key in keys.items():
                old = self._keys.get(kid)
                if old is None:
                    self._add(kid, key)
                    changed = True
                elif not hmac.compare_digest(old, key):
                    raise KeyFileError(f"keys file {self._path}: key {kid!r} changed its material")
            self._active = active
            return changed

    def rotate(self, path: str | Path) -> str:
        """Add a fresh random key, make it active, rewrite ``path`` atomically (0600).

        Keys already in the file (e.g. rotated in by another process) are kept; old keys
        stay readable. Returns the new key id (``k<N+1>`` after the highest ``k<N>``)."""
        path = Path(path)
        with self._lock:
            if path.exists():
                keys, _ = _load_keys_file(path)
                for kid, key in keys.items():
                    old = self._keys.get(kid)
                    if old is None:
                        self._add(kid, key)
                    elif not hmac.compare_digest(old, key):
                        raise KeyFileError(f"keys file {path}: key {kid!r} differs from the ring's")
            nums = [int(m.group(1)) for kid in self._keys if (m := _KNUM_RE.match(kid))]
            n = max(nums, default=0) + 1
            while f"k{n}" in self._keys:
                n += 1
            kid = f"k{n}"
            self._add(kid, AESGCM.generate_key(bit_length=256))
            prev = self._active
            self._active = kid
            try:
                self._write(path)
            except BaseException:
                self._active = prev
                del self._keys[kid], self._aead[kid]
                raise
            self._path = path
            self._note_file()
            return kid

    # ---- properties -----------------------------------------------------------------
    @property
    def active(self) -> str:
        return self._active

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __repr__(self) -> str:  # never show key material
        return f"KeyRing(active={self._active!r}, keys={self.key_ids!r})"

    # ---- encrypt / decrypt ----------------------------------------------------------
    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        self._maybe_reload()
        with self._lock:
            kid = self._active
            aead = self._aead[kid]
        kb = kid.encode("ascii")
        header = MAGIC + bytes([len(kb)]) + kb
        nonce = secrets.token_bytes(NONCE_LEN)
        return header + nonce + aead.encrypt(nonce, bytes(plaintext), header + bytes(aad))

    def decrypt(self, blob: bytes, aad: bytes = b"") -> bytes:
        kid, header, nonce, ct = _parse(blob)
        aead = self._aead.get(kid)
        if aead is None and self._path is not None:
            try:
                self.reload()
            except CryptoError:
                pass
            aead = self._aead.get(kid)
        if aead is None:
            raise UnknownKeyError(kid, list(self._keys))
        try:
            return aead.decrypt(nonce, ct, header + bytes(aad))
        except InvalidTag:
            raise IntegrityError(
                f"tag mismatch: blob under key {kid!r} was modified or the aad differs"
            ) from None

    def key_id_of(self, blob: bytes) -> str:
        return _parse(blob)[0]

    def needs_reencrypt(self, blob: bytes) -> bool:
        """True when the blob is not under the active key."""
        return self.key_id_of(blob) != self._active

    def reencrypt(self, blob: bytes, aad: bytes = b"") -> bytes:
        """Decrypt (verifying integrity) and encrypt again under the active key."""
        return self.encrypt(self.decrypt(blob, aad), aad)


class Pseudonymizer:
    """Stable, domain-separated pseudonyms: HMAC-SHA256(key, domain NUL value), 32 hex."""

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
            raise ValueError("pseudonym key must be at least 16 bytes")
        self._key = bytes(key)

    @classmethod
    def from_file(cls, path: str | Path) -> "Pseudonymizer":
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise KeyFileError(f"pseudonym key file {path} does not exist") from None
        except OSError as e:
            raise KeyFileError(f"pseudonym key file {path} is not readable: {e.strerror}") from None
        try:
            key = base64.b64decode(raw.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"pseudonym key file {path} is not valid base64") from None
        if len(key) < 16:
            raise KeyFileError(f"pseudonym key file {path}: key has {len(key)} bytes, need >= 16")
        return cls(key)

    @classmethod
    def create_file(cls, path: str | Path) -> "Pseudonymizer":
        """Write a new random 32-byte key (base64, mode 0600); refuses to overwrite."""
        path = Path(path)
        if path.exists():
            raise KeyFileError(f"pseudonym key file {path} already exists")
        key = secrets.token_bytes(32)
        _atomic_write(path, base64.b64encode(key) + b"\n", 0o600)
        return cls(key)

    def pseudonym(self, value: str, domain: str) -> str:
        if "\x00" in domain:
            raise ValueError("domain must not contain NUL")
        msg = domain.encode("utf-8") + b"\x00" + value.encode("utf-8")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return "Pseudonymizer(<key hidden>)"
