"""Whole road maps run step by step in-process over generated mails of every procedure and
fault, and over the real fixture mails: terminal marker, reason and answer of each."""

from __future__ import annotations

import email
from email import policy

import pytest

from actors.kim.steps import run_step
from actors.kim.steps.inline import run_mail_inline
from protocols.kim.answers import parse_fehler_nachricht
from protocols.kim.compose import OutAttachment, compose
from protocols.kim.generator import EXPECTED_CODE, SUPPORTED_FAULTS, Fault
from protocols.kim.mime import parse_mail
from protocols.kim.pkcs7 import unwrap_cms
from protocols.kim.procedures import Procedure

from .conftest import fixture_mails

EAU_ANSWER = {  # fault -> eAU;Fehler-Kasse code
    Fault.BROKEN_SIGNATURE: "202",
    Fault.UNTRUSTED_SIGNER: "201",
    Fault.NON_FHIR_PAYLOAD: "101",
    Fault.WRONG_PROFILE: "101",
    Fault.BROKEN_MIME: "101",
    Fault.TWO_ATTACHMENTS: "101",
    Fault.OVERSIZED: "101",
}


def _no_personal_data(run, gm):
    secrets = [s for s in (gm.kvnr, *(gm.patient_name or "").split()) if s and len(s) > 3]
    texts = [f"{k}={v}" for k, v in run.facts.items()]
    for r in run.results:
        texts += [f"{k}={v}" for k, v in r.facts.items()]
        if r.error:
            texts.append(r.error.reason)
    for s in secrets:
        leaked = [t for t in texts if s in t]
        assert not leaked, f"personal data {s!r} in facts: {leaked}"


def _answers(ports):
    return [(mid, kind, m) for mid, kind, m in ports.mail.sent]


@pytest.mark.parametrize("proc", [Procedure.EAU_LIEFERUNG, Procedure.EAU_STORNO, Procedure.EEB_ANFRAGE,
                                  Procedure.EBZ, Procedure.AAR, Procedure.EMAILPLUS])
async def test_every_procedure_and_fault(proc, ports, gen):
    for fault in sorted(SUPPORTED_FAULTS[proc]):
        if fault is Fault.DUPLICATE:
            original = gen.eau()
            first = await run_mail_inline(original.raw, ports)
            assert first.terminal == "@done", first.trail
            gm = gen.eau(Fault.DUPLICATE, of=original)
        else:
            gm = gen.generate(proc, fault)
        sent_before = len(ports.mail.sent)
        run = await run_mail_inline(gm.raw, ports)
        sent = ports.mail.sent[sent_before:]
        where = f"{proc.value}/{fault.value}: {run.trail[-3:]}"
        _no_personal_data(run, gm)
        if fault is Fault.MISSING_DIENSTKENNUNG or proc is Procedure.EMAILPLUS:
            assert run.roadmap == "emailplus" and run.terminal == "@workbasket", where
            assert not sent
            continue
        if fault is Fault.NONE:
            assert run.terminal == "@done", where
            if proc is Procedure.EEB_ANFRAGE:
                assert len(sent) == 1 and sent[0][2].dienstkennung == "eEB;Bescheinigung;V1.0"
                assert sent[0][2].in_reply_to == gm.message_id and sent[0][2].recipients == [gm.sender]
            else:
                assert not sent, where
            continue
        if fault is Fault.DUPLICATE:
            assert run.terminal == "@done" and run.facts["result"] == "duplicate", where
            assert run.facts["duplicate_by"] == "file_hash"
            assert not sent
            continue
        assert run.facts["error_code"] == EXPECTED_CODE[fault], where
        if proc in (Procedure.EBZ, Procedure.AAR):
            assert run.terminal == "@workbasket" and not sent, where
            continue
        assert run.terminal == "@rejected", where
        assert len(sent) == 1, where
        mail = sent[0][2]
        assert mail.recipients == [gm.sender] and mail.in_reply_to == gm.message_id
        att = parse_mail(mail.raw).single_attachment()
        code = parse_fehler_nachricht(att.data).code
        if proc is Procedure.EEB_ANFRAGE:
            assert mail.dienstkennung == "eEB;Fehler;V1.0"
            assert code == EAU_ANSWER[fault]
        else:
            assert mail.dienstkennung == "eAU;Fehler-Kasse;V1.2"
            payload_fault = EAU_ANSWER[fault] == "101"
            assert code == ("301" if proc is Procedure.EAU_STORNO and payload_fault else EAU_ANSWER[fault]), where


async def test_valid_eau_is_deposited_once_and_released(ports, gen):
    gm = gen.eau()
    run = await run_mail_inline(gm.raw, ports)
    assert run.terminal == "@done" and run.facts["result"] == "accepted" and run.facts["core_status"] == "released"
    recs = ports.core.records("eau")
    assert len(recs) == 1 and recs[0]["status"] == "released"
    assert recs[0]["record"]["patient"]["kvnr"] == gm.kvnr  # the core system holds the data
    assert len([s for s in run.steps]) == 40
    # duplicate by Bundle.identifier: the same document signed again, new Message-ID
    doc = unwrap_cms(parse_mail(gm.raw).single_attachment().data).content
    again = _resend(gm, doc, ports, gen)
    run2 = await run_mail_inline(again, ports)
    assert run2.terminal == "@done" and run2.facts["duplicate_by"] == "bundle_identifier"
    assert run2.facts["original_receipt"] == recs[0]["receipt_id"]
    assert ports.core.count("eau") == 1


def _resend(gm, payload: bytes, ports, gen, *, mid: str | None = None) -> bytes:
    mail = parse_mail(gm.raw)
    p7s = gen.pki.practice_signers[0].sign(payload)
    headers = [(k, v) for k, v in mail.headers if k.lower() not in ("content-type", "mime-version", "message-id")]
    headers.append(("Message-ID", mid or f"<resent-{id(payload)}@arzt.kim.telematik-test>"))
    att = mail.single_attachment()
    return compose(headers, attachments=[OutAttachment(filename=att.filename, data=p7s, description="eAU")])


async def test_business_findings_are_recorded_never_answered(ports, gen):
    gm = gen.eau()
    doc = unwrap_cms(parse_mail(gm.raw).single_attachment().data).content
    bad_kvnr = gm.kvnr[:-1] + str((int(gm.kvnr[-1]) + 1) % 10)
    doc = doc.replace(gm.kvnr.encode(), bad_kvnr.encode())
    run = await run_mail_inline(_resend(gm, doc, ports, gen), ports)
    assert run.terminal == "@done", run.trail
    assert run.facts["finding_kvnr"] == "kvnr_checksum"
    assert run.facts["result"] == "finding" and run.facts["core_status"] == "clarification"
    assert not ports.mail.sent
    assert ports.core.records("eau")[0]["record"]["findings"] == ["kvnr_checksum"]


async def test_address_fault_is_answered_with_100(ports, gen):
    ports.reference.insurer_iks = frozenset({"999999999"})
    gm = gen.eau()
    run = await run_mail_inline(gm.raw, ports)
    assert run.terminal == "@rejected" and run.facts["error_code"] == "wrong_address"
    assert run.facts["answer_code"] == "100"
    assert ports.core.count("eau") == 0


async def test_storno_cancels_the_deposited_eau(ports, gen):
    original = gen.eau()
    assert (await run_mail_inline(original.raw, ports)).terminal == "@done"
    storno = gen.eau_storno(cancels=original)
    run = await run_mail_inline(storno.raw, ports)
    assert run.terminal == "@done" and run.facts["storno_target"] == "found" and run.facts["storno_applied"] == "1"
    assert ports.core.records("eau")[0]["status"] == "cancelled"
    assert ports.core.count("eau_storno") == 1


EXPECTED_FIXTURE = {
    # gematik sample requests: signed by a real test SMC-B our trust store does not hold
    "eeb-anfrage.eml": ("eeb_anfrage", "@rejected", "unknown_issuer", "201"),
    "eeb-anfrage-2023-01.eml": ("eeb_anfrage", "@rejected", "unknown_issuer", "201"),
    "eeb-bescheinigung.eml": ("eeb_received", "@done", None, None),
    "eeb-fehler.eml": ("eeb_received", "@done", None, None),
}


@pytest.mark.parametrize("path", fixture_mails(), ids=lambda p: p.name)
async def test_real_fixture_mails(path, ports):
    roadmap, terminal, code, answer = EXPECTED_FIXTURE[path.name]
    raw = path.read_bytes()
    run = await run_mail_inline(raw, ports)
    assert (run.roadmap, run.terminal) == (roadmap, terminal), run.trail
    assert run.facts.get("error_code") == code
    if answer:
        (_, kind, mail), = ports.mail.sent
        req = email.message_from_bytes(raw, policy=policy.default)
        assert kind == "eeb_fehler" and mail.in_reply_to == req["Message-ID"].strip()
        assert parse_fehler_nachricht(parse_mail(mail.raw).single_attachment().data).code == answer
        assert mail.recipients == [parse_mail(raw).reply_address]
    else:
        assert not ports.mail.sent
        assert ports.core.count("eeb_received") == 1


async def test_run_step_never_raises(ports):
    from protocols.kim.messages import StepOrder

    order = StepOrder(mail_id="m1", step="load_raw", roadmap="eau", roadmap_version=2, mailbox="x", blobs={"raw": "mail/ab/" + "0" * 30})
    res = await run_step(order, ports)
    # a lost blob is our fault, never the sender's: retried, then parked for an operator
    assert res.error and res.error.code == "blob_missing" and res.error.retryable
    res = await run_step(order.model_copy(update={"blobs": {"raw": "not-a-blob-ref"}}), ports)
    assert res.error.code == "blob_missing" and res.error.retryable
    res = await run_step(order.model_copy(update={"step": "no_such_step", "roadmap": "none"}), ports)
    assert res.error.code == "unknown_step"
    res = await run_step(order.model_copy(update={"step": "parse_mime", "blobs": {}}), ports)
    assert res.error.code == "blob_missing"


async def test_eau_v11_is_accepted_during_transition(ports, pki):
    from protocols.kim.generator import MailGenerator

    gm = MailGenerator(11, pki=pki, eau_version="V1.1").eau()
    run = await run_mail_inline(gm.raw, ports)
    assert run.roadmap == "eau" and run.terminal == "@done" and run.facts["dk_version"] == "V1.1"


async def test_misrouted_mail_goes_to_a_clerk(ports, gen):
    run = await run_mail_inline(gen.eeb_anfrage().raw, ports, roadmap="eau")
    assert run.terminal == "@workbasket" and run.facts["misrouted_to"] == "eeb_anfrage"
    assert ports.core.records("workbasket")[0]["record"]["queue"] == "eeb_anfrage-clearing"
