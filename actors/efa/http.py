"""The EFA HTTP API: a FastAPI ingress deployment on Ray Serve (OpenAPI at ``/openapi.json``
under the route prefix, e.g. ``/efa/openapi.json``; Swagger UI at ``/efa/docs``).

Every call but ``POST /context`` carries ``Authorization: Bearer <context_id>``; it is
verified each time (signature, expiry, revocation). Errors are ``{"error": code,
"message": ...}`` with the status of :data:`protocols.efa.rules.HTTP_STATUS`.

Deploy: ``serve.run(build_app(cfg), name="efa", route_prefix="/efa")``.
"""


from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from protocols.efa import api
from protocols.efa.rules import Refusal

ERRORS = {s: {"model": api.ErrorOut} for s in (401, 403, 404, 409, 413, 422, 503)}

app = FastAPI(
    title="automat EFA 2.0 provider",
    version="1.0",
    description="Elektronische Fallakte: context manager, resource manager, document registry and repository. "
                "Operations follow the EFA 2.0 logical spec (createECR, createPartition, closeECR, listPartitions, "
                "provideData, listPartitionContent, retrieveData, registerConsent).",
)


@app.exception_handler(Refusal)
async def _refusal(request: Request, exc: Refusal):
    return JSONResponse(status_code=exc.http_status, content={"error": exc.code, "message": exc.message})


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    first = errs[0] if errs else {"loc": [], "msg": ""}
    return JSONResponse(status_code=422, content={
        "error": "invalid_input", "message": f"{'.'.join(map(str, first['loc']))}: {first['msg']}", "details": errs})


def _bearer(authorization: str | None = Header(None)) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(app)
class EfaIngress:
    def __init__(self, cfg) -> None:
        from actors.efa.service import EfaService

        self.cfg = cfg
        self._svc: EfaService | None = None

    @property
    def svc(self):
        if self._svc is None:  # the router needs the running event loop: build on first call
            from actors.efa.service import EfaService

            self._svc = EfaService(self.cfg)
        return self._svc

    async def _caller(self, token):
        return await self.svc.caller(token)

    # -- context manager -------------------------------------------------------------------
    @app.post("/context", response_model=api.ContextOut, responses=ERRORS, tags=["context"],
              summary="openContext: authenticate and get a context id (signed identity assertion)")
    async def open_context(self, cred: api.Credential) -> api.ContextOut:
        return self.svc.open_context(cred)

    @app.delete("/context", status_code=204, responses=ERRORS, tags=["context"],
                summary="closeContext: revoke the context's assertion")
    async def close_context(self, token: str | None = Depends(_bearer)):
        if not token:
            raise Refusal("missing_token", "no context")
        await self.svc.close_context(token)

    # -- resource manager ---------------------------------------------------------------------
    @app.post("/records", response_model=api.CreatedOut, responses=ERRORS, tags=["records"],
              summary="createECR: new record, or merge into the record of the same patient and purpose")
    async def create_ecr(self, body: api.CreateECRBody, token: str | None = Depends(_bearer)):
        return await self.svc.create_ecr(await self._caller(token), body)

    @app.post("/records/{ecr_ref}/partitions", response_model=api.CreatedOut, responses=ERRORS, tags=["records"],
              summary="createPartition (participants only; may carry documents)")
    async def create_partition(self, ecr_ref: str, body: api.CreatePartitionBody,
                               token: str | None = Depends(_bearer)):
        return await self.svc.create_partition(await self._caller(token), ecr_ref, body)

    @app.post("/records/{ecr_ref}/close", response_model=api.ClosedOut, responses=ERRORS, tags=["records"],
              summary="closeECR (participants only): reason and documents go to a partition")
    async def close_ecr(self, ecr_ref: str, body: api.CloseBody, token: str | None = Depends(_bearer)):
        return await self.svc.close_ecr(await self._caller(token), ecr_ref, body)

    @app.post("/records/{ecr_ref}/consent", response_model=api.ConsentOut, responses=ERRORS, tags=["records"],
              summary="registerConsent: a participant registers a new/extended (or revoked) consent")
    async def register_consent(self, ecr_ref: str, body: api.ConsentBody, token: str | None = Depends(_bearer)):
        return await self.svc.register_consent(await self._caller(token), ecr_ref, body)

    @app.get("/records/{ecr_ref}/policy", response_model=api.PolicyOut, responses=ERRORS, tags=["policy"],
             summary="policy provider: the caller's rights on a record")
    async def policy(self, ecr_ref: str, token: str | None = Depends(_bearer)):
        return await self.svc.policy(await self._caller(token), ecr_ref)

    @app.post("/partitions/query", response_model=api.PartitionsOut, responses=ERRORS, tags=["records"],
              summary="listPartitions(patient): partitions of all records of the patient the caller may see")
    async def list_partitions(self, body: api.PatientQuery, token: str | None = Depends(_bearer)):
        return await self.svc.list_partitions(await self._caller(token), body.patient)

    # -- registry / repository -------------------------------------------------------------------
    @app.get("/partitions/{partition_id}/documents", response_model=api.ContentOut, responses=ERRORS,
             tags=["documents"], summary="listPartitionContent: document metadata and outgoing relationships")
    async def list_content(self, partition_id: str, token: str | None = Depends(_bearer)):
        return await self.svc.list_content(await self._caller(token), partition_id)

    @app.post("/partitions/{partition_id}/documents", response_model=api.ProvidedOut, responses=ERRORS,
              tags=["documents"], summary="provideData: store documents, register metadata and relationships")
    async def provide(self, partition_id: str, body: api.ProvideBody, token: str | None = Depends(_bearer)):
        return await self.svc.provide(await self._caller(token), partition_id, body)

    @app.post("/documents/retrieve", response_model=api.RetrievedOut, responses=ERRORS, tags=["documents"],
              summary="retrieveData: the documents, if the caller may access their records")
    async def retrieve(self, body: api.RetrieveBody, token: str | None = Depends(_bearer)):
        return await self.svc.retrieve(await self._caller(token), body.document_ids)


def build_app(cfg, replicas: int = 1, *, access_log: bool = True):
    opts = {"num_replicas": replicas}
    if not access_log:
        opts["logging_config"] = {"enable_access_log": False}
    return EfaIngress.options(**opts).bind(cfg)
