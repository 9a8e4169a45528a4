"""Hot pick-up (``kim.pickup_poll_ms``) against the real Dovecot.

Dovecot tells an IDLE client of a new mail only 500 ms after it noticed it
(``NOTIFY_DELAY_MSECS``, compiled in): at the seed's peak of 7 mails/s that delay was
most of a mail's end-to-end latency (loadtest rate mode: IMAP pick-up p50 514 ms of
598 ms). A mailbox that had mail recently is therefore asked with NOOP instead. These
tests pin what the mailbox actor relies on: a mail APPENDed by another connection is
reported by the NOOP path (EXISTS), and a mailbox without new mail goes cold (back to
IDLE) instead of polling forever. Speed is the loadtest's business (rate mode).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytestmark = pytest.mark.integration

USER = "load100"  # a loadtest mailbox no other test uses
MAIL = (b"From: praxis@kim.example\r\nTo: load100@kim.example\r\nSubject: pickup\r\n"
        b"Message-ID: <pickup-test@kim.example>\r\n\r\nhello\r\n")


def _fetcher(cfg, poll_ms: float, hot_s: float):
    from actors.kim.mailbox import MailboxFetcher
    from actors.runtime.config import KimMailbox

    c = cfg.model_copy(deep=True)
    c.kim.mailboxes = [KimMailbox(user=USER)]
    c.kim.fetchers = 1
    c.kim.pickup_poll_ms = poll_ms
    c.kim.pickup_hot_s = hot_s
    return MailboxFetcher(c, 0), c.kim.mailboxes[0]


def _empty(client) -> None:
    client.select_folder("INBOX")
    uids = client.search(["ALL"])
    if uids:
        client.delete_messages(uids)
        client.expunge()


@pytest.fixture
def mailbox(cfg, stack):
    stack.ensure_imap_users()
    f, box = _fetcher(cfg, 50, 20.0)
    client = f._connect(box)
    _empty(client)
    yield f, box, client
    try:
        _empty(client)
        client.logout()
    finally:
        f._pool.shutdown(wait=False)


def test_a_hot_mailbox_reports_a_mail_appended_elsewhere_by_noop(mailbox):
    f, box, client = mailbox
    other = f._connect(box)  # the sender's side, as the loadtest's rate feeder: IMAP APPEND

    def send_later():
        time.sleep(0.4)
        other.append("INBOX", MAIL)

    t = threading.Thread(target=send_later)
    t.start()
    try:
        saw = asyncio.run(f._hot_wait(client, 0.05, time.monotonic()))
    finally:
        t.join()
        other.logout()
    assert saw is True  # the NOOP path saw the server's EXISTS (not a time-out of the hot window)
    client.select_folder("INBOX")
    assert len(client.search(["ALL"])) == 1


def test_a_mailbox_without_new_mail_goes_cold_instead_of_polling_forever(cfg, mailbox):
    f, box, client = mailbox
    f.cfg.kim.pickup_hot_s = 1.0
    t0 = time.monotonic()
    saw = asyncio.run(f._hot_wait(client, 0.05, time.monotonic()))
    assert saw is False
    assert time.monotonic() - t0 < 10  # it returned (back to IDLE) once the hot window was over
    # and a mailbox that was cold already is not polled at all
    assert asyncio.run(f._hot_wait(client, 0.05, time.monotonic() - 5.0)) is False
