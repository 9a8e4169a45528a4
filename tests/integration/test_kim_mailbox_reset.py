"""Loadtest mailboxes: emptying a big one, and one load test at a time.

Both found when the CI smoke run was started beside a 240,000-mail run on the same stack:
the smoke run's reset failed on the big run's 11,000 mails per INBOX ("UID STORE: Too long
argument" - the UID list is longer than Dovecot takes in one command line), and had it
worked it would have emptied the big run's INBOXes under it.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

USER = "load99"  # a loadtest mailbox no other test uses


def test_emptying_a_mailbox_with_12000_mails_works(cfg, stack):
    from actors.kim.mailbox import count_mailbox, empty_mailbox

    stack.ensure_imap_users()
    empty_mailbox(cfg, USER)
    for i in range(12_000):
        stack.deliver_maildir(USER, b"From: a@kim.example\r\nTo: load99@kim.example\r\nMessage-ID: <r%d@x>\r\n\r\nx\r\n" % i)
    assert count_mailbox(cfg, USER) == 12_000
    assert empty_mailbox(cfg, USER) == 12_000  # the old code: imaplib error "Too long argument"
    assert count_mailbox(cfg, USER) == 0


def test_a_second_load_test_on_the_same_mailboxes_is_refused(tmp_path):
    from deploy.loadtest.driver import MailboxLock

    first = MailboxLock(tmp_path / "loadtest" / "mailboxes.lock")
    second = MailboxLock(tmp_path / "loadtest" / "mailboxes.lock")
    with first:
        with pytest.raises(ValueError, match=r"another load test is running .*pid \d+"):
            second.acquire()
    with second:  # free again once the first one ended
        pass
