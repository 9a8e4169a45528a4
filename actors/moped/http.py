"""The MOPED FHIR R5 REST endpoint: a Ray Serve deployment with a FastAPI ingress.

Routes (under the app's route prefix, e.g. ``/moped``)::

    POST /$aufnehmen                                   create a case (Composition v1)
    POST /Composition/{id}/_history/{vid}/$op          $update $anfragen $antworten $entlassen
                                                       $abrechnen $entscheiden $melden
    GET  /Composition/{id}[/_history[/{vid}]]          read, history, vread
    GET  /Composition/{id}/$document                   Composition + the case's resources
    GET  /Provenance?target=Composition/{id}[/_history/{vid}]
    GET  /metadata                                     CapabilityStatement

Callers authenticate with ``Authorization: Bearer <token>``; the token names the calling
Device and its Organization (``MopedConfig.tokens``), which become Provenance.agent.
Every answer is FHIR JSON; errors are OperationOutcomes.
"""



import re
import uuid
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from actors.moped.composition import KIND
from actors.moped.config import MopedConfig
from protocols.moped import codes
from protocols.moped.fhirio import MopedError, http_status, operation_outcome, parse_operation_body
from protocols.moped.messages import (
    Caller,
    Issue,
    OpResult,
    Operate,
    ReadComposition,
    ReadDocument,
    ReadHistory,
    ReadProvenance,
    ReadResult,
)

FHIR_JSON = "application/fhir+json"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

api = FastAPI(title="automat MOPED (FHIR R5)", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "exception")
    return JSONResponse(operation_outcome([Issue(code=code, rule="http", message=f"{request.method} "
                                                 f"{request.url.path}: {exc.detail}")]),
                        status_code=exc.status_code, media_type=FHIR_JSON)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def outcome(status: int, issues: list[Issue], headers: dict[str, str] | None = None) -> JSONResponse:
    return fhir(operation_outcome(issues), status, headers)


def _err(status: int, code: str, message: str, rule: str = "", expression: str = "") -> JSONResponse:
    return outcome(status, [Issue(code=code, message=message, rule=rule, expression=expression)])


def capability_statement(base: str = "") -> dict[str, Any]:
    ops = [{"name": op, "definition": f"{codes.AUTOMAT_BASE}/OperationDefinition/moped-{op}"}
           for op in codes.INSTANCE_OPS]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "publisher": "automat",
        "kind": "instance",
        "implementation": {"description": "automat MOPED billing cases", **({"url": base} if base else {})},
        "fhirVersion": "5.0.0",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {"description": "Authorization: Bearer <token> naming the calling Device and Organization"},
            "resource": [
                {"type": "Composition",
                 "versioning": "versioned",
                 "readHistory": True,
                 "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "history-instance"}],
                 "operation": ops + [{"name": "document",
                                      "definition": "http://hl7.org/fhir/OperationDefinition/Composition-document"}]},
                {"type": "Provenance",
                 "interaction": [{"code": "search-type"}],
                 "searchParam": [{"name": "target", "type": "reference"}]},
            ],
            "operation": [{"name": "aufnehmen", "definition": f"{codes.AUTOMAT_BASE}/OperationDefinition/moped-aufnehmen"}],
        }],
    }


def _bundle(btype: str, resources: list[dict[str, Any]], base: str, history: list[dict] | None = None) -> dict[str, Any]:
    entries = []
    for i, r in enumerate(resources):
        e: dict[str, Any] = {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r}
        if btype == "searchset":
            e["search"] = {"mode": "match"}
        if history is not None:
            h = history[i]
            e["request"] = {"method": "POST", "url": f"Composition/{r['id']}/_history/{h['vid'] - 1}/${h['activity']}"
                            if h["activity"] != "aufnehmen" else "$aufnehmen"}
            e["response"] = {"status": "201 Created" if h["vid"] == 1 else "200 OK",
                             "etag": f'W/"{h["vid"]}"', "lastModified": h["recorded"]}
        entries.append(e)
    b: dict[str, Any] = {"resourceType": "Bundle", "type": btype, "timestamp": _now(), "entry": entries}
    if btype in ("searchset", "history"):
        b["total"] = len(entries)
    return b


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
@serve.ingress(api)
class MopedIngress:
    def __init__(self, cfg, mcfg: dict | None = None) -> None:
        self.cfg = cfg
        self.mcfg = MopedConfig(**(mcfg or {}))
        self.callers: dict[str, Caller] = self.mcfg.callers(cfg)
        self._router = None

    def router(self):
        if self._router is None:
            from actors.runtime.router import Router

            self._router = Router(self.cfg)
        return self._router

    # -- helpers ----------------------------------------------------------------------
    def _caller(self, request: Request) -> Caller | None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return self.callers.get(token.strip())

    def _base(self, request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def _body(self, request: Request) -> bytes:
        limit = self.mcfg.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise MopedError(413, [Issue(code="too-costly", rule="body-size",
                                         message=f"body of {cl} bytes exceeds the limit of {limit}")])
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise MopedError(413, [Issue(code="too-costly", rule="body-size",
                                             message=f"body exceeds the limit of {limit} bytes")])
        return bytes(buf)

    async def _ask(self, key: str, msg) -> Any:
        from actors.runtime.router import EntityError

        try:
            return await self.router().ask(KIND, key, msg)
        except EntityError as e:
            return e

    async def _operate(self, request: Request, case_id: str, op: str, vid: int | None) -> JSONResponse:
        caller = self._caller(request)
        if caller is None:
            return _err(401, "login", "missing or unknown bearer token", rule="authentication")
        try:
            raw = await self._body(request)
            entries, aviso = parse_operation_body(raw, op)
        except MopedError as e:
            return outcome(e.status, e.issues)
        msg = Operate(op=op, vid=vid, entries=entries, caller=caller, at=_now(), aviso=aviso)
        r = await self._ask(case_id, msg)
        if not isinstance(r, OpResult):
            return _err(503, "transient", f"the case could not be reached: {r}", rule="unavailable")
        base = self._base(request)
        if r.code == "ok":
            loc = f"{base}/Composition/{case_id}/_history/{r.vid}"
            info = [Issue(severity="information", code="informational", rule=f"${op}",
                          expression="Composition", message=f"Composition/{case_id}/_history/{r.vid} ({r.workflow})")]
            return outcome(201 if op == "aufnehmen" else 200, info + r.issues,
                           {"Location": loc, "ETag": f'W/"{r.vid}"'})
        status = http_status(r.code, self.mcfg.conflict_status)
        headers = {"ETag": f'W/"{r.vid}"'} if r.code == "conflict" and r.vid else None
        return outcome(status, r.issues, headers)

    async def _read(self, case_id: str, msg) -> ReadResult | JSONResponse:
        if not _UUID.match(case_id):
            return _err(404, "not-found", f"no case Composition/{case_id}", rule="case")
        r = await self._ask(case_id, msg)
        if not isinstance(r, ReadResult):
            return _err(503, "transient", f"the case could not be reached: {r}", rule="unavailable")
        if not r.found:
            return _err(404, "not-found", f"no case Composition/{case_id}", rule="case")
        return r

    # -- routes -----------------------------------------------------------------------
    @api.get("/metadata")
    async def metadata(self, request: Request) -> JSONResponse:
        return fhir(capability_statement(self._base(request)))

    @api.post("/$aufnehmen")
    async def aufnehmen(self, request: Request) -> JSONResponse:
        return await self._operate(request, str(uuid.uuid4()), "aufnehmen", None)

    @api.post("/Composition/{case_id}/_history/{vid}/{op}")
    async def instance_op(self, request: Request, case_id: str, vid: str, op: str) -> JSONResponse:
        if self._caller(request) is None:
            return _err(401, "login", "missing or unknown bearer token", rule="authentication")
        name = op[1:] if op.startswith("$") else ""
        if name not in codes.INSTANCE_OPS:
            return _err(400, "not-supported", f"unknown operation {op!r} on Composition "
                        f"(supported: {', '.join('$' + o for o in codes.INSTANCE_OPS)})", rule="operation")
        if not vid.isdigit() or int(vid) < 1:
            return _err(400, "value", f"version {vid!r} is not a version id", rule="version",
                        expression="Composition.meta.versionId")
        if not _UUID.match(case_id):
            return _err(404, "not-found", f"no case Composition/{case_id}", rule="case")
        return await self._operate(request, case_id, name, int(vid))

    @api.post("/Composition/{case_id}/{op}")
    async def unversioned_op(self, request: Request, case_id: str, op: str) -> JSONResponse:
        if self._caller(request) is None:
            return _err(401, "login", "missing or unknown bearer token", rule="authentication")
        return _err(400, "required", f"operations are only accepted as Composition/{case_id}/_history/{{vid}}/{op}: "
                    "the version is required (optimistic version control)", rule="version",
                    expression="Composition.meta.versionId")

    @api.get("/Composition/{case_id}")
    async def read(self, request: Request, case_id: str) -> JSONResponse:
        if self._caller(request) is None:
            return _err(401, "login", "missing or unknown bearer token", rule="authentication")
        r = await self._read(case_id, ReadComposition())
        if isinstance(r, JSONResponse):
            return r
        return fhir(r.items[0], headers={"ETag": f'W/"{r.current_vid}"'})

    @api.get("/Composition/{case_id}/$document")
    async def document(self, request: Request, case_id: str) -> JSONResponse:
        if self._caller(request) is None:
            return _err(401, "login", "missing or unknown bearer token", rule="authentication")
        r = await self._read(case_id, ReadDocument())
        if isinstance(r, JSONResponse):
            return r
        b = _bundle("document", r.items, self._base(request))
        b["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{case_id}"}
        return fhir(b)

    @api.get("/Composition/{case_id}/_history")
    async def history(self, request: Request, case_id: str) -> JSONResponse:
        if self._caller(request) is None:
            return _err(401, "login", "missing or unknown bearer token", rule="authentication")
        r = await self._read(case_id, ReadHistory())
        if isinstance(r, JSONResponse):
            return r
        return fhir(_bundle("history", [h["composition"] for h in r.items], self._base(request), history=r.items))

    @api.get("/Composition/{case_id}/_history/{vid}")
    async def vread(self, request: Request, case_id: str, vid: str) -> JSONResponse:
        if self._caller(request) is None:
            return _err(401, "login", "missing or unknown bearer token", rule="authentication")
        if not vid.isdigit():
            return _err(400, "value", f"version {vid!r} is not a version id", rule="version")
        r = await self._read(case_id, ReadComposition(vid=int(vid)))
        if isinstance(r, JSONResponse):
            return r
        if not r.items:
            return _err(404, "not-found", f"Composition/{case_id} has no version {vid} (current {r.current_vid})",
                        rule="version")
        return fhir(r.items[0], headers={"ETag": f'W/"{vid}"'})

    @api.get("/Provenance")
    async def provenance(self, request: Request, target: str = "") -> JSONResponse:
        if self._caller(request) is None:
            return _err(401, "login", "missing or unknown bearer token", rule="authentication")
        m = re.match(r"^(?:.*/)?Composition/([^/]+)(?:/_history/(\d+))?$", target)
        if not m:
            return _err(400, "value", "search by target=Composition/{id}[/_history/{vid}]", rule="search",
                        expression="Provenance.target")
        case_id, vid = m.group(1), m.group(2)
        base = self._base(request)
        if not _UUID.match(case_id):
            return fhir(_bundle("searchset", [], base))
        r = await self._ask(case_id, ReadProvenance(vid=int(vid) if vid else None))
        if not isinstance(r, ReadResult):
            return _err(503, "transient", f"the case could not be reached: {r}", rule="unavailable")
        return fhir(_bundle("searchset", r.items, base))


def deployment(cfg, mcfg: MopedConfig | None = None):
    """The bound Serve application: ``serve.run(deployment(cfg), name="moped", route_prefix="/moped")``."""
    m = mcfg or MopedConfig()
    return MopedIngress.options(num_replicas=m.replicas).bind(cfg, m.model_dump(mode="json"))
