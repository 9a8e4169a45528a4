"""How busy this node's CPUs are - the autoscaler's "is there CPU left for another host?".

``CpuMeter.busy()`` returns the share of the node's CPU time that was used since the
previous call (0..1): from ``/proc/stat`` (busy = everything but idle and iowait; time
stolen by the hypervisor counts as busy - it is not ours to use), or, in a container with
a CPU quota (cgroup v2 ``cpu.max``), the container's usage against its quota. ``None`` where
neither can be read (not Linux). ``ProcessCpu.share()``: the CPUs this process used since
the last call (1.0 = one core), for "how much CPU does one more host of this pool need".
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
CGROUP = Path("/sys/fs/cgroup")


def _proc_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs."""
    try:
        with PROC_STAT.open() as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [float(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(v)
    return total - v[3] - v[4], total


def _cgroup_quota() -> float | None:
    """CPUs the container may use (cgroup v2 quota), None without a quota."""
    try:
        quota, period = (CGROUP / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return float(quota) / float(period)


def _cgroup_usage_s() -> float | None:
    try:
        for line in (CGROUP / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return float(line.split()[1]) / 1e6
    except OSError:
        return None
    return None


def node_cpus() -> float:
    """CPUs this node gives us: the cgroup quota, else the CPUs we may run on."""
    q = _cgroup_quota()
    if q:
        return q
    try:
        return float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return float(os.cpu_count() or 1)


class CpuMeter:
    """The node's busy share since the last call (first call: since construction)."""

    def __init__(self) -> None:
        self._quota = _cgroup_quota()
        self._last: tuple[float, float] | None = self._sample()

    def _sample(self) -> tuple[float, float] | None:
        if self._quota:
            used = _cgroup_usage_s()
            if used is not None:
                return used, time.monotonic() * self._quota
        return _proc_times()

    def busy(self) -> float | None:
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None:
            return None
        d_busy, d_total = now[0] - last[0], now[1] - last[1]
        if d_total <= 0:
            return None
        return max(0.0, min(1.0, d_busy / d_total))


class ProcessCpu:
    """CPU used by this process (all threads) since the last call, in cores."""

    def __init__(self) -> None:
        self._last = (time.process_time(), time.monotonic())

    def share(self) -> float | None:
        now = (time.process_time(), time.monotonic())
        last, self._last = self._last, now
        dt = now[1] - last[1]
        if dt <= 0:
            return None
        return max(0.0, (now[0] - last[0]) / dt)
