"""The load test's process sampler: where a run's memory goes, by process name."""

import subprocess
import sys
import time

from deploy.loadtest.procstat import ProcSampler

_GROWER = r"""
import sys, time
open('/proc/self/comm', 'w').write('rss-grower')
held = []
print('ready', flush=True)
for line in sys.stdin:
    held.append(bytearray(int(line) * 2**20))  # touched: zero-filled pages count in RSS
    held[-1][::4096] = b'x' * len(held[-1][::4096])
    print('grown', flush=True)
"""


def test_the_report_names_the_process_whose_memory_grew():
    child = subprocess.Popen([sys.executable, "-c", _GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        sampler = ProcSampler([child.pid])
        t0 = time.time()
        for _ in range(4):  # 4 samples before, 6 while it grows by 40 MiB each
            sampler.sample()
        for _ in range(6):
            child.stdin.write("40\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "grown"
            sampler.sample()
        rows = sampler.rss_growth_by_name(t0, time.time())
        name, (at25, at50, at90) = next(iter(rows.items()))
        assert name == "rss-grower"
        assert at25 < at50 < at90
        assert at90 - at25 >= 150  # MiB: grown 4-5 x 40 MiB between the 25 % and 90 % samples
    finally:
        child.kill()
        child.wait()


def test_no_samples_in_the_window_give_no_rows():
    sampler = ProcSampler([])
    sampler.sample()
    assert sampler.rss_growth_by_name(0.0, 1.0) == {}


_NAMED = r"""
import sys, time
open('/proc/self/comm', 'w').write('same-name')
print('ready', flush=True)
if sys.argv[1] == 'burn':
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass
print('done', flush=True)
sys.stdin.readline()
"""


def test_the_cpu_of_processes_with_one_name_splits_by_pid():
    """Every shard host is ``ray::ShardHost`` to /proc: the slip and the worker hosts are told
    apart by pid (``cpu_of``), the report's CPU by host role."""
    kids = {role: subprocess.Popen([sys.executable, "-c", _NAMED, role], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True) for role in ("burn", "idle")}
    try:
        for k in kids.values():
            assert k.stdout.readline().strip() == "ready"
        sampler = ProcSampler([k.pid for k in kids.values()])
        sampler.sample()
        for k in kids.values():
            assert k.stdout.readline().strip() == "done"
        sampler.sample()
        burn, idle = sampler.cpu_of([kids["burn"].pid]), sampler.cpu_of([kids["idle"].pid])
        assert burn >= 0.4 and idle < 0.1
        assert sampler.cpu_of([kids["burn"].pid, kids["idle"].pid, kids["burn"].pid]) == burn + idle
        assert sampler.cpu_of([]) == 0 and sampler.cpu_of([2**22 + 7]) == 0  # never sampled
        assert sampler.cpu_by_name()["same-name"] == round(burn + idle, 1)
        # counted from a later moment (the clock's start): what was burnt before is not counted
        assert sampler.cpu_of([kids["burn"].pid], since=dict(sampler.cpu_last)) == 0
        assert sampler.cpu_of([kids["burn"].pid], since={}) == burn  # no snapshot of it: from the first sample
    finally:
        for k in kids.values():
            k.kill()
            k.wait()


def test_host_roles_split_the_shard_hosts_cpu_per_mail():
    from deploy.loadtest.driver import HostRoles

    sampler = ProcSampler([])
    sampler.cpu_base = {11: 1.0, 12: 0.0, 21: 0.5, 99: 0.0}
    sampler.cpu_last = {11: 5.0, 12: 4.0, 21: 20.5, 99: 50.0}  # 99: no shard host
    roles = HostRoles()
    roles.roles = {11: "kim.slip", 12: "kim.slip", 21: "kim.worker"}
    roles.hosts = {"kim.slip": {"kim.slip.host.0", "kim.slip.host.1"}, "kim.worker": {"kim.worker.host.0"}}
    assert roles.cpu_by_role(sampler, 1000) == {
        "kim.slip": {"hosts": 2, "cpu_s": 8.0, "cpu_ms_per_mail": 8.0},
        "kim.worker": {"hosts": 1, "cpu_s": 20.0, "cpu_ms_per_mail": 20.0},
    }
    assert roles.cpu_by_role(sampler, 0)["kim.worker"]["cpu_ms_per_mail"] is None
    # from the clock's start: 11 and 21 had burnt 2 and 10.5 s by then, 12 was born later
    late = roles.cpu_by_role(sampler, 1000, since={11: 3.0, 21: 11.0, 99: 1.0})
    assert (late["kim.slip"]["cpu_s"], late["kim.worker"]["cpu_s"]) == (6.0, 9.5)


def test_host_roles_report_each_role_s_garbage_collector_since_the_first_look():
    from deploy.loadtest.driver import HostRoles

    sampler = ProcSampler([])
    sampler.cpu_base, sampler.cpu_last = {11: 0.0, 12: 0.0, 21: 0.0}, {11: 1.0, 12: 1.0, 21: 4.0}
    roles = HostRoles()
    roles.roles = {11: "kim.slip", 12: "kim.slip", 21: "kim.worker"}
    roles.hosts = {"kim.slip": {"kim.slip.host.0", "kim.slip.host.1"}, "kim.worker": {"kim.worker.host.0"}}

    def gc(total, full, pause):
        return {"collections": [100, 10, full], "total_s": total, "max_pause_ms": pause}

    roles.gc_first = {11: gc(0.5, 1, 40.0), 12: gc(0.0, 0, 0.0), 21: gc(2.0, 3, 90.0)}  # warm-up's share
    roles.gc_last = {11: gc(1.5, 4, 40.0), 12: gc(0.25, 2, 55.0), 21: gc(9.0, 23, 310.0)}
    by = roles.cpu_by_role(sampler, 1000)
    assert (by["kim.slip"]["gc_s"], by["kim.slip"]["gc_full_passes"], by["kim.slip"]["gc_max_pause_ms"]) == (1.25, 5, 55.0)
    assert (by["kim.worker"]["gc_s"], by["kim.worker"]["gc_full_passes"], by["kim.worker"]["gc_max_pause_ms"]) == (7.0, 20, 310.0)
    roles.gc_first, roles.gc_last = {}, {}  # hosts that never answered with their gc: CPU only
    assert set(roles.cpu_by_role(sampler, 1000)["kim.worker"]) == {"hosts", "cpu_s", "cpu_ms_per_mail"}
