"""Shared fixtures: every test gets its own ledger file and GPU-simulator folder."""

import os
import time

import pytest


def wait_for(predicate, timeout=30.0, interval=0.02, what="condition"):
    """Poll ``predicate`` until it returns something truthy, and return that; fail the test
    after ``timeout`` seconds. Tests synchronise on conditions, never on fixed sleeps, so they
    run as fast as the machine allows and stay robust on a slow CI box."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


@pytest.fixture
def ledger_db(tmp_path, monkeypatch):
    """A private ledger for this test (LEDGER_DB), and a private ~/.ledger for host records."""
    path = tmp_path / "ledger" / "ledger.db"
    monkeypatch.setenv("LEDGER_DB", str(path))
    monkeypatch.setenv("LEDGER_HOME", str(tmp_path / "laptop-ledger"))
    yield str(path)
    _stop_scheduler(str(path))


def _stop_scheduler(db):
    """Leave no scheduler or job behind: stop the scheduler, kill every job it started."""
    import signal
    from ledger import scheduler
    pid = scheduler.scheduler_pid(db)
    if pid and pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    runs = os.path.join(os.path.dirname(db), "runs")
    for root, _dirs, files in os.walk(runs):
        for f in files:
            if f.endswith(".pid"):
                try:
                    with open(os.path.join(root, f)) as fh:
                        jpid = int(fh.read().strip() or 0)
                    if jpid > 0:
                        os.killpg(jpid, signal.SIGKILL)
                except (OSError, ValueError):
                    pass
