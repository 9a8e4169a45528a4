"""Side-effect ports of the HL7 kinds (built once per shard host)."""

from __future__ import annotations


class BridgePorts:
    def __init__(self, cfg) -> None:
        import httpx

        self.http = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0))

    async def aclose(self) -> None:
        await self.http.aclose()


def make_ports(cfg) -> BridgePorts:
    return BridgePorts(cfg)
