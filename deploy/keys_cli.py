"""``automat keys status|rotate|reencrypt``: AES-256-GCM key rotation for the data at rest.

```
automat keys status       key ids in the keys file (active marked) and what uses each key
automat keys rotate       add a new key and make it active (running processes switch within 5 s)
automat keys reencrypt    move entity states (Redis) and blobs to the active key
automat keys retire KID   drop a key from the file - refused while anything still uses it
```
Key material is never printed; the keys file is named by path only.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

keys_app = typer.Typer(help="Encryption keys (AES-256-GCM) of the data at rest: status, rotate, re-encrypt, retire.",
                       no_args_is_help=True)
console = Console()


def _cfg(ctx: typer.Context):
    from deploy.cli import get_config

    return get_config(ctx)


async def _usage(cfg) -> dict:
    import redis.asyncio as aioredis

    from actors.runtime.keys import key_usage

    r = aioredis.from_url(cfg.redis.url)
    try:
        return await key_usage(r, cfg.blob.dir)
    finally:
        await r.aclose()


@keys_app.command("status")
def status(ctx: typer.Context) -> None:
    """Key ids (the active one marked) and how many states / blobs / dead letters each encrypts."""
    from actors.runtime.crypto import KeyRing

    cfg = _cfg(ctx)
    ring = KeyRing.from_file(cfg.crypto.keys_file)
    usage = asyncio.run(_usage(cfg))
    t = Table(title=f"keys file {cfg.crypto.keys_file}")
    for c in ("key id", "active", "states", "blobs", "dead letters", "quarantined"):
        t.add_column(c, justify="right" if c not in ("key id", "active") else "left")
    for kid in sorted(set(ring.key_ids) | set(usage)):
        u = usage.get(kid, {})
        known = kid in ring.key_ids
        t.add_row(kid if known else f"[red]{kid} (not in the file)[/]", "yes" if kid == ring.active else "",
                  *(str(u.get(k, 0)) for k in ("states", "blobs", "deadletters", "quarantined")))
    console.print(t)


@keys_app.command("rotate")
def rotate(ctx: typer.Context) -> None:
    """Add a fresh key and make it the active one; old keys stay readable."""
    from actors.runtime.crypto import RELOAD_CHECK_S
    from actors.runtime.keys import rotate as do_rotate

    cfg = _cfg(ctx)
    kid = do_rotate(cfg.crypto.keys_file)
    console.print(f"new active key [bold]{kid}[/] in {cfg.crypto.keys_file}; running processes write with it "
                  f"within {RELOAD_CHECK_S:g} s. Then: `automat keys reencrypt`.")


@keys_app.command("reencrypt")
def reencrypt(ctx: typer.Context,
              states: bool = typer.Option(True, "--states/--no-states", help="Entity states in Redis."),
              blobs: bool = typer.Option(True, "--blobs/--no-blobs", help="The claim-check blob store.")) -> None:
    """Re-encrypt entity states and blobs that are not under the active key."""
    import redis.asyncio as aioredis

    from actors.runtime.blobs import BlobStore
    from actors.runtime.crypto import KeyRing
    from actors.runtime.keys import reencrypt_blobs, reencrypt_states

    cfg = _cfg(ctx)
    ring = KeyRing.from_file(cfg.crypto.keys_file)
    out: dict = {"active": ring.active}
    if states:
        async def run():
            r = aioredis.from_url(cfg.redis.url)
            try:
                return await reencrypt_states(r, ring)
            finally:
                await r.aclose()

        out["states"] = asyncio.run(run())
    if blobs and Path(cfg.blob.dir).is_dir():
        out["blobs"] = reencrypt_blobs(BlobStore(cfg.blob.dir, ring))
    console.print_json(json.dumps(out))
    failed = out.get("states", {}).get("failed", 0) + out.get("blobs", {}).get("failed", 0)
    if failed:
        console.print(f"[red]{failed} item(s) could not be decrypted (unknown key or tampered); left as they are[/]")
        raise typer.Exit(1)


@keys_app.command("retire")
def retire(ctx: typer.Context, kid: str = typer.Argument(..., help="Key id to remove from the keys file."),
           force: bool = typer.Option(False, help="Remove even if data still uses it (that data becomes unreadable).")) -> None:
    """Remove an old key from the keys file once nothing is encrypted under it any more."""
    from actors.runtime.crypto import KeyRing, _atomic_write

    cfg = _cfg(ctx)
    path = Path(cfg.crypto.keys_file)
    ring = KeyRing.from_file(path)
    if kid == ring.active:
        console.print(f"[red]{kid} is the active key; rotate first[/]")
        raise typer.Exit(1)
    if kid not in ring.key_ids:
        console.print(f"{kid} is not in {path}")
        raise typer.Exit(1)
    used = asyncio.run(_usage(cfg)).get(kid, {})
    if any(used.values()) and not force:
        console.print(f"[red]{kid} still encrypts {used}; run `automat keys reencrypt` first[/]")
        raise typer.Exit(1)
    doc = json.loads(path.read_text())
    doc["keys"].pop(kid)
    _atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode(), 0o600)
    console.print(f"retired {kid}; keys left: {', '.join(sorted(doc['keys']))}")
