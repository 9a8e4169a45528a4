"""CPU seconds and RSS of the processes a load test runs on, read from ``/proc``."""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.find(b"(") + 1:data.rfind(b")")].decode(errors="replace")
    except OSError:
        return "?"


def _stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, cpu seconds user+sys, rss bytes) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    ppid = int(rest[1])
    cpu = (int(rest[11]) + int(rest[12])) / _TICK
    rss = int(rest[21]) * _PAGE
    return ppid, cpu, rss


def descendants(roots: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st:
            children.setdefault(st[0], []).append(int(name))
    out: set[int] = set()
    todo = [p for p in roots if p]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(children.get(p, ()))
    return out


class ProcSampler:
    """Samples the process trees of ``roots`` (the driver: its Ray cluster hangs below it;
    the stack's services): total CPU seconds (dead processes keep their last value) and
    summed RSS over time."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.cpu_last: dict[int, float] = {}
        self.cpu_base: dict[int, float] = {}
        self.samples: list[tuple[float, float, int, int]] = []  # (t, cpu s since start, rss bytes, processes)
        self.peak_rss = 0
        self.peak_procs = 0
        self.also: "ProcSampler | None" = None  # a second sampler taken at the same moments
        self.names: dict[int, str] = {}
        # per sample: RSS bytes by process name (summed over processes of that name)
        self.rss_by_name: list[tuple[float, dict[str, int]]] = []

    def cpu_by_name(self) -> dict[str, float]:
        """CPU seconds since the first sample, by process name (``ray::ShardHost``, ...)."""
        out: dict[str, float] = {}
        for pid, v in self.cpu_last.items():
            n = self.names.get(pid, "?")
            out[n] = out.get(n, 0.0) + v - self.cpu_base.get(pid, 0.0)
        return dict(sorted(((k, round(v, 1)) for k, v in out.items() if v >= 0.05), key=lambda kv: -kv[1]))

    def cpu_of(self, pids, since: dict[int, float] | None = None) -> float:
        """CPU seconds of these processes since the first sample - or since ``since`` (a copy
        of :attr:`cpu_last` taken at that moment; a process born later counts from its
        start). A process that is gone counts to its last sample; one never sampled, 0."""
        base = self.cpu_base if since is None else {**self.cpu_base, **since}
        return sum(self.cpu_last.get(p, 0.0) - base.get(p, 0.0) for p in set(pids) if p in self.cpu_last)

    def sample(self) -> tuple[float, int]:
        if self.also is not None:
            self.also.sample()
        now = time.time()
        rss = 0
        by_name: dict[str, int] = {}
        pids = descendants(self.roots)
        for pid in pids:
            st = _stat(pid)
            if st is None:
                continue
            self.cpu_last[pid] = st[1]
            name = self.names[pid] = _name(pid)  # again each time: Ray renames its workers after start
            self.cpu_base.setdefault(pid, st[1] if not self.samples else 0.0)
            rss += st[2]
            by_name[name] = by_name.get(name, 0) + st[2]
        self.rss_by_name.append((now, by_name))
        cpu = sum(v - self.cpu_base.get(p, 0.0) for p, v in self.cpu_last.items())
        self.samples.append((now, cpu, rss, len(pids)))
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(pids))
        return cpu, rss

    def rss_growth_by_name(self, t0: float, t1: float, *, top: int = 8) -> dict[str, list[float]]:
        """RSS (MiB) by process name at 25 / 50 / 90 % of ``[t0, t1]``, the names that grew
        most from 25 to 90 % first - where a run's memory goes, not only how much."""
        xs = [(t, d) for t, d in self.rss_by_name if t0 <= t <= t1]
        if not xs:
            return {}
        at = [xs[min(len(xs) - 1, int(f * len(xs)))][1] for f in (0.25, 0.5, 0.9)]
        names = set().union(*at)
        rows = {n: [round(d.get(n, 0) / 2**20, 1) for d in at] for n in names}
        order = sorted(rows, key=lambda n: (-(rows[n][2] - rows[n][0]), -rows[n][2], n))
        return {n: rows[n] for n in order[:top]}

    def cpu_between(self, t0: float, t1: float) -> float:
        pts = [(t, c) for t, c, _, _ in self.samples]
        if not pts:
            return 0.0
        a = min(pts, key=lambda p: abs(p[0] - t0))[1]
        b = min(pts, key=lambda p: abs(p[0] - t1))[1]
        return max(0.0, b - a)
