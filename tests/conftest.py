"""Shared fixtures.

- ``cfg``          session: ``load_config(run_dir=<repo>/.run)`` (``AUTOMAT_RUN_DIR`` still wins)
- ``stack``        session: the local stack (``deploy.stack.LocalStack``) up; stopped at the end
                   only if this session started it and no other test session still uses it
- ``redis_client`` function: ``redis.asyncio.Redis`` on the stack (bytes, not decoded);
                   flushes nothing - use ``key_prefix`` for your keys
- ``key_prefix``   function: a unique ``test:<hex>:`` prefix for Redis keys / topics / ids
- ``ray_session``  session: one local Ray (namespace ``automat``, 4 CPUs, no dashboard,
                   ``RAY_AUTH_MODE=disabled``); workers import this checkout
Tests under ``tests/integration`` get the ``integration`` marker automatically.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    integration_dir = REPO / "tests" / "integration"
    for item in items:
        if integration_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cfg():
    from actors.runtime.config import load_config

    return load_config(run_dir=REPO / ".run")


@pytest.fixture(scope="session")
def stack(cfg):
    from deploy.stack import LocalStack

    st = LocalStack(cfg)
    with st.shared(owner=f"pytest:{os.getpid()}"):
        yield st


@pytest.fixture
async def redis_client(stack, cfg):
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(cfg.redis.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def key_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def ray_session(cfg):
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach to some other cluster
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    os.environ["PYTHONPATH"] = pythonpath
    env_vars = {
        "PYTHONPATH": pythonpath,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AUTOMAT_RUN_DIR": str(cfg.run_dir),
    }
    if os.environ.get("AUTOMAT_CONFIG"):
        env_vars["AUTOMAT_CONFIG"] = os.environ["AUTOMAT_CONFIG"]
    # Ray waits a fixed 30 s for its raylet to register; on a busy 2-core machine that can
    # run out, so a start that timed out is retried (any other error is raised at once)
    for attempt in range(4):
        try:
            ray.init(
                address="local",
                namespace=cfg.runtime.namespace,
                num_cpus=4,
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=True,
                runtime_env={"env_vars": env_vars},
            )
            break
        except Exception as e:
            if attempt == 3 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            time.sleep(5)

    def probe_worker() -> dict:  # nested: pickled by value, conftest is not importable there
        import actors
        import deploy
        import protocols
        import supervisors

        mods = {"actors": actors, "deploy": deploy, "protocols": protocols, "supervisors": supervisors}
        out = {name: m.__file__ for name, m in mods.items()}
        out["auth_mode"] = os.environ.get("RAY_AUTH_MODE")
        return out

    try:
        seen = ray.get(ray.remote(probe_worker).remote(), timeout=120)
        for pkg in ("actors", "deploy", "protocols", "supervisors"):
            assert Path(seen[pkg]).resolve().is_relative_to(REPO), (
                f"Ray workers import {pkg} from {seen[pkg]}, not from this checkout {REPO}"
            )
        assert seen["auth_mode"] == "disabled", seen
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_session(ray_session):
    """Ray Serve's HTTP proxy on 127.0.0.1:18000 for the session; yields the base URL.

    Capabilities deploy their apps with ``serve.run(app, name=..., route_prefix=...)``.
    """
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": 18000})
    try:
        yield "http://127.0.0.1:18000"
    finally:
        serve.shutdown()
