"""Helpers to drive whole runs through the real `ledger` command and read their ledger."""

import json
import os
import signal
import subprocess
import sys
import textwrap

from conftest import wait_for

LEDGER = [sys.executable, "-m", "ledger.cli.main"]


def ledger(*args, check=True, timeout=120, env=None):
    """Run the real CLI; returns CompletedProcess (text)."""
    res = subprocess.run(LEDGER + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                         env=env)
    if check and res.returncode != 0:
        raise AssertionError("ledger %s failed (%d):\n%s\n%s" % (" ".join(map(str, args)), res.returncode,
                                                                res.stdout, res.stderr))
    return res


def write_manifest(tmp_path, text, name="manifest.yaml", **fmt):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    body = textwrap.dedent(text).format(cwd=str(work), **fmt)
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def submit(manifest, *extra):
    out = ledger("submit", manifest, "--host", "local", *extra).stdout
    run = out.split("run ", 1)[1].split()[0]
    return run


def events(db, run=None, kinds=None):
    from ledger.store import open_store
    with open_store(db, readonly=True) as store:
        return list(store.read(run=run, kinds=kinds))


def state(db):
    from ledger.store import open_store
    with open_store(db, readonly=True) as store:
        return store.state()


def wait_finished(db, run, timeout=90):
    def done():
        st = state(db)
        return st.runs[run] if st.runs[run].finished else None
    return wait_for(done, timeout=timeout, interval=0.2, what="run %s to finish" % run)


def wait_event(db, run, kind, job=None, timeout=60, count=1):
    from ledger.errors import LedgerError

    def seen():
        try:
            evs = [e for e in events(db, run, [kind]) if job is None or e.job == job]
        except LedgerError:      # the ledger is not created (or not migrated) yet
            return None
        return evs if len(evs) >= count else None
    return wait_for(seen, timeout=timeout, interval=0.1, what="%s of %s" % (kind, job or run))


def kinds_of(evs, job):
    return [e.kind for e in evs if e.job == job]


def gpu_intervals(evs):
    """gpu -> [(reserved at, released at, (run, job, attempt))]: from launch_requested to the
    attempt's end (its exit time, or the event that ended it)."""
    starts, out = {}, {}
    for e in evs:
        key = (e.run, e.job, e.attempt)
        if e.kind == "launch_requested":
            starts[key] = (e.ts, e.data["gpus"])
        elif e.kind in ("exited", "cancelled", "launch_lost", "launch_failed") and key in starts:
            ts, gpus = starts.pop(key)
            end = e.data.get("ended_at", e.ts) if e.kind == "exited" else e.ts
            for g in gpus:
                out.setdefault(g, []).append((ts, end, key))
    return out


def assert_no_gpu_shared(evs):
    """Never two attempts on one GPU at once (reservation to release), whatever their runs."""
    for gpu, spans in gpu_intervals(evs).items():
        spans.sort()
        for (s1, e1, who1), (s2, e2, who2) in zip(spans, spans[1:]):
            assert s2 >= e1, "GPU %s held by %s and %s at once" % (gpu, who1, who2)


def scheduler_pid(db):
    """The scheduler's pid; -1 while its lock is held but its pid not yet written."""
    from ledger.scheduler import scheduler_pid as pid_of
    return pid_of(db)


def started_scheduler_pid(db, timeout=30):
    """Wait for a scheduler that holds the lock and has written its pid (never -1)."""
    return wait_for(lambda: (scheduler_pid(db) or 0) > 0 and scheduler_pid(db), timeout=timeout,
                    what="the scheduler to start and write its pid")


def kill_scheduler(db, sig=signal.SIGKILL):
    pid = scheduler_pid(db)
    if pid and pid > 0:
        os.kill(pid, sig)
        wait_for(lambda: scheduler_pid(db) is None, timeout=10, what="scheduler to die")
    return pid


def read_json(path):
    with open(path) as f:
        return json.load(f)
