"""The application: the root supervision tree, assembled from the capabilities.

Every capability folder ``actors/<cap>/`` offers an ``app.py`` with

- ``kinds(cfg) -> list[EntityKind]``           its entity kinds (registered for routing)
- ``supervisor_spec(cfg) -> SupervisorSpec``   its subtree (shard hosts, pools, listeners)
- optionally ``async demo(cfg, router, console)`` what ``make run`` shows of it

and is listed in ``CAPABILITIES``. ``deploy`` is the only room that imports them all.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import time

from rich.console import Console

from actors.runtime.config import AutomatConfig
from actors.runtime.kinds import EntityKind
from supervisors.spec import ChildSpec, SupervisorSpec

log = logging.getLogger("automat.app")

#: capability modules, in start order (a module that does not exist yet is skipped)
CAPABILITIES = ["actors.kim.app", "actors.efa.app", "actors.moped.app", "actors.hl7.app", "actors.tss.app"]


def capability_modules() -> list:
    mods = []
    for name in CAPABILITIES:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # capability not built (yet)
            raise
    return mods


def all_kinds(cfg: AutomatConfig) -> list[EntityKind]:
    out: list[EntityKind] = []
    for m in capability_modules():
        out.extend(m.kinds(cfg))
    return out


def infra_spec(cfg: AutomatConfig) -> SupervisorSpec:
    children = [
        ChildSpec(name="outbox.relay", actor="actors.runtime.outbox:OutboxRelay", args=[cfg],
                  options={"num_cpus": 0}),
    ]
    if cfg.autoscale.enabled:  # grows/shrinks step pools and shard hosts, asks Ray for nodes
        children.append(ChildSpec(name="autoscaler", actor="actors.runtime.autoscaler:Autoscaler", args=[cfg],
                                  options={"num_cpus": 0}))
    return SupervisorSpec(name="infra", strategy="one_for_one", children=children)


def pin_control(spec: SupervisorSpec, resource: str | None) -> SupervisorSpec:
    """On a cluster (``runtime.control_resource``): the supervisors of a subtree and its
    plain control children (num_cpus 0: relay, autoscaler, mailbox actors) need a sliver
    of a resource only the head node has, so they stay there when a worker node dies."""
    if not resource:
        return spec
    need = {"resources": {resource: 0.001}}
    children = []
    for c in spec.children:
        if isinstance(c, SupervisorSpec):
            children.append(pin_control(c, resource))
        elif not c.options.get("num_cpus") and "resources" not in c.options \
                and c.actor != "actors.runtime.host:ShardHostActor":
            children.append(c.model_copy(update={"options": {**c.options, **need}}))
        else:
            children.append(c)
    return spec.model_copy(update={"options": {**spec.options, **need}, "children": children})


def root_spec(cfg: AutomatConfig) -> SupervisorSpec:
    children = [infra_spec(cfg)] + [m.supervisor_spec(cfg) for m in capability_modules()]
    return pin_control(SupervisorSpec(name="root", strategy="one_for_one", max_restarts=10, max_seconds=60,
                                      children=children), cfg.runtime.control_resource)


async def register_all(cfg: AutomatConfig) -> list[EntityKind]:
    import redis.asyncio as aioredis

    from actors.runtime.router import register_kinds

    kinds = all_kinds(cfg)
    r = aioredis.from_url(cfg.redis.url)
    try:
        await register_kinds(r, kinds)
    finally:
        await r.aclose()
    return kinds


def ray_env(cfg: AutomatConfig) -> dict:
    repo = os.getcwd()
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "AUTOMAT_RUN_DIR": str(cfg.run_dir),
        **({"AUTOMAT_CONFIG": os.environ["AUTOMAT_CONFIG"]} if os.environ.get("AUTOMAT_CONFIG") else {}),
    }


def start_ray(cfg: AutomatConfig, *, dashboard: bool = True) -> str:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray on 127.0.0.1."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(namespace=cfg.runtime.namespace, runtime_env={"env_vars": ray_env(cfg)})
    else:
        ctx = ray.init(
            address="local",  # a new local Ray: never attach to another one `ray start`ed here
            namespace=cfg.runtime.namespace,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=8265,
            runtime_env={"env_vars": ray_env(cfg)},
        )
    try:
        gcs = ctx.address_info.get("gcs_address") or ctx.address_info.get("address")
        if gcs:
            (cfg.run_dir / "ray.address").write_text(gcs + "\n")
    except Exception:  # informational only
        pass
    return getattr(ctx, "dashboard_url", "") or ""


def quiet_serve(port: int = 8000) -> None:
    """Start Ray Serve (HTTP on 127.0.0.1:``port``) with warnings only and no access log,
    so the demos' own output stays readable; later ``serve.start`` calls reuse it."""
    from ray import serve

    for name in ("ray.serve", "ray.serve.api"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
    except Exception as e:  # port taken etc.: the demos report it themselves
        logging.getLogger("automat.app").warning("serve not started: %s", e)


def use_running_cluster(cfg: AutomatConfig) -> None:
    """For operator commands: point at the cluster ``automat run`` started (unless
    ``RAY_ADDRESS`` says otherwise), so they never attach to some other local Ray."""
    f = cfg.run_dir / "ray.address"
    if not os.environ.get("RAY_ADDRESS") and f.exists():
        os.environ["RAY_ADDRESS"] = f.read_text().strip()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


async def start_tree(cfg: AutomatConfig):
    from supervisors.supervisor import start_root

    await register_all(cfg)
    return await asyncio.to_thread(start_root, root_spec(cfg), namespace=cfg.runtime.namespace)


def run_main(cfg: AutomatConfig, *, demo: bool = True, duration_s: float | None = None,
             with_stack: bool = True) -> int:
    """``automat run``: local stack (if configured), Ray, the root tree, the demo job.

    Runs in the foreground until Ctrl-C (or ``duration_s``), then stops everything it
    started: the tree, Ray, and the local stack.
    """
    console = Console()
    logging.basicConfig(level=logging.WARNING)
    import contextlib

    lease = contextlib.nullcontext()
    if cfg.local_stack and with_stack:
        from deploy.stack import LocalStack

        console.print("[bold]local stack[/] starting (Redis, Tansu, Dovecot, SMTP) ...")
        # a lease: stopped at the end only if we started it and nobody else uses it
        lease = LocalStack(cfg).shared(owner="automat run")
    stop = asyncio.Event()

    async def main() -> int:
        import ray

        from actors.runtime.router import Router
        from supervisors.status import render_tree
        from supervisors.supervisor import stop_root

        t0 = time.monotonic()
        url = start_ray(cfg)
        console.print(f"[bold]ray[/] up; dashboard: http://{url}" if url else "[bold]ray[/] up")
        root = await start_tree(cfg)
        console.print(f"[bold]root tree[/] serving after {time.monotonic() - t0:.1f} s:")
        render_tree(await root.tree.remote(), console=console)
        console.print("`automat status` shows the tree from another terminal; Ctrl-C stops everything.")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        router = Router(cfg)
        try:
            if demo:
                quiet_serve()
                for m in capability_modules():
                    fn = getattr(m, "demo", None)
                    if fn is not None and not stop.is_set():
                        demo_task = asyncio.create_task(fn(cfg, router, console))
                        stopper = asyncio.create_task(stop.wait())
                        await asyncio.wait({demo_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                        stopper.cancel()
                        if not demo_task.done():
                            demo_task.cancel()
            if duration_s is not None:
                try:
                    await asyncio.wait_for(stop.wait(), duration_s)
                except asyncio.TimeoutError:
                    pass
            else:
                await stop.wait()
        finally:
            console.print("stopping the tree ...")
            await asyncio.to_thread(stop_root, namespace=cfg.runtime.namespace)
            ray.shutdown()
            (cfg.run_dir / "ray.address").unlink(missing_ok=True)
        return 0

    with lease:
        try:
            return asyncio.run(main())
        finally:
            console.print("stopped.")


if __name__ == "__main__":  # pragma: no cover
    from actors.runtime.config import load_config

    sys.exit(run_main(load_config()))
