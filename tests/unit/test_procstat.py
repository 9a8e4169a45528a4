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
