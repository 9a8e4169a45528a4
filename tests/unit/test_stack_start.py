"""How the local stack tells a daemon that is still starting from one that died.

Real processes, no services: a small Python daemon that behaves like Redis does on start
(creates its pid file empty, fills it a moment later) or dies right after writing it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.runtime.config import load_config
from deploy.stack import LocalStack, StackError, _Service

DAEMON = r"""
import os, sys, time
pid_file, ready, mode = sys.argv[1], sys.argv[2], sys.argv[3]
fh = open(pid_file, "w")          # like Redis' createPidFile: the file exists, still empty
time.sleep(0.5)
fh.write(f"{os.getpid()}\n"); fh.close()
if mode == "die":
    sys.exit(3)
open(ready, "w").close()
time.sleep(30)
"""


def _service(tmp_path: Path, mode: str) -> _Service:
    pid_file, ready = tmp_path / "d.pid", tmp_path / "ready"
    script = tmp_path / "fake_daemon.py"
    script.write_text(DAEMON)

    def start():
        # daemonizes: detached, its own session, the stack gets no Popen to poll
        subprocess.Popen([sys.executable, str(script), str(pid_file), str(ready), mode],
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return None

    def probe():
        if not ready.exists():
            raise ConnectionError("not ready")

    return _Service("fake", "127.0.0.1", (1,), tmp_path, tmp_path, pid_file, tmp_path / "d.log",
                    "fake_daemon.py", "-", "-", lambda: Path(sys.executable), lambda: None,
                    start, probe)


def _kill(svc: _Service) -> None:
    pid = svc.written_pid()
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_daemon_still_writing_its_pid_file_is_not_reported_dead(tmp_path):
    """Regression (CI, test_restart_waits_for_a_killed_service_to_free_its_port): Redis
    creates its pid file empty and writes the pid a moment later; the stack read the empty
    file as "redis is not running any more" and failed a restart of a healthy Redis."""
    st = LocalStack(load_config(run_dir=tmp_path))
    svc = _service(tmp_path, "live")
    try:
        st._start_one(svc)
        assert svc.pid() is not None
    finally:
        _kill(svc)


def test_a_daemon_that_dies_after_writing_its_pid_is_reported_with_its_log(tmp_path):
    st = LocalStack(load_config(run_dir=tmp_path))
    svc = _service(tmp_path, "die")
    svc.log.write_text("fatal: could not bind\n")
    t0 = time.monotonic()
    with pytest.raises(StackError, match="is not running any more") as e:
        st._start_one(svc)
    assert "fatal: could not bind" in str(e.value)
    assert time.monotonic() - t0 < 10  # told at once, not after the start timeout
