"""Client for the 116117 Terminservice (TVS Terminsynchronisation) rules.

- FHIR R4 **XML only** (requests and responses; a JSON answer is a ``JsonNotXml`` error)
- searches are ``POST [base]/<Type>/_search`` (form body) only, next pages too
- bearer token from ``POST [auth]/token``; a 401 re-authenticates once and repeats
- 400/500 carry an OperationOutcome (``TssHttpError.outcome``); 200 + empty bundle = no match
- 5xx and timeouts are retried with exponential backoff (``retries``); a Provenance
  search (a *poll*) is never retried here: the caller decides when the next poll may run
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from protocols.tss.errors import JsonNotXml, TssProtocolError
from protocols.tss.resources import XML_TYPES, check_resource, outcome_text
from protocols.tss.xml import from_xml, to_xml

XML = "application/fhir+xml"


class TssError(Exception):
    code = "error"


class TssHttpError(TssError):
    """The Terminservice answered with an error status (OperationOutcome if it sent one)."""

    def __init__(self, status: int, message: str, outcome: dict | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.outcome = outcome
        self.code = {400: "bad_request", 401: "unauthorized", 404: "not_found", 410: "gone",
                     429: "too_many_requests"}.get(status, "server_error" if status >= 500 else "http_error")


class TssUnavailable(TssError):
    """Timeouts / connection errors / 5xx after all retries."""

    code = "unavailable"


class TssBadPayload(TssError):
    """The answer is not usable FHIR XML (malformed, JSON, wrong profile ...)."""

    def __init__(self, err: TssProtocolError) -> None:
        super().__init__(f"{err.code}: {err}")
        self.code = err.code
        self.cause = err


@dataclass(frozen=True)
class Credentials:
    base_url: str  # the FHIR base, e.g. http://127.0.0.1:8117/fhir
    client_id: str
    client_secret: str

    @property
    def token_url(self) -> str:
        p = urlsplit(self.base_url)
        return f"{p.scheme}://{p.netloc}/auth/token"


class TssClient:
    def __init__(self, http: httpx.AsyncClient, *, retries: int = 3, backoff_s: float = 0.2,
                 backoff_max_s: float = 5.0, sleep=asyncio.sleep) -> None:
        self.http = http
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._tokens: dict[tuple[str, str], str] = {}
        self.requests = 0

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- auth ------------------------------------------------------------------------------
    async def _token(self, c: Credentials, *, fresh: bool = False) -> str:
        k = (c.base_url, c.client_id)
        if not fresh and k in self._tokens:
            return self._tokens[k]
        self.requests += 1
        try:
            r = await self.http.post(c.token_url, data={"grant_type": "client_credentials",
                                                        "client_id": c.client_id,
                                                        "client_secret": c.client_secret})
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise TssUnavailable(f"token endpoint unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise TssHttpError(r.status_code, f"authentication failed at {c.token_url}: {r.text[:200]}")
        tok = r.json()["access_token"]
        self._tokens[k] = tok
        return tok

    # -- one exchange ------------------------------------------------------------------------
    async def _exchange(self, c: Credentials, method: str, url: str, *, form: dict | None = None,
                        body: bytes | None = None, retry: bool = True) -> tuple[int, dict | None]:
        attempts = (self.retries + 1) if retry else 1
        delay = self.backoff_s
        last: Exception | None = None
        reauthed = False
        i = 0
        while i < attempts:
            tok = await self._token(c)
            headers = {"Authorization": f"Bearer {tok}", "Accept": XML}
            if body is not None:
                headers["Content-Type"] = XML
            self.requests += 1
            try:
                r = await self.http.request(method, url, data=form, content=body, headers=headers)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = TssUnavailable(f"{method} {url}: {type(e).__name__}: {e}")
            else:
                if r.status_code == 401 and not reauthed:
                    reauthed = True  # token expired / revoked: authenticate again, same attempt
                    await self._token(c, fresh=True)
                    continue
                if r.status_code >= 500 or r.status_code == 429:
                    last = TssHttpError(r.status_code, self._error_text(r), self._outcome(r))
                elif r.status_code >= 400:
                    raise TssHttpError(r.status_code, self._error_text(r), self._outcome(r))
                else:
                    return r.status_code, (self._parse(r) if r.content else None)
            i += 1
            if i < attempts:
                await self._sleep(min(delay, self.backoff_max_s) * (0.5 + random.random() / 2))
                delay *= 2
        if isinstance(last, TssHttpError) and last.status < 500:
            raise last
        raise TssUnavailable(str(last)) if not isinstance(last, TssUnavailable) else last

    @staticmethod
    def _parse(r: httpx.Response) -> dict:
        ctype = r.headers.get("content-type", "")
        try:
            if ctype and not any(t in ctype for t in XML_TYPES):
                if "json" in ctype:
                    raise JsonNotXml(f"answer has content type {ctype!r}; the Terminservice speaks XML only")
            return from_xml(r.content, content_type=ctype)
        except TssProtocolError as e:
            raise TssBadPayload(e) from None

    def _outcome(self, r: httpx.Response) -> dict | None:
        try:
            oo = from_xml(r.content, content_type=r.headers.get("content-type"))
            return oo if oo.get("resourceType") == "OperationOutcome" else None
        except Exception:
            return None

    def _error_text(self, r: httpx.Response) -> str:
        oo = self._outcome(r)
        return outcome_text(oo) if oo else (r.text[:200] or r.reason_phrase)

    # -- the operations ------------------------------------------------------------------------
    async def search(self, c: Credentials, rtype: str, params: dict[str, Any] | None = None, *,
                     next_url: str | None = None, retry: bool = True) -> dict:
        """``POST <Type>/_search`` (or POST to a next-page link); returns the Bundle."""
        url = next_url or f"{c.base_url}/{rtype}/_search"
        _, b = await self._exchange(c, "POST", url, form=None if next_url else (params or {}), retry=retry)
        if b is None:
            raise TssBadPayload(TssProtocolError("empty answer to a search"))
        try:
            return check_resource(b, expect="Bundle", need_id=False)
        except TssProtocolError as e:
            raise TssBadPayload(e) from None

    async def read(self, c: Credentials, rtype: str, rid: str, version: int | None = None) -> dict:
        url = f"{c.base_url}/{rtype}/{rid}" + (f"/_history/{version}" if version is not None else "")
        _, res = await self._exchange(c, "GET", url)
        return self._checked(res, rtype)

    async def create(self, c: Credentials, resource: dict) -> dict:
        _, res = await self._exchange(c, "POST", f"{c.base_url}/{resource['resourceType']}",
                                      body=to_xml(resource), retry=False)
        return self._checked(res, resource["resourceType"])

    async def update(self, c: Credentials, resource: dict) -> dict:
        url = f"{c.base_url}/{resource['resourceType']}/{resource['id']}"
        _, res = await self._exchange(c, "PUT", url, body=to_xml(resource))
        return self._checked(res, resource["resourceType"])

    async def delete(self, c: Credentials, rtype: str, rid: str) -> None:
        await self._exchange(c, "DELETE", f"{c.base_url}/{rtype}/{rid}")

    @staticmethod
    def _checked(res: dict | None, rtype: str) -> dict:
        if res is None:
            raise TssBadPayload(TssProtocolError(f"empty answer, expected a {rtype}"))
        try:
            return check_resource(res, expect=rtype)
        except TssProtocolError as e:
            raise TssBadPayload(e) from None
