"""116117 appointment sync on Ray against the Terminservice simulator (uvicorn in a thread).

The practice entities' clock and the simulator's clock are the same controllable clock,
one per test (``<run_dir>/tss/clock-<run>.json``, so concurrent sessions and `automat run`
are not moved): moving it forward fires the durable poll timers.

CI syncs ``TSS_PRACTICES`` (default 100) practices; the full 1,000-practice run is
``automat bench tss --practices 1000`` (same flow, prints times, compares every store).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid

import pytest
import ray

from actors.runtime import system
from actors.runtime.router import Router, register_kinds
from actors.runtime.system import start_hosts
from actors.tss.app import configure_practices, practice_kind, wait_synced
from actors.tss.ports import clock_file, clock_offset, file_clock, set_clock_offset
from deploy.sim_tss import SimServer, TerminService
from protocols.tss.messages import GetStatus, GetStore, PollNow, PollRefused, StoreSnapshot, SyncStatus
from protocols.tss.xml import from_xml, to_xml

pytestmark = pytest.mark.integration

N_PRACTICES = int(os.environ.get("TSS_PRACTICES", "100"))


class Env:
    def __init__(self, cfg, sim, server, kind, handles, router, clock_name):
        self.cfg, self.sim, self.server, self.kind, self.handles, self.router = cfg, sim, server, kind, handles, router
        self.clock_name = clock_name
        self.owned: list = []
        self.clock = file_clock(clock_file(cfg, clock_name))

    def advance(self, s: float) -> None:
        set_clock_offset(self.cfg, clock_offset(self.cfg, self.clock_name) + s, self.clock_name)

    async def stores(self, keys):
        out = {}
        for _ in range(10):  # a host that is restarting answers Failure(unavailable): ask again
            todo = [k for k in keys if not isinstance(out.get(k), StoreSnapshot)]
            if not todo:
                break
            futs = [await self.router.send(self.kind.name, k, GetStore()) for k in todo]
            out.update(zip(todo, await asyncio.gather(*futs)))
            await asyncio.sleep(0.5 if len(out) < len(keys) else 0)
        bad = {k: v for k, v in out.items() if not isinstance(v, StoreSnapshot)}
        assert not bad, f"{len(bad)} practices did not answer, e.g. {next(iter(bad.items()))}"
        return out

    async def assert_equal_to_simulator(self, keys) -> None:
        stores = await self.stores(keys)
        bad = []
        for k in keys:
            want = {rk: from_xml(to_xml(v)) for rk, v in self.sim.snapshot(k).items()}
            if stores[k].resources != want:
                bad.append(k)
        assert not bad, f"{len(bad)} practices differ from the simulator, e.g. {bad[:3]}"
        for k in keys:
            ids = stores[k].applied_ids
            assert len(ids) == len(set(ids)), f"{k}: a change was applied twice"

    async def restart_host(self, index: int) -> None:
        """SIGKILL one shard host (no goodbye, in the middle of whatever it does), start it again."""
        name = self.kind.host_name(index)
        pid = await self.handles[index].pid.remote()
        os.kill(pid, signal.SIGKILL)
        ray.kill(self.handles[index])
        system._KEEP.pop(name, None)
        for _ in range(200):  # until Ray has forgotten the name (else get_if_exists finds the dead one)
            try:
                ray.get_actor(name, namespace=self.cfg.runtime.namespace)
            except ValueError:
                break
            await asyncio.sleep(0.05)
        # keep the owning handles: start_hosts finds the living hosts by name (a borrowed
        # handle), and a non-detached actor dies when its owner's last handle goes
        self.owned.extend(self.handles)
        self.handles = await asyncio.to_thread(start_hosts, self.cfg, self.kind)


@pytest.fixture
async def tss_env(cfg, stack, ray_session, redis_client):
    made = []

    async def make(n: int, *, slots: int = 4, appointments: int = 1):
        run = uuid.uuid4().hex[:6]
        sim = TerminService(clock=file_clock(clock_file(cfg, run)))
        for i in range(n):
            sim.add_practice(f"{run}-{i:04d}", slots=slots, appointments=appointments)
        server = SimServer(sim).start()
        kind = practice_kind(cfg, hosts=2, clock=run).model_copy(update={"name": f"t{run}.tss.practice"})
        await register_kinds(redis_client, [kind])
        handles = await asyncio.to_thread(start_hosts, cfg, kind)
        env = Env(cfg, sim, server, kind, handles, Router(cfg), run)
        made.append(env)
        return env

    yield make
    for env in made:
        await env.router.close()
        for h in env.handles:
            ray.kill(h)
        system._KEEP.pop(env.kind.host_name(0), None)
        system._KEEP.pop(env.kind.host_name(1), None)
        env.server.stop()
        for pattern in (f"automat:e:{env.kind.name}:*", f"automat:t:{env.kind.name}:*", f"automat:tp:{env.kind.name}:*"):
            keys = [k async for k in redis_client.scan_iter(match=pattern, count=1000)]
            for i in range(0, len(keys), 500):
                await redis_client.delete(*keys[i:i + 500])
        clock_file(cfg, env.clock_name).unlink(missing_ok=True)


def creds(sim):
    return {pid: {"client_id": p.client_id, "secret": p.secret} for pid, p in sim.practices.items()}


async def test_practices_initial_and_continuous_sync_equal_simulator(tss_env):
    env = await tss_env(N_PRACTICES)
    keys = list(env.sim.practices)
    t0 = time.monotonic()
    await configure_practices(env.router, env.server.base_url, creds(env.sim), kind=env.kind.name)
    sts = await wait_synced(env.router, keys, kind=env.kind.name, timeout_s=240)
    t_initial = time.monotonic() - t0
    assert all(s.initial_done for s in sts.values()), [k for k, s in sts.items() if not s.initial_done][:5]
    await env.assert_equal_to_simulator(keys)
    resources = sum(len(p.current) for p in env.sim.practices.values())
    # continuous sync: changes at the simulator, then the clock moves 5 minutes
    for round_ in range(2):
        env.sim.mutate(2 * len(keys))
        mark = env.clock()
        env.advance(300)
        t1 = time.monotonic()
        sts = await wait_synced(env.router, keys, kind=env.kind.name, timeout_s=240, after=mark)
        lagging = [k for k, s in sts.items() if (s.last_sync_at or 0) <= mark]
        assert not lagging, f"{len(lagging)} practices did not poll, e.g. {sts[lagging[0]]} (mark {mark})"
        await env.assert_equal_to_simulator(keys)
        print(f"\ntss: poll round {round_}: {len(keys)} practices in {time.monotonic() - t1:.1f}s")
    assert not env.sim.violations, env.sim.violations[:3]
    assert all(p.polls == 2 for p in env.sim.practices.values())
    print(f"tss: {len(keys)} practices ({resources} resources) initial sync in {t_initial:.1f}s; "
          f"{env.sim.requests} requests")


async def synced(env, keys, *, after: float = 0.0, timeout_s: float = 120.0) -> dict:
    """Every practice idle with a sync after ``after``; fails naming the ones that are not."""
    sts = await wait_synced(env.router, keys, timeout_s, after=after, kind=env.kind.name)
    behind = {k: s for k, s in sts.items()
              if getattr(s, "phase", None) != "idle" or (getattr(s, "last_sync_at", None) or 0) <= after}
    assert not behind, f"{len(behind)} practices not synced, e.g. {next(iter(behind.items()))}"
    return sts


async def until(cond, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_five_minute_rule_and_restart_during_paged_sync(tss_env):
    env = await tss_env(12, slots=9, appointments=3)
    keys = list(env.sim.practices)
    # initial sync, page size 2 (11 pages per practice): the host dies after 40 of ~130 pages
    await configure_practices(env.router, env.server.base_url, creds(env.sim), page_size=2, kind=env.kind.name)
    await until(lambda: env.sim.requests >= 40)
    await env.restart_host(0)
    await synced(env, keys)
    await env.assert_equal_to_simulator(keys)
    # continuous sync, paged: ~150 changes, the other host dies in the middle of the poll round
    env.sim.mutate(8 * len(keys))
    before = env.sim.requests
    mark = env.clock()
    env.advance(300)
    await until(lambda: env.sim.requests >= before + 20)
    await env.restart_host(1)
    sts = await wait_synced(env.router, keys, 120, kind=env.kind.name)  # idle again, some polls cut short
    assert all(s.phase == "idle" and (s.last_poll_at or 0) > mark for s in sts.values()), sts
    # manual poll right after: refused with the time it may run (also after the restart)
    r = await env.router.ask(env.kind.name, keys[0], PollNow())
    assert isinstance(r, PollRefused) and 0 < r.retry_in_s <= 300, r
    await env.restart_host(0)
    polls = {k: p.polls for k, p in env.sim.practices.items()}
    r = await env.router.ask(env.kind.name, keys[0], PollNow())
    assert isinstance(r, PollRefused), r
    await asyncio.sleep(1.0)  # timers keep to the interval after the restart too
    assert {k: p.polls for k, p in env.sim.practices.items()} == polls
    # an interrupted poll counts as a poll; one more interval and everything is caught up
    mark = env.clock()
    env.advance(300)
    await synced(env, keys, after=mark)
    await env.assert_equal_to_simulator(keys)
    assert not env.sim.violations, env.sim.violations[:3]


async def polled_since(env, keys, mark: float, timeout_s: float = 120.0) -> dict:
    """Statuses once every practice is idle again after a poll claimed after ``mark``."""
    deadline = time.monotonic() + timeout_s
    while True:
        futs = [await env.router.send(env.kind.name, k, GetStatus()) for k in keys]
        sts = dict(zip(keys, await asyncio.gather(*futs)))
        if all(isinstance(s, SyncStatus) and s.phase == "idle" and (s.last_poll_at or 0) > mark
               for s in sts.values()):
            return sts
        assert time.monotonic() < deadline, f"no poll after {mark}: {sts}"
        await asyncio.sleep(0.25)


async def test_bad_input_clear_errors_cursor_kept_and_status_cli(tss_env):
    from typer.testing import CliRunner

    from deploy.cli import app

    env = await tss_env(3, slots=4, appointments=1)
    keys = list(env.sim.practices)
    await configure_practices(env.router, env.server.base_url, creds(env.sim), page_size=3, kind=env.kind.name)
    await synced(env, keys)
    clock = env.clock
    cases = (("malformed", None, "malformed_xml"), ("json", None, "json_not_xml"),
             ("wrong_profile", None, "wrong_profile"), (None, 500, "unavailable"), (None, 401, "unauthorized"))
    for payload, status, code in cases:
        cursors = {k: st.cursor for k, st in (await env.stores(keys)).items()}
        env.sim.mutate(3 * len(keys))  # changes wait at the simulator
        env.sim.inject(payload=payload, status=status, count=100 if status else len(keys), paths="Provenance")
        mark = clock()
        env.advance(300)
        sts = await polled_since(env, keys, mark)
        for k in keys:
            assert sts[k].error_code == code, (k, sts[k].error_code, sts[k].last_error)
            assert sts[k].cursor == cursors[k], "cursor moved past a change that was not applied"
        env.sim.faults.clear()
        if status == 401:  # re-authentication could not help; the CLI shows the cursor and the error
            def cli():
                r = CliRunner().invoke(app, ["tss", "status", "--kind", env.kind.name, "--clock", env.clock_name,
                                             "--practice", keys[0]],
                                       env={"COLUMNS": "300"}, catch_exceptions=False)
                return r.exit_code, r.output

            rc, out = await asyncio.to_thread(cli)
            assert rc == 0 and keys[0] in out and "unauthorized" in out and "HTTP 401" in out, out
            assert cursors[keys[0]].id in out and "idle" in out and re.search(r"in (29\d|300)s", out), out
    # the next allowed poll catches everything up: nothing skipped, nothing twice
    mark = clock()
    env.advance(300)
    sts = await wait_synced(env.router, keys, kind=env.kind.name, timeout_s=90, after=mark)
    assert all(s.error_code == "" for s in sts.values())
    await env.assert_equal_to_simulator(keys)
    assert not env.sim.violations, env.sim.violations[:3]
