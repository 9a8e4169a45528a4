"""KIM steps against the real local stack: SMTP answers land in the sink once, the Redis
duplicate index, no personal data in facts or Redis keys."""

from __future__ import annotations

import uuid

import pytest

from actors.kim.core_system import SqliteCoreSystem
from actors.kim.ports import RedisDuplicateIndex, make_ports
from actors.kim.smtp import SmtpMailSender
from actors.kim.steps import run_step
from actors.kim.steps.inline import run_mail_inline
from protocols.kim.generator import Fault, MailGenerator, make_pki
from protocols.kim.messages import StepOrder


@pytest.fixture
async def ports(cfg, stack, redis_client, key_prefix, tmp_path):
    p = await make_ports(cfg, redis=redis_client, core=SqliteCoreSystem(tmp_path / "core.sqlite3"))
    p.dupes = RedisDuplicateIndex(redis_client, prefix=key_prefix + "dup:", ttl_s=600)
    p.mail.marker_ttl_s = 600
    return p


@pytest.fixture
def gen():
    return MailGenerator(int(uuid.uuid4().int % 1000) + 100, pki=make_pki(0))


def _sink_with(stack, message_id: str):
    return [m for m in stack.sink_messages() if (m.get("Message-ID") or "").strip() == message_id]


async def test_error_answer_lands_in_sink_once(ports, stack, gen):
    gm = gen.eau(Fault.BROKEN_SIGNATURE)
    mail_id = uuid.uuid4().hex
    run = await run_mail_inline(gm.raw, ports, mail_id=mail_id)
    assert run.terminal == "@rejected" and run.facts["answer_code"] == "202" and run.facts["answer_sent"] == "now"
    assert await ports.mail.was_sent(mail_id, "eau_fehler")
    mid = (await ports.redis.get(SmtpMailSender.marker(mail_id, "eau_fehler"))).decode()
    got = _sink_with(stack, mid)
    assert len(got) == 1
    assert got[0]["X-KIM-Dienstkennung"] == "eAU;Fehler-Kasse;V1.2" and got[0]["In-Reply-To"] == gm.message_id
    assert got[0]["To"] == gm.sender
    # the step runs again (crash before the transition was durable): no second mail
    order = StepOrder(mail_id=mail_id, step="answer_error", roadmap="eau", roadmap_version=2, mailbox="",
                      facts=run.facts, blobs=run.blobs)
    res = await run_step(order, ports)
    assert res.error is None and res.facts["answer_sent"] == "earlier"
    assert len(_sink_with(stack, mid)) == 1


async def test_eeb_bescheinigung_over_smtp(ports, stack, gen):
    gm = gen.eeb_anfrage()
    mail_id = uuid.uuid4().hex
    run = await run_mail_inline(gm.raw, ports, mail_id=mail_id)
    assert run.terminal == "@done" and run.facts["answer"] == "eeb_bescheinigung", run.trail
    mid = (await ports.redis.get(SmtpMailSender.marker(mail_id, "eeb_bescheinigung"))).decode()
    (m,) = _sink_with(stack, mid)
    assert m["X-KIM-Dienstkennung"] == "eEB;Bescheinigung;V1.0" and m["In-Reply-To"] == gm.message_id


async def test_duplicate_index_in_redis(ports, redis_client, key_prefix, gen):
    original = gen.eau()
    a = await run_mail_inline(original.raw, ports, mail_id=uuid.uuid4().hex)
    b = await run_mail_inline(gen.eau(Fault.DUPLICATE, of=original).raw, ports, mail_id=uuid.uuid4().hex)
    assert a.terminal == b.terminal == "@done"
    assert a.facts["result"] == "accepted" and b.facts["result"] == "duplicate"
    assert b.facts["duplicate_of"] == a.mail_id
    keys = [k.decode() for k in await redis_client.keys(key_prefix + "dup:*")]
    assert {k.split(":")[-2] for k in keys} == {"file", "bundle"}
    # claiming is idempotent for the owner
    assert await ports.dupes.claim("bundle", a.facts["doc_hash"], a.mail_id) == a.mail_id
    assert await ports.dupes.claim("bundle", a.facts["doc_hash"], "someone-else") == a.mail_id


async def test_no_personal_data_in_facts_or_redis(ports, redis_client, key_prefix, gen):
    mails = [gen.eau(), gen.eeb_anfrage(), gen.eau(Fault.UNTRUSTED_SIGNER), gen.emailplus(), gen.ebz()]
    runs = [await run_mail_inline(m.raw, ports, mail_id=uuid.uuid4().hex) for m in mails]
    keys = [k.decode() for k in await redis_client.keys(key_prefix + "*")]
    keys += [k.decode() for r in runs for k in await redis_client.keys(f"kim:smtp:sent:{r.mail_id}:*")]
    for m, r in zip(mails, runs):
        secrets = [m.kvnr, *(m.patient_name or "").split()]
        blob = " ".join(f"{k}={v}" for res in r.results for k, v in res.facts.items())
        blob += " " + " ".join(res.error.reason for res in r.results if res.error) + " " + " ".join(keys)
        blob += " " + " ".join(r.blobs.values())
        for s in secrets:
            if s and len(s) > 3:
                assert s not in blob, f"{s!r} leaked"
    assert [r.terminal for r in runs] == ["@done", "@done", "@rejected", "@workbasket", "@done"]
