"""Shared helpers for the store tests: event builders, raw SQLite access, a tiny tmpfs,
and small programs run in child processes (real processes, real SQLite locks)."""

import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from ledger.events import Event
from conftest import wait_for  # noqa: F401  (re-exported for the test modules)




def raw(path):
    """A plain sqlite3 connection in autocommit mode, as an outside tool would use."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=10)
    return conn


def job_life(run, job, attempt=1, gpus=(0,), t0=1000.0, outcome="completed"):
    """The events of one job from submission to a verdict (valid for the projection)."""
    events = [
        Event("submitted", run, job, 0, {"phase": "main", "cmd": "python train.py", "gpus_per_job": 1}, t0),
        Event("launch_requested", run, job, attempt,
              {"gpus": list(gpus), "session": "s-%s" % job, "log": "/logs/%s.log" % job}, t0 + 1),
        Event("launched", run, job, attempt, {"pid": 4242, "session": "s-%s" % job}, t0 + 2),
        Event("exited", run, job, attempt, {"exit_code": 0 if outcome == "completed" else 1,
                                            "duration": 8.0}, t0 + 10),
    ]
    if outcome == "completed":
        events.append(Event("completed", run, job, attempt, {"outputs": ["out/%s.pt" % job]}, t0 + 11))
    elif outcome == "oom":
        events.append(Event("oom_detected", run, job, attempt,
                            {"oom_kind": "cuda", "line": "CUDA out of memory. Tried to allocate 2 GiB",
                             "delay": 120, "retry_at": t0 + 131}, t0 + 11))
    else:
        events.append(Event("failed", run, job, attempt,
                            {"reason": "exit code 1", "exit_code": 1, "delay": 0, "retry_at": t0 + 11}, t0 + 11))
    return events


def run_with_history(run="r1", t0=1000.0):
    """A run with a completed job, and a job that OOMs once, is retried, then completes."""
    events = [Event("run_submitted", run, None, 0, {"project": "demo", "plan": {}, "plan_hash": "h"}, t0)]
    events += job_life(run, "a", t0=t0 + 1)
    events += job_life(run, "b", t0=t0 + 1, outcome="oom", gpus=(1,))[:]
    events.append(Event("retried", run, "b", 1, {"next_attempt": 2}, t0 + 140))
    events += job_life(run, "b", attempt=2, t0=t0 + 150)[1:]
    return events


def python(code, *args, **kwargs):
    """Start ``code`` in a fresh interpreter (nothing imported yet); returns the Popen."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc, timeout=30):
    """Wait for a child; kill it if it hangs. Returns (returncode, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("child hung:\n%s\n%s" % (out, err))
    return proc.returncode, out, err


@contextlib.contextmanager
def tiny_tmpfs(folder, size="1m"):
    """Mount a small tmpfs at ``folder`` (needs root); skip the test where mount is refused."""
    os.makedirs(str(folder), exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stdout.strip())
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(path, chunk=16384):
    """Write ``path`` until the filesystem is full; return the bytes written."""
    written = 0
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * chunk
        while True:
            try:
                written += os.write(fd, block)
            except OSError:
                if chunk == 1:
                    break
                chunk //= 4
                block = b"\0" * max(chunk, 1)
                chunk = max(chunk, 1)
    finally:
        os.close(fd)
    return written
