"""Side-effect ports of the HL7 kinds (built once per shard host).

The MOPED bearer token lives here, read once per bridge host from the settings'
``moped_token_file`` / ``AUTOMAT_HL7_MOPED_TOKEN`` (see ``Hl7Settings.moped_bearer_token``):
it is never part of a message, of entity state in Redis, of a dead letter or of an event.
"""

from __future__ import annotations


class BridgePorts:
    def __init__(self, cfg, token: str | None = None) -> None:
        import httpx

        from actors.hl7.settings import load_hl7_settings

        self.http = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0))
        self.token = token if token is not None else load_hl7_settings(cfg).moped_bearer_token(cfg)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def aclose(self) -> None:
        await self.http.aclose()


def make_ports(cfg) -> BridgePorts:
    return BridgePorts(cfg)
