"""Run the simulator with uvicorn on 127.0.0.1 (a thread for tests, or the foreground)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from deploy.sim_tss.app import make_app
from deploy.sim_tss.sim import TerminService


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimServer:
    """uvicorn serving ``make_app(sim)``; ``start()`` in a thread, ``stop()``."""

    def __init__(self, sim: TerminService, *, host: str = "127.0.0.1", port: int | None = None,
                 change_every_s: float = 0.0, changes_per_tick: int = 1) -> None:
        self.sim = sim
        self.host = host
        self.port = port or free_port()
        self.change_every_s = change_every_s
        self.changes_per_tick = changes_per_tick
        app = make_app(sim)
        if change_every_s > 0:
            @app.on_event("startup")
            async def _changes() -> None:
                asyncio.get_running_loop().create_task(self._change_loop())
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/fhir"

    async def _change_loop(self) -> None:
        while True:
            await asyncio.sleep(self.change_every_s)
            if self.sim.practices:
                self.sim.mutate(self.changes_per_tick)

    def start(self) -> "SimServer":
        self.thread = threading.Thread(target=self.server.run, name="sim-tss", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("Terminservice simulator did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread:
            self.thread.join(timeout=10)

    def run(self) -> None:
        self.server.run()
