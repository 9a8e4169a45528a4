"""Mailbox actors ``kim.mailboxes.N``: fetch KIM mails over IMAPS and hand them to slips.

Each supervised actor serves a share of the configured mailboxes (mailbox ``i`` goes to
fetcher ``i % fetchers``), one thread-backed loop per mailbox (imapclient is sync):

1. connect over TLS (``imap.ssl_port``, verified against ``imap.ca_file``), SELECT INBOX;
2. cursor = (UIDVALIDITY, last UID) from Redis hash ``automat:kim:cursor`` (field = the
   mailbox user); a changed UIDVALIDITY rescans from UID 1;
3. for each new mail (UID > last): raw bytes -> encrypted blob (claim check; a fetched
   chunk is made durable with one group commit of the blob store) ->
   ``ask kim.slip Receive`` with ``mail_id = HMAC(Message-ID + sha256(raw))`` -> when the
   slip owns it (created or already owned): MOVE to ``Verarbeitet`` -> advance the cursor;
4. no new mail: IDLE (if offered) until the server says EXISTS or ``idle_timeout_s``,
   else poll every ``imap.poll_interval_s``; with ``kim.pickup_poll_ms`` > 0, a mailbox
   that had mail in the last ``kim.pickup_hot_s`` is asked with NOOP every that many ms
   instead (IDLE notifies only 500 ms late - Dovecot's NOTIFY_DELAY_MSECS); a mailbox
   actor starts hot (it does not know how recently mail came).

Admission control (backpressure): a mailbox actor keeps at most
``kim.max_in_flight / kim.fetchers`` of its mails in flight (slip created, not terminal);
beyond that - or while a tenth of that many mails in flight (not waiting for a retry) have
been under way for half ``kim.step_timeout_s``, a sign that step orders queue up - it leaves new
mails in their INBOX until older ones are terminal (checked in Redis with one small
script: only the status of each slip crosses the wire). So a flood
of mails never becomes a queue of step orders longer than the watchdog allows.

A crash between any two steps neither loses nor doubles a mail: before the slip exists
the mail is still in INBOX (fetched again next time); after, the same ``mail_id`` finds
the slip ("already owned") and the mail is only moved. A MOVE cut off half-way (the
server made the copy in ``Verarbeitet``, then died before it expunged the mail from
INBOX) is settled from the move journal (``automat:kim:moving``, written before every
MOVE): the next session finds the copy and only expunges the original, so the mail is
archived once - while the same mail delivered twice on purpose is still archived twice.
Errors reconnect with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import email.parser
import email.policy
import hashlib
import itertools
import json
import logging
import os
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel

from actors.runtime import metrics
from supervisors.child import Supervised

log = logging.getLogger("automat.kim.mailbox")
SLIP_KIND = "kim.slip"

CURSOR_KEY = "automat:kim:cursor"
MOVE_KEY = "automat:kim:moving"  # field = mailbox user: the MOVE under way (see MoveJournal)
_STATUS_LUA = """
local out = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('HGET', k, 's')
  if v then out[i] = string.match(v, '"status":"(%a+)"') or '?' else out[i] = '' end
end
return out
"""
_TERMINAL = {b"done", b"rejected", b"parked", b""}
BLOB_KIND = "kim-mail"
PSEUDONYM_DOMAIN = "kim.mail"

FETCHED = metrics.counter("kim_mails_fetched", "KIM mails fetched from IMAP, by mailbox and result",
                          ("mailbox", "result"))
BACKLOG = metrics.gauge("kim_mailbox_backlog", "Mails waiting in a mailbox's INBOX at the last look", ("mailbox",))


def mailboxes_of(cfg, index: int) -> list:
    n = cfg.kim.fetchers
    return [m for i, m in enumerate(cfg.kim.mailboxes) if i % n == index]


def fetcher_name(index: int) -> str:
    return f"kim.mailboxes.{index}"


def message_id_of(raw: bytes) -> str:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head + b"\n\n")
        return (msg.get("Message-ID") or "").strip()
    except Exception:
        return ""


def mail_id_of(pseudo, raw: bytes) -> str:
    """Pseudonymous mail id: HMAC over Message-ID and content hash (same mail -> same id)."""
    return pseudo.pseudonym(message_id_of(raw) + "\x00" + hashlib.sha256(raw).hexdigest(), PSEUDONYM_DOMAIN)


def tls_context(cfg) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.imap.ca_file) if cfg.imap.ca_file else None)
    return ctx


class MailboxFetcher(Supervised):
    """A supervised Ray actor serving the mailboxes ``i % fetchers == index``."""

    def __init__(self, cfg, index: int, router_options: dict | None = None) -> None:
        self.cfg = cfg
        self.index = index
        self.boxes = mailboxes_of(cfg, index)
        self._tasks: dict[str, asyncio.Task] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(self.boxes) + 1), thread_name_prefix="imap")
        self._started = False
        self._stopping = False
        self.counts: dict[str, dict[str, int]] = {b.user: {"fetched": 0, "created": 0, "owned": 0, "moved": 0,
                                                          "errors": 0, "hot_pickups": 0, "move_settled": 0} for b in self.boxes}
        self.state: dict[str, str] = {b.user: "starting" for b in self.boxes}
        self._inflight: collections.deque[str] = collections.deque()
        mx = getattr(cfg.kim, "max_in_flight", 0) or 0
        self._limit = max(cfg.kim.fetch_batch, -(-mx // max(1, cfg.kim.fetchers))) if mx else 0
        self._admit_lock: asyncio.Lock | None = None
        self._reserved = 0
        self._since: dict[str, float] = {}  # mail id -> when its slip was created (monotonic)
        self._retrying: set[str] = set()
        self._max_age = max(5.0, cfg.kim.step_timeout_s * 0.5)
        self._congest_n = max(1, self._limit // 10)
        self.waited_s = 0.0

    # -- lifecycle ----------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        import redis.asyncio as aioredis

        from actors.runtime.blobs import BlobStore
        from actors.runtime.crypto import KeyRing, Pseudonymizer
        from actors.runtime.router import Router

        self.redis = aioredis.from_url(self.cfg.redis.url)
        self._status = self.redis.register_script(_STATUS_LUA)
        self.router = Router(self.cfg)
        self.blobs = BlobStore(self.cfg.blob.dir, KeyRing.from_file(self.cfg.crypto.keys_file))
        self.pseudo = Pseudonymizer.from_file(self.cfg.crypto.pseudonym_key_file)
        loop = asyncio.get_running_loop()
        # warm-up: the lanes to the slip hosts open before the first mail is picked up
        self._warm_task = loop.create_task(self._warm())
        for box in self.boxes:
            self._tasks[box.user] = loop.create_task(self._serve(box))

    async def _warm(self) -> int:
        # what the first fetched chunk would import (the slip's messages, the procedure peek)
        import actors.kim.slip  # noqa: F401
        import protocols.kim.roadmap  # noqa: F401

        try:
            return await self.router.warm(SLIP_KIND)
        except Exception as e:
            log.info("%s: warm-up of the lanes to the slip hosts failed (%s)", fetcher_name(self.index),
                     type(e).__name__)
            return 0

    async def supervised_info(self) -> dict:
        self._ensure_started()
        return await super().supervised_info()

    async def ping(self) -> str:
        self._ensure_started()
        return "pong"

    async def start(self) -> int:
        self._ensure_started()
        return len(self.boxes)

    async def ready(self) -> dict:
        """Readiness probe: the lanes to every slip host open (again, if a slip host
        came up after this actor) and each mailbox's IMAP session logged in."""
        self._ensure_started()
        hosts = await asyncio.shield(self._warm_task)
        want = len(set((await self.router.shard_map(SLIP_KIND)).owner))
        if hosts < want:
            self._warm_task = asyncio.get_running_loop().create_task(self._warm())
            hosts = await asyncio.shield(self._warm_task)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and any(st in ("starting", "connecting") for st in self.state.values()):
            await asyncio.sleep(0.05)
        return {"host": fetcher_name(self.index), "hosts": {SLIP_KIND: hosts},
                "mailboxes": dict(self.state)}

    async def on_stop(self) -> None:
        self._stopping = True
        for t in self._tasks.values():
            t.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def stats(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "in_flight": len(self._inflight), "limit": self._limit,
                "waited_s": round(self.waited_s, 1),
                "mailboxes": {u: {**c, "state": self.state[u]} for u, c in self.counts.items()}}

    async def pid(self) -> int:
        return os.getpid()

    # -- one mailbox ----------------------------------------------------------------------
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _connect(self, box):
        from imapclient import IMAPClient

        c = IMAPClient(self.cfg.imap.host, port=self.cfg.imap.ssl_port, ssl=True,
                       ssl_context=tls_context(self.cfg), timeout=30)
        c.login(box.user, box.secret())
        folder = self.cfg.kim.done_folder
        if not c.folder_exists(folder):
            try:
                c.create_folder(folder)
            except Exception:
                if not c.folder_exists(folder):
                    raise
        return c

    async def _serve(self, box) -> None:
        delay = 0.5
        while not self._stopping:
            client = None
            try:
                self.state[box.user] = "connecting"
                client = await self._run(self._connect, box)
                delay = 0.5
                await self._loop(box, client)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.counts[box.user]["errors"] += 1
                self.state[box.user] = f"error: {type(e).__name__}"
                log.warning("mailbox %s: %s: %s; reconnecting in %.1fs", box.user, type(e).__name__, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                if client is not None:
                    try:
                        await self._run(client.logout)
                    except Exception:
                        pass

    async def _admit(self, n: int, user: str) -> None:
        """Wait until ``n`` more mails fit under the in-flight limit."""
        if not self._limit:
            return
        if self._admit_lock is None:
            self._admit_lock = asyncio.Lock()
        t0 = time.monotonic()
        async with self._admit_lock:
            # reserved: chunks admitted and still being received by the other mailboxes' loops
            while (len(self._inflight) + self._reserved + n > self._limit or self._congested()) \
                    and not self._stopping:
                await self._prune()
                if len(self._inflight) + self._reserved + n <= self._limit and not self._congested():
                    break
                self.state[user] = f"waiting: {len(self._inflight)} mails in flight"
                await asyncio.sleep(0.3)
            self._reserved += n
        self.waited_s += time.monotonic() - t0

    def _congested(self) -> bool:
        """A tenth of the limit (at least one) of the mails in flight - not waiting for a
        retry - have been under way for half a step timeout: orders queue up, take no new
        mails until they moved on. A few old mails alone are not congestion: their orders
        were lost with a crashed worker host and wait for the slip's watchdog (minutes for a
        fused segment) - they must not stop the intake of every other mail meanwhile
        (chaos run: one worker-host kill held all mailboxes for minutes)."""
        now = time.monotonic()
        old = 0
        for m in self._inflight:  # oldest first
            if m in self._retrying:
                continue
            if now - self._since.get(m, now) <= self._max_age:
                break  # the rest are younger
            old += 1
            if old >= self._congest_n:
                return True
        return False

    async def _prune(self, window: int = 500) -> None:
        """Forget in-flight mails whose slips are terminal (the oldest ``window`` checked)."""
        from actors.runtime.store import state_key

        ids = list(itertools.islice(self._inflight, window))
        if not ids:
            return
        st = await self._status(keys=[state_key("kim.slip", m) for m in ids])
        gone = {m for m, v in zip(ids, st) if (v or b"") in _TERMINAL}
        self._retrying = {m for m, v in zip(ids, st) if v == b"waiting_retry"}
        if gone:
            self._inflight = collections.deque(m for m in self._inflight if m not in gone)
            for m in gone:
                self._since.pop(m, None)

    async def _cursor(self, user: str) -> tuple[int, int]:
        raw = await self.redis.hget(CURSOR_KEY, user)
        if not raw:
            return 0, 0
        d = json.loads(raw)
        return int(d["uidvalidity"]), int(d["last_uid"])

    async def _save_cursor(self, user: str, uidvalidity: int, last_uid: int) -> None:
        """Advance the cursor; the mails below it are moved, so a move journal is done with."""
        async with self.redis.pipeline(transaction=True) as p:
            p.hdel(MOVE_KEY, user)
            p.hset(CURSOR_KEY, user, json.dumps({"uidvalidity": uidvalidity, "last_uid": last_uid}))
            await p.execute()

    async def _journal_move(self, user: str, journal: MoveJournal | None) -> None:
        if journal is None:
            await self.redis.hdel(MOVE_KEY, user)
        else:
            await self.redis.hset(MOVE_KEY, user, journal.model_dump_json())

    async def _settle_cut_move(self, user: str, client) -> None:
        """A MOVE of this mailbox that did not report back (journal entry left): expunge
        from INBOX what its copy already reached in ``Verarbeitet``, then forget it."""
        raw = await self.redis.hget(MOVE_KEY, user)
        if not raw:
            return
        try:
            journal = MoveJournal.model_validate_json(raw)
        except ValueError as e:  # not ours / damaged: kept for inspection, the mailbox goes on
            await self.redis.hset(MOVE_KEY + ":unreadable", user, raw)
            await self._journal_move(user, None)
            log.error("mailbox %s: unreadable move journal kept under %s:unreadable (%s)", user, MOVE_KEY,
                      str(e).splitlines()[0])
            return
        settled = await self._run(settle_cut_move, client, journal, self.cfg.kim.done_folder)
        if settled:
            self.counts[user]["move_settled"] += len(settled)
            FETCHED.inc(len(settled), mailbox=user, result="cut_move_settled")
            log.warning("mailbox %s: a cut-off MOVE had already archived %d mail(s); expunged them "
                        "from INBOX only (UIDs %s)", user, len(settled), settled[:20])
        await self._journal_move(user, None)

    async def _loop(self, box, client) -> None:
        user = box.user
        idle_ok = b"IDLE" in (await self._run(client.capabilities))
        # when this mailbox last had new mail (monotonic). A (re)started actor does not know
        # the mailbox's recent past: it starts hot (with pickup_poll_ms > 0), so mail that
        # arrives right after a start is not picked up 500 ms late (the first mail of each of
        # 20 load-test mailboxes was 2.4 % of a rate-7 run, all above 500 ms)
        last_mail = time.monotonic()
        await self._settle_cut_move(user, client)
        while not self._stopping:
            info = await self._run(client.select_folder, "INBOX")
            uidvalidity = int(info[b"UIDVALIDITY"])
            cur_validity, last_uid = await self._cursor(user)
            if cur_validity != uidvalidity:
                if cur_validity:
                    log.warning("mailbox %s: UIDVALIDITY changed (%s -> %s); rescanning", user, cur_validity,
                                uidvalidity)
                last_uid = 0
                await self._save_cursor(user, uidvalidity, 0)
            uids = [u for u in await self._run(client.search, ["UID", f"{last_uid + 1}:*"]) if u > last_uid]
            uids.sort()
            BACKLOG.set(len(uids), mailbox=user)
            if uids:
                last_mail = time.monotonic()
                self.state[user] = f"fetching {len(uids)}"
                for i in range(0, len(uids), self.cfg.kim.fetch_batch):
                    chunk = uids[i:i + self.cfg.kim.fetch_batch]
                    await self._admit(len(chunk), user)
                    try:
                        await self._handle_chunk(box, client, uidvalidity, chunk)
                    finally:
                        self._reserved -= len(chunk) if self._limit else 0
                continue
            self.state[user] = "idle"
            poll_s = self.cfg.kim.pickup_poll_ms / 1000.0
            if poll_s > 0 and time.monotonic() - last_mail < self.cfg.kim.pickup_hot_s:
                if await self._hot_wait(client, poll_s, last_mail):
                    self.counts[user]["hot_pickups"] += 1
            elif idle_ok:
                await self._run(self._idle, client, self.cfg.kim.idle_timeout_s)
            else:
                await asyncio.sleep(self.cfg.imap.poll_interval_s)

    async def _hot_wait(self, client, poll_s: float, last_mail: float) -> bool:
        """Hot pick-up (``kim.pickup_poll_ms`` > 0): while a mailbox had mail within
        ``kim.pickup_hot_s``, ask with NOOP every ``poll_s`` instead of IDLE. Dovecot tells
        an IDLE client of a new mail only 500 ms after it noticed it (NOTIFY_DELAY_MSECS,
        compiled in) - at the seed's peak that delay was most of a mail's end-to-end
        latency; a NOOP makes the server sync the mailbox at once. Returns True when the
        server reported new mail (EXISTS), False when the mailbox went cold."""
        while not self._stopping and time.monotonic() - last_mail < self.cfg.kim.pickup_hot_s:
            _, responses = await self._run(client.noop)
            if any(isinstance(r, tuple) and len(r) >= 2 and r[1] == b"EXISTS" for r in responses):
                return True
            await asyncio.sleep(poll_s)
        return False

    @staticmethod
    def _idle(client, timeout: float) -> None:
        client.idle()
        try:
            client.idle_check(timeout=timeout)
        finally:
            client.idle_done()

    async def _handle_chunk(self, box, client, uidvalidity: int, uids: list[int]) -> None:
        from actors.kim.slip import Receive, ReceiveReply
        from protocols.kim.roadmap import peek_procedure

        user = box.user
        fetched = await self._run(client.fetch, uids, ["BODY.PEEK[]"])
        now = time.time()
        owned: list[int] = []

        # claim checks first: every raw mail of the chunk written, then ONE durability
        # barrier for all of them (group commit), then the slips are created
        raws: dict[int, bytes] = {}
        for uid in uids:
            data = fetched.get(uid)
            if data and b"BODY[]" in data:  # else: vanished meanwhile (moved by an earlier incarnation)
                raws[uid] = bytes(data[b"BODY[]"])
        refs = await self._run(self._put_blobs, list(raws.values()))
        ref_of = dict(zip(raws, refs))

        async def one(uid: int) -> None:
            raw = raws.get(uid)
            if raw is None:
                return
            mail_id = mail_id_of(self.pseudo, raw)
            ref = ref_of[uid]
            procedure = peek_procedure(raw).value  # header only: picks the road map
            reply = await self.router.ask("kim.slip", mail_id, Receive(
                mail_id=mail_id, mailbox=user, blob=ref, size=len(raw), uid=uid, procedure=procedure,
                received_at=now))
            assert isinstance(reply, ReceiveReply)
            c = self.counts[user]
            c["fetched"] += 1
            if reply.created:
                c["created"] += 1
                FETCHED.inc(mailbox=user, result="created")
            else:  # a re-fetch after a crash: the slip already owns it; drop our new copy
                c["owned"] += 1
                FETCHED.inc(mailbox=user, result="already_owned")
                # ... unless it is the copy the slip holds: the router re-sent this very Receive
                # after the slip host died having committed it (found by `automat chaos`)
                if reply.blob and reply.blob != ref:
                    await self._run(self.blobs.delete, ref)
            owned.append(uid)
            self._inflight.append(mail_id)
            self._since.setdefault(mail_id, time.monotonic())

        results = await asyncio.gather(*(one(u) for u in uids), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if owned:
            owned.sort()
            # journal first: a MOVE the server cuts off after its copy is settled next session
            nxt = await self._run(self._done_uidnext, client)
            await self._journal_move(user, MoveJournal(uidvalidity=uidvalidity, uids=owned, done_uidnext=nxt))
            await self._run(self._move, client, owned)
            self.counts[user]["moved"] += len(owned)
        if errors:
            if owned:
                await self._journal_move(user, None)
            raise errors[0]
        # every UID of the chunk is owned (or vanished) and moved: advance the cursor
        await self._save_cursor(user, uidvalidity, max(uids))

    def _put_blob(self, raw: bytes) -> str:
        return self.blobs.put(raw, kind=BLOB_KIND)

    def _put_blobs(self, raws: list[bytes]) -> list[str]:
        """Store many raw mails, durable together (one barrier) before any ref is used."""
        refs = [self.blobs.put(raw, kind=BLOB_KIND, sync=False) for raw in raws]
        if refs:
            self.blobs.sync()
        return refs

    def _done_uidnext(self, client) -> int:
        st = client.folder_status(self.cfg.kim.done_folder, [b"UIDNEXT"])
        return int(st[b"UIDNEXT"])

    def _move(self, client, uids: list[int]) -> None:
        folder = self.cfg.kim.done_folder
        if client.has_capability("MOVE"):
            client.move(uids, folder)
        else:
            client.copy(uids, folder)
            client.add_flags(uids, [b"\\Deleted"])
            client.uid_expunge(uids) if client.has_capability("UIDPLUS") else client.expunge()


class MoveJournal(BaseModel):
    """The MOVE a mailbox actor is about to make (Redis hash ``automat:kim:moving``, field =
    mailbox user), written before it and removed with the cursor advance after it. Left
    behind, it means the MOVE did not report back: the server may have made the copies in
    ``Verarbeitet`` without expunging the originals from INBOX."""

    uidvalidity: int  # of INBOX
    uids: list[int]  # INBOX UIDs being moved (each owned by its slip)
    done_uidnext: int  # UIDNEXT of the done folder before the MOVE: its copies get UIDs >= this


def _digests(client, uids: list[int]) -> dict[int, str]:
    if not uids:
        return {}
    out = {}
    for uid, data in client.fetch(uids, ["BODY.PEEK[]"]).items():
        if b"BODY[]" in data:
            out[uid] = hashlib.sha256(bytes(data[b"BODY[]"])).hexdigest()
    return out


def settle_cut_move(client, journal: MoveJournal, done_folder: str) -> list[int]:
    """Expunge from INBOX each journalled mail whose copy the cut-off MOVE already made in
    ``done_folder``; returns their UIDs. A copy is a mail of the done folder with a UID the
    MOVE could have given (>= ``done_uidnext``) and the same bytes - one copy pairs with one
    original, so the same mail delivered twice and moved twice stays archived twice, and a
    mail the MOVE never reached stays in INBOX (moved again after its slip says "owned")."""
    info = client.select_folder("INBOX")
    if int(info[b"UIDVALIDITY"]) != journal.uidvalidity or not journal.uids:
        return []  # another INBOX: its UIDs mean other mails
    still = sorted(set(client.search(["UID", ",".join(map(str, journal.uids))])) & set(journal.uids))
    originals = _digests(client, still)
    if not originals:
        return []
    client.select_folder(done_folder, readonly=True)
    copies = collections.Counter(_digests(client, [u for u in client.search(["UID", f"{journal.done_uidnext}:*"])
                                                   if u >= journal.done_uidnext]).values())
    client.select_folder("INBOX")
    settled = []
    for uid in still:
        d = originals.get(uid)
        if d is not None and copies[d] > 0:
            copies[d] -= 1
            settled.append(uid)
    if settled:
        client.add_flags(settled, [b"\\Deleted"])
        client.uid_expunge(settled) if client.has_capability("UIDPLUS") else client.expunge()
    return settled


def empty_mailbox(cfg, user: str, password: str | None = None, folders: tuple[str, ...] = ("INBOX",)) -> int:
    """Delete every mail in ``folders`` of ``user`` (tests, demo reset). Returns how many."""
    from imapclient import IMAPClient

    n = 0
    with IMAPClient(cfg.imap.host, port=cfg.imap.ssl_port, ssl=True, ssl_context=tls_context(cfg)) as c:
        c.login(user, password or f"{user}pw")
        for folder in folders:
            if not c.folder_exists(folder):
                continue
            c.select_folder(folder)
            uids = c.search(["ALL"])
            if uids:
                # "1:*", not the UID list: 11,000 UIDs are longer than an IMAP command line
                # may be (Dovecot: "Too long argument" - an aborted 240k loadtest left
                # 12,000 mails per mailbox and the next run could not start)
                c.delete_messages("1:*", silent=True)
                c.expunge()
                n += len(uids)
    return n


def count_mailbox(cfg, user: str, password: str | None = None, folder: str = "INBOX") -> int:
    from imapclient import IMAPClient

    with IMAPClient(cfg.imap.host, port=cfg.imap.ssl_port, ssl=True, ssl_context=tls_context(cfg)) as c:
        c.login(user, password or f"{user}pw")
        if not c.folder_exists(folder):
            return 0
        return int(c.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"])

