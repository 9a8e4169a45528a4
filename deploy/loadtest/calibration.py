"""How fast this machine runs the step code right now - the load test's calibration.

A shared or virtual machine drifts: on the development machine the same code gave 90 and
65 mails/s an hour apart with nothing else running. Two load-test reports of different
hours therefore do not compare by mails/s alone. The calibration times the compute kernel
of a KIM mail's steps - MIME parse, CMS unwrap, signature and chain check, FHIR XML parse
and the eAU read-out, the pure ``protocols.kim`` functions the step workers call - on a
fixed set of generated eAU mails in one process, best of several rounds, while the
pipeline is not running (before it starts and after it stopped). ``mails/s x
calibration ms`` is then the pipeline's throughput in units of the machine's speed at the
time: it moves with the code, not with the machine.
"""

from __future__ import annotations

import time
from functools import lru_cache

from protocols.kim._fhirxml import parse_root
from protocols.kim.eau import parse_eau
from protocols.kim.errors import FhirPayloadError
from protocols.kim.mime import parse_mail
from protocols.kim.pkcs7 import unwrap_cms, verify_cms

#: generated eAU mails per round and rounds (best of): ~0.1 s a round on the 2-core machine
MAILS, ROUNDS = 40, 7


@lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[bytes, ...], object]:
    from protocols.kim.generator import MailGenerator, make_pki
    from protocols.kim.procedures import Procedure

    pki = make_pki(4242)
    gen = MailGenerator(4242, pki=pki)
    return tuple(gen.generate(Procedure.EAU_LIEFERUNG).raw for _ in range(MAILS)), pki.trust_store()


def kernel(raw: bytes, trust) -> int:
    """The compute-only part of one eAU's steps (what the worker does between the waits).
    Returns how many steps of the kernel passed (all of them for a good mail)."""
    mail = parse_mail(raw)
    sd = unwrap_cms(mail.single_attachment(suffix=".p7s").data)
    ok = int(verify_cms(sd, trust, at=sd.signing_time).valid)
    doc = parse_eau(sd.content, root=parse_root(sd.content, FhirPayloadError))
    return 2 + ok + int(doc is not None)


def calibrate(rounds: int = ROUNDS) -> dict:
    """``{"ms_per_mail": best round's CPU ms per mail, "spread": worst / best, ...}``.
    CPU time of this thread, so a process running next to it slows the result only
    through the shared caches, not by taking turns on the core."""
    raws, trust = _corpus()
    # the checks' memos (a CA's signature on a certificate, one CertInfo per certificate)
    # hold after the first mail, as in a worker that has seen the practice before
    for raw in raws[:2]:
        kernel(raw, trust)
    times = []
    for _ in range(max(1, rounds)):
        t = time.thread_time()
        passed = sum(kernel(raw, trust) for raw in raws)
        times.append((time.thread_time() - t) / len(raws) * 1000.0)
        if passed != 4 * len(raws):
            raise RuntimeError(f"calibration mails did not pass the kernel ({passed} of {4 * len(raws)} checks)")
    best = min(times)
    return {"ms_per_mail": round(best, 4), "spread": round(max(times) / best, 3), "mails": len(raws),
            "rounds": len(times)}


def kernel_cores(report: dict) -> float | None:
    """The run's throughput in units of the machine's speed at the time: ``mails/s x the
    kernel's ms per mail (mean of start and end) / 1000`` - how many cores' worth of the
    steps' compute kernel the pipeline got through per second. The machine's cores are the
    ceiling (a pipeline doing nothing but the kernel); what is missing to it is
    orchestration, I/O and the steps' own overhead. Two runs of different hours compare by
    it; ``None`` without a calibration."""
    cal = (report.get("machine") or {}).get("calibration") or {}
    ms = [c["ms_per_mail"] for c in (cal.get("start"), cal.get("end")) if c]
    mps = (report.get("throughput") or {}).get("mails_per_s")
    if not ms or not mps:
        return None
    return round(mps * (sum(ms) / len(ms)) / 1000.0, 4)
