"""Side-effect ports of the EFA entities (built once per shard host)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from actors.efa.settings import EfaSettings


@dataclass
class EfaPorts:
    settings: EfaSettings
    blobs: object | None = None  # actors.runtime.blobs.BlobStore (janitor only)
    clock: Callable[[], float] | None = None  # None -> wall clock


def make_ports(cfg) -> EfaPorts:
    return EfaPorts(settings=EfaSettings())


def make_janitor_ports(cfg) -> EfaPorts:
    from actors.runtime.blobs import BlobStore
    from actors.runtime.crypto import KeyRing

    return EfaPorts(settings=EfaSettings(), blobs=BlobStore(cfg.blob.dir, KeyRing.from_file(cfg.crypto.keys_file)))
