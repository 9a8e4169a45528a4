"""HTTP face of the simulated Terminservice (FastAPI): the same rules as the real one.

- ``POST /auth/token`` (form: client_id, client_secret) -> JSON bearer token
- ``POST /fhir/<Type>/_search`` (form or query parameters; next pages: POST to the link)
  ``GET`` searches -> 405 with an OperationOutcome
- ``GET /fhir/<Type>/<id>[/_history/<v>]``, ``POST /fhir/<Type>`` (create),
  ``PUT /fhir/Slot/<id>`` (status only), ``DELETE /fhir/<Type>/<id>``
- XML only: a JSON body -> 415, malformed XML / wrong profile -> 400 (OperationOutcome)
- ``/admin/*`` (JSON, not FHIR): faults, slowness, changes, state (tests and the demo)
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from deploy.sim_tss.sim import Practice, TerminService
from protocols.tss import resources as R
from protocols.tss.errors import TssProtocolError
from protocols.tss.resources import SYNC_TYPES, instant
from protocols.tss.xml import from_xml, to_xml

XML = "application/fhir+xml; charset=utf-8"
SEARCHABLE = set(SYNC_TYPES) | {"Provenance"}
WRITABLE = {"Schedule", "Slot", "Appointment"}


def xml(res: dict, status: int = 200) -> Response:
    return Response(to_xml(res), status_code=status, media_type=XML)


def outcome(status: int, code: str, text: str) -> Response:
    return xml(R.operation_outcome(code, text), status)


def make_app(sim: TerminService) -> FastAPI:
    app = FastAPI(title="116117 Terminservice simulator", docs_url=None, redoc_url=None)
    app.state.sim = sim

    async def guard(request: Request) -> Practice | Response:
        """Slowness, injected faults, bearer token -> the practice, or an error answer."""
        sim.requests += 1
        if sim.delay_s:
            await asyncio.sleep(sim.delay_s)
        f = sim.take_fault(request.url.path)
        if f is not None and f.status:
            if f.status == 401:
                return outcome(401, "login", "token expired or invalid")
            return outcome(f.status, "exception", f"injected fault {f.status}")
        auth = request.headers.get("authorization", "")
        p = sim.practice_of_token(auth[7:]) if auth.lower().startswith("bearer ") else None
        if p is None:
            return outcome(401, "login", "missing, expired or invalid bearer token")
        if f is not None and f.payload:
            request.state.bad_payload = f.payload
        return p

    def answer(request: Request, res: dict, status: int = 200) -> Response:
        bad = getattr(request.state, "bad_payload", None)
        if bad == "json":
            return Response(b'{"resourceType": "%s"}' % res["resourceType"].encode(), status_code=status,
                            media_type="application/fhir+json")
        if bad == "malformed":
            return Response(to_xml(res)[:-7], status_code=status, media_type=XML)
        if bad == "wrong_profile":
            res = _strip_profile(res)
        return xml(res, status)

    async def body_resource(request: Request, rtype: str) -> dict | Response:
        ctype = request.headers.get("content-type", "")
        if "json" in ctype:
            return outcome(415, "not-supported", "JSON is not supported; send FHIR XML (application/fhir+xml)")
        try:
            res = from_xml(await request.body(), content_type=ctype)
            if res.get("resourceType") != rtype:
                return outcome(400, "invalid", f"expected a {rtype}, got {res.get('resourceType')}")
            R.check_resource(res, need_id=False)
        except TssProtocolError as e:
            return outcome(400, "structure" if e.code != "wrong_profile" else "invalid", f"{e.code}: {e}")
        return res

    @app.post("/auth/token")
    async def token(request: Request) -> Response:
        form = await _form(request)
        tok = sim.issue_token(str(form.get("client_id", "")), str(form.get("client_secret", "")))
        if tok is None:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        return JSONResponse({"access_token": tok, "token_type": "Bearer", "expires_in": 3600})

    @app.post("/fhir/{rtype}/_search")
    async def search(rtype: str, request: Request) -> Response:
        p = await guard(request)
        if isinstance(p, Response):
            return p
        if rtype not in SEARCHABLE:
            return outcome(400, "not-supported", f"search on {rtype} is not supported")
        ctype = request.headers.get("content-type", "")
        params: dict[str, Any] = dict(request.query_params)
        if ctype.startswith("application/x-www-form-urlencoded"):
            params.update(await _form(request))
        elif ctype and "json" in ctype:
            return outcome(415, "not-supported", "JSON is not supported")
        first_page = "_after" not in params
        if rtype == "Provenance" and first_page and not sim.note_poll(p):
            nb = instant(p.last_poll + sim.poll_interval_s)
            return outcome(429, "throttled", f"Provenance polled again within {sim.poll_interval_s:.0f} s; "
                                             f"next poll allowed from {nb}")
        now = instant(sim.clock())
        matches, includes, nxt = sim.search(p, rtype, params)
        base = str(request.base_url).rstrip("/") + f"/fhir/{rtype}/_search"
        keep = {k: v for k, v in params.items() if k != "_after"}
        next_url = f"{base}?{urlencode({**keep, '_after': nxt})}" if nxt else None
        self_url = f"{base}?{urlencode(params)}" if params else base
        return answer(request, R.searchset(matches, timestamp=now, self_url=self_url, next_url=next_url,
                                           included=includes))

    @app.get("/fhir/{rtype}/_search")
    @app.get("/fhir/{rtype}")
    async def get_search(rtype: str) -> Response:
        return outcome(405, "not-supported", "searches are POST [base]/<Type>/_search only (next pages too)")

    @app.get("/fhir/{rtype}/{rid}")
    async def read(rtype: str, rid: str, request: Request) -> Response:
        p = await guard(request)
        if isinstance(p, Response):
            return p
        res = p.current.get(f"{rtype}/{rid}")
        if res is None:
            gone = f"{rtype}/{rid}" in p.versions
            return outcome(410 if gone else 404, "deleted" if gone else "not-found", f"{rtype}/{rid} "
                           + ("was deleted" if gone else "is unknown"))
        return answer(request, res)

    @app.get("/fhir/{rtype}/{rid}/_history/{vid}")
    async def vread(rtype: str, rid: str, vid: int, request: Request) -> Response:
        p = await guard(request)
        if isinstance(p, Response):
            return p
        res = p.history.get((f"{rtype}/{rid}", vid))
        if res is None:
            return outcome(404, "not-found", f"{rtype}/{rid}/_history/{vid} is unknown")
        return answer(request, res)

    @app.post("/fhir/{rtype}")
    async def create(rtype: str, request: Request) -> Response:
        p = await guard(request)
        if isinstance(p, Response):
            return p
        if rtype not in WRITABLE:
            return outcome(405, "not-supported", f"a TVS cannot create {rtype}")
        res = await body_resource(request, rtype)
        if isinstance(res, Response):
            return res
        res.pop("id", None)
        err = _check_refs(p, res)
        if err:
            return outcome(400, "invalid", err)
        out = sim.change(p, "CREATE", res, agent="practice")
        if rtype == "Appointment":
            for s in res.get("slot") or []:
                cur = p.current.get(s["reference"])
                if cur is not None and cur["status"] == "free":
                    sim.change(p, "UPDATE", dict(cur, status="busy"), key=s["reference"], agent="116117")
        return answer(request, out, 201)

    @app.put("/fhir/{rtype}/{rid}")
    async def update(rtype: str, rid: str, request: Request) -> Response:
        p = await guard(request)
        if isinstance(p, Response):
            return p
        if rtype != "Slot":
            return outcome(405, "not-supported", f"{rtype} cannot be changed; delete it and create it again")
        res = await body_resource(request, rtype)
        if isinstance(res, Response):
            return res
        cur = p.current.get(f"Slot/{rid}")
        if cur is None:
            return outcome(404, "not-found", f"Slot/{rid} is unknown")
        if not R.only_status_differs(cur, res):
            return outcome(400, "business-rule", "only Slot.status may be changed; delete and recreate the slot")
        if res["status"] == cur["status"]:
            return answer(request, cur)
        return answer(request, sim.change(p, "UPDATE", dict(cur, status=res["status"]), key=f"Slot/{rid}",
                                          agent="practice"))

    @app.delete("/fhir/{rtype}/{rid}")
    async def delete(rtype: str, rid: str, request: Request) -> Response:
        p = await guard(request)
        if isinstance(p, Response):
            return p
        if rtype not in WRITABLE:
            return outcome(405, "not-supported", f"a TVS cannot delete {rtype}")
        if f"{rtype}/{rid}" not in p.current:
            return Response(status_code=204)
        sim.change(p, "DELETE", key=f"{rtype}/{rid}", agent="practice")
        return Response(status_code=204)

    # -- admin (JSON) -----------------------------------------------------------------------------
    @app.post("/admin/fault")
    async def admin_fault(body: dict) -> dict:
        sim.inject(status=body.get("status"), payload=body.get("payload"), count=int(body.get("count", 1)),
                   paths=body.get("paths", ""))
        return {"faults": len(sim.faults)}

    @app.post("/admin/delay")
    async def admin_delay(body: dict) -> dict:
        sim.delay_s = float(body.get("seconds", 0))
        return {"delay_s": sim.delay_s}

    @app.post("/admin/mutate")
    async def admin_mutate(body: dict) -> dict:
        return {"changes": sim.mutate(int(body.get("count", 1)), body.get("practices"))}

    @app.post("/admin/revoke")
    async def admin_revoke() -> dict:
        sim.revoke_tokens()
        return {"revoked": True}

    @app.get("/admin/practices")
    async def admin_practices() -> dict:
        return {pid: {"client_id": p.client_id, "secret": p.secret, "resources": len(p.current),
                      "provenance": len(p.provenance), "polls": p.polls} for pid, p in sim.practices.items()}

    @app.get("/admin/stats")
    async def admin_stats() -> dict:
        return {"practices": len(sim.practices), "requests": sim.requests, "violations": len(sim.violations),
                "faults": len(sim.faults)}

    return app


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (no python-multipart needed)."""
    return dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))


def _strip_profile(res: dict) -> dict:
    out = dict(res)
    out["meta"] = {k: v for k, v in (res.get("meta") or {}).items() if k != "profile"}
    out["meta"]["profile"] = ["http://example.org/StructureDefinition/not-116117"]
    if res.get("resourceType") == "Bundle":
        out["entry"] = [dict(e, resource=_strip_profile(e["resource"])) for e in res.get("entry") or []]
        out["meta"] = res["meta"]
    return out


def _check_refs(p: Practice, res: dict) -> str | None:
    if res["resourceType"] == "Slot":
        if res["schedule"]["reference"] not in p.current:
            return f"Slot.schedule {res['schedule']['reference']} is not a Terminprofil of this practice"
    if res["resourceType"] == "Appointment":
        for s in res.get("slot") or []:
            if s.get("reference") not in p.current:
                return f"Appointment.slot {s.get('reference')} is unknown"
    return None
