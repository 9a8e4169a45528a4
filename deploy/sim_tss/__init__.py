"""Simulated 116117 Terminservice (``automat sim tss``), kept apart from the client.

``TerminService`` (``sim.py``) holds practices, resource versions and Provenance;
``make_app`` (``app.py``) serves the Terminservice rules over HTTP; ``SimServer``
(``server.py``) runs it with uvicorn on 127.0.0.1 in a thread (tests) or the foreground.
"""

from deploy.sim_tss.app import make_app
from deploy.sim_tss.server import SimServer
from deploy.sim_tss.sim import TerminService

__all__ = ["TerminService", "make_app", "SimServer"]
