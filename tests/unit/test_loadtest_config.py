"""The load test's pipeline configuration (``deploy.loadtest.driver.run_config``)."""

from __future__ import annotations

from actors.runtime.config import load_config
from deploy.loadtest.driver import RATE_PICKUP_POLL_MS, Options, run_config


def test_rate_mode_picks_up_hot_unless_told_otherwise():
    """Rate mode measures latency: with IDLE every mail waited Dovecot's 500 ms notify
    delay (p99 1.9 s at 7 mails/s); it now NOOP-polls hot mailboxes by default.
    Throughput mode keeps the configured pick-up; ``--pickup-poll-ms 0`` forces IDLE."""
    cfg = load_config()
    assert cfg.kim.pickup_poll_ms == 0  # production default: IDLE

    def poll(**kw) -> float:
        return run_config(cfg, Options(mails=10, **kw), "r1")[0].kim.pickup_poll_ms

    assert poll(rate=7.0) == RATE_PICKUP_POLL_MS
    assert poll() == 0
    assert poll(rate=7.0, pickup_poll_ms=0) == 0
    assert poll(rate=7.0, pickup_poll_ms=250) == 250
