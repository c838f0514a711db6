"""The kill storm: a grid of short simulator jobs while the scheduler is SIGKILLed again and again.

Used by tests/test_chaos.py (a CI-sized storm) and scripts/chaos.py (a long one). Nothing here
is mocked: the real scheduler process (``python -m ledger.scheduler``), real screen sessions,
the GPU simulator, a real SQLite file. Each kill picks one of three moments:

* ``random``    - a random delay after the scheduler (re)started (also hits start-up and replay);
* ``launching`` - the moment the ledger shows a launch that was requested but not confirmed
                  (``launch_requested`` recorded, ``launched`` not yet): the session may or may
                  not have started;
* ``append``    - the middle of an append: the scheduler seen inside a write or sync system call
                  on the ledger files (``/proc/<pid>/syscall``), or frozen (SIGSTOP) at a random
                  instant while it holds SQLite's WAL write lock (``/proc/locks``), i.e. between
                  BEGIN IMMEDIATE and the end of COMMIT. The second works where the system calls
                  are too quick to see (a tmpfs).

Every job's command appends a ``start`` line (with its GPUs) to ``starts/<job>`` when it really
starts and an ``end`` line when it ends, so "launched twice" and "two jobs on one GPU" are
counted from real processes, not only from events.
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import closing

from ledger.errors import LedgerError
from ledger.projection import apply, project
from ledger.states import JobStatus

MODES = ("random", "launching", "append")
# write, pwrite64, writev, pwritev, fsync, fdatasync (x86_64 and aarch64 numbers)
_WRITE_SYSCALLS = {"x86_64": {1, 18, 20, 296, 74, 75}, "aarch64": {64, 68, 66, 70, 82, 83}}


def write_chaos_manifest(work, jobs, gpus, seconds, launcher="screen"):
    os.makedirs(os.path.join(work, "starts"), exist_ok=True)
    text = textwrap.dedent("""
        project: chaos
        cwd: {cwd}
        gpu_provider: "sim:{gpus}x80G,lag=0.2"
        launcher: {launcher}
        grid: {{i: [{ids}]}}
        template:
          id: "j${{i}}"
          cmd: >-
            echo "start $(date +%s.%N) $CUDA_VISIBLE_DEVICES" >> starts/j${{i}};
            python3 -m ledger.sim job --mem 10000 --ramp 0.1 --seconds {seconds} --out out/j${{i}}.json;
            rc=$?; echo "end $(date +%s.%N)" >> starts/j${{i}}; exit $rc
          output_check: out/j${{i}}.json
        """).format(cwd=work, gpus=gpus, launcher=launcher, ids=", ".join(str(i) for i in range(1, jobs + 1)), seconds=seconds)
    path = os.path.join(os.path.dirname(work), "chaos.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def start_scheduler(db, log):
    """The scheduler exactly as ``spawn_detached`` starts it, but as our child (to reap it)."""
    return subprocess.Popen([sys.executable, "-m", "ledger.scheduler", "--db", db], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, cwd="/", start_new_session=True)


class Watcher:
    """Follows the ledger read-only, folding new events into a live projection (as a scheduler
    catching up does); the final check compares it with a fresh replay."""

    def __init__(self, db):
        self.db = db
        self.state = None
        self.store = None

    def poll(self):
        from ledger.store import open_store
        if self.store is None:
            try:
                self.store = open_store(self.db, readonly=True)
            except LedgerError:
                return None
            from ledger.projection import State
            self.state = State()
        with closing(self.store.read(since_seq=self.state.last_seq)) as events:
            for ev in events:
                apply(self.state, ev)
        return self.state

    def launching(self):
        st = self.poll()
        if st is None:
            return []
        return [(r.id, j.id, j.attempt) for r in st.runs.values() for j in r.jobs.values()
                if j.status == JobStatus.LAUNCHING]

    def close(self):
        if self.store is not None:
            self.store.close()


def _in_ledger_write(pid, db):
    """The ledger file a write/sync system call of ``pid`` is on right now, else None."""
    calls = _WRITE_SYSCALLS.get(os.uname().machine, set())
    try:
        with open("/proc/%d/syscall" % pid) as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or not fields[0].lstrip("-").isdigit() or int(fields[0]) not in calls:
        return None
    try:
        target = os.readlink("/proc/%d/fd/%d" % (pid, int(fields[1], 16)))
    except (OSError, ValueError, IndexError):
        return None
    return target if target.startswith(db) else None


#: SQLite's WAL write lock: byte 120 of the -shm file (UNIX_SHM_BASE + WAL_WRITE_LOCK), held by
#: a process for the whole of a write transaction (BEGIN IMMEDIATE to COMMIT).
WAL_WRITE_LOCK_BYTE = 120


def _holds_write_lock(pid, db):
    """True if ``pid`` holds the ledger's WAL write lock (it is inside an append)."""
    try:
        inode = os.stat(db + "-shm").st_ino
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        if "->" in parts:
            continue                       # a waiter, not a holder
        try:
            i = parts.index("POSIX")
            kind, owner, dev, start, end = parts[i + 2], int(parts[i + 3]), parts[i + 4], parts[i + 5], parts[i + 6]
        except (ValueError, IndexError):
            continue
        if owner != pid or kind != "WRITE" or int(dev.rsplit(":", 1)[1]) != inode:
            continue
        end = float("inf") if end == "EOF" else int(end)
        if int(start) <= WAL_WRITE_LOCK_BYTE <= end:
            return True
    return False


def _stopped_inside_append(pid, db, rng):
    """Freeze ``pid`` at a random instant; True (left frozen) if it is inside a write transaction,
    else let it go on. Works where a write/sync system call is too quick to see (tmpfs)."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().split(") ", 1)[1][0] in "TtZ":
                    break
        except OSError:
            return False
    if _holds_write_lock(pid, db):
        return True
    os.kill(pid, signal.SIGCONT)
    time.sleep(rng.uniform(0.0, 0.004))
    return False


def _alive(proc):
    return proc.poll() is None


def kill_storm(tmp, kills=30, jobs=24, gpus=3, seconds=2.0, seed=1, timeout=600, log=print, launcher="screen"):
    """Run the storm in folder ``tmp``; return a result dict (see ``check_storm``)."""
    rng = random.Random(seed)
    work = os.path.join(tmp, "work")
    os.makedirs(work, exist_ok=True)
    db = os.path.join(tmp, "ledger", "ledger.db")
    manifest = write_chaos_manifest(work, jobs, gpus, seconds, launcher)
    env_db = dict(os.environ, LEDGER_DB=db)
    res = subprocess.run([sys.executable, "-m", "ledger.cli.main", "submit", manifest, "--host", "local"],
                         capture_output=True, text=True, env=env_db, timeout=120)
    if res.returncode != 0:
        raise RuntimeError("submit failed: %s %s" % (res.stdout, res.stderr))
    run = res.stdout.split("run ", 1)[1].split()[0]
    from ledger.scheduler import scheduler_pid
    watcher = Watcher(db)
    sched_log = open(os.path.join(tmp, "scheduler-chaos.log"), "ab")
    by_mode = {m: 0 for m in MODES}
    detail = {"launch_before_session": 0, "launch_after_session": 0, "append_wal": 0, "append_db": 0,
              "append_in_transaction": 0}
    started = time.monotonic()
    proc = None
    done = 0
    try:
        while done < kills and time.monotonic() - started < timeout:
            pid = _holder(db, scheduler_pid)
            if pid is None:
                proc = start_scheduler(db, sched_log)
                pid = _wait_locked(db, proc, scheduler_pid)
                if pid is None:
                    continue
                if pid != proc.pid:
                    proc = None      # another one (the one `ledger submit` started) holds the lock
            mode = MODES[done % len(MODES)]
            hit = _wait_for_moment(mode, pid, proc, db, watcher, rng, detail)
            if hit is None:
                if _finished(watcher, run):
                    break
                continue     # the scheduler exited by itself (idle) before the moment came
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if proc is not None:
                proc.wait()
            else:
                _wait_gone(pid)
            by_mode[hit] += 1
            done += 1
            if done % 10 == 0:
                log("  %d kills, %.0f s" % (done, time.monotonic() - started))
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 0.5))   # jobs go on while no scheduler runs
        # let the last scheduler finish the run in peace
        if proc is None or not _alive(proc):
            proc = start_scheduler(db, sched_log)
        deadline = time.monotonic() + timeout
        while not _finished(watcher, run):
            if time.monotonic() > deadline:
                raise AssertionError("run %s did not finish after the storm" % run)
            if not _alive(proc) and not _finished(watcher, run):
                proc = start_scheduler(db, sched_log)   # it stopped (idle check raced): start again
            time.sleep(0.2)
        proc.wait(timeout=60)
    finally:
        if proc is not None and _alive(proc):
            proc.kill()
            proc.wait()
        sched_log.close()
        watcher.poll()
        live = watcher.state
        watcher.close()
    result = check_storm(db, run, work, jobs, live)
    result.update(kills=done, by_mode=by_mode, detail=detail, seconds=round(time.monotonic() - started, 1),
                  db=db, run=run)
    return result


def _holder(db, scheduler_pid):
    pid = scheduler_pid(db)
    return pid if pid and pid > 0 else None


def _wait_locked(db, proc, scheduler_pid, timeout=30):
    """The pid holding the scheduler lock once ``proc`` took it or gave up; None if none does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _holder(db, scheduler_pid)
        if pid == proc.pid:
            return pid
        if proc.poll() is not None:
            return _holder(db, scheduler_pid)
        time.sleep(0.005)
    return None


def _finished(watcher, run):
    st = watcher.poll()
    return bool(st and run in st.runs and st.runs[run].finished)


def _wait_gone(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return
        except OSError:
            return
        time.sleep(0.01)


def _wait_for_moment(mode, pid, proc, db, watcher, rng, detail, patience=4.0):
    """Block until the chosen moment; return the mode that hit (or None if the scheduler ended)."""
    if mode == "random":
        end = time.monotonic() + rng.uniform(0.05, 1.2)
        while time.monotonic() < end:
            if not _pid_running(pid, proc):
                return None
            time.sleep(0.01)
        return "random"
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if not _pid_running(pid, proc):
            return None
        if mode == "append":
            target = _in_ledger_write(pid, db)
            if target is not None:
                detail["append_wal" if target.endswith("-wal") else "append_db"] += 1
                return "append"
            if rng.random() < 0.05 and _stopped_inside_append(pid, db, rng):
                detail["append_in_transaction"] += 1
                return "append"
            continue        # a tight loop: the window is a system call long
        pending = watcher.launching()
        if pending:
            run, job, attempt = pending[0]
            pidfile = os.path.join(os.path.dirname(db), "runs", run, "%s.%d.pid" % (job, attempt))
            detail["launch_after_session" if os.path.exists(pidfile) else "launch_before_session"] += 1
            return "launching"
        time.sleep(0.005)
    return "random"         # the moment did not come: kill now anyway


def _pid_running(pid, proc):
    if proc is not None:
        return proc.poll() is None
    try:
        with open("/proc/%d/stat" % pid) as f:
            return not f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def read_starts(work, jobs):
    """job -> [(start_ts, end_ts or None, gpus)] from the lines the jobs wrote themselves."""
    out = {}
    for i in range(1, jobs + 1):
        name = "j%d" % i
        path = os.path.join(work, "starts", name)
        spans = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if parts and parts[0] == "start":
                        spans.append([float(parts[1]), None, tuple(parts[2].split(",")) if len(parts) > 2 else ()])
                    elif parts and parts[0] == "end" and spans:
                        spans[-1][1] = float(parts[1])
        out[name] = [tuple(s) for s in spans]
    return out


def check_storm(db, run, work, jobs, live):
    """The invariants, as counts (all must be 0 / True); ``problems`` names each violation."""
    from ledger.store import open_store
    with open_store(db, readonly=True) as store:
        events = list(store.read())
        cached = store.state()          # what a restarting scheduler or `status` folds (snapshot + tail)
    fresh = project(events)
    problems = []
    if cached != fresh:
        problems.append("the store's state (snapshot + tail) differs from a fresh replay")
    seqs = [e.seq for e in events]
    gap_free = seqs == list(range(1, len(seqs) + 1))
    if not gap_free:
        problems.append("event seqs are not 1..%d" % len(seqs))
    if live != fresh:
        problems.append("the live projection differs from a fresh replay")
    starts = read_starts(work, jobs)
    lost = [j for j, s in starts.items() if not s]
    duplicated = [j for j, s in starts.items() if len(s) > 1]
    problems += ["%s never started" % j for j in lost]
    problems += ["%s started %d times" % (j, len(starts[j])) for j in duplicated]
    completed = {}
    for e in events:
        if e.kind == "completed" and e.run == run:
            completed[e.job] = completed.get(e.job, 0) + 1
    not_once = sorted(j for j in starts if completed.get(j, 0) != 1)
    problems += ["%s has %d completed events" % (j, completed.get(j, 0)) for j in not_once]
    final = fresh.runs[run]
    if not final.finished or final.counts()["completed"] != jobs:
        problems.append("run ended with %s" % {k: v for k, v in final.counts().items() if v})
    shared = _shared_gpus(starts) + _shared_gpus_in_events(events)
    problems += shared
    return {"jobs": jobs, "completed": final.counts()["completed"], "lost": len(lost),
            "duplicated": len(duplicated), "gpu_shared": len(shared), "gap_free": gap_free,
            "replay_equal": live == fresh and cached == fresh, "events": len(events),
            "launch_lost": sum(1 for e in events if e.kind == "launch_lost"),
            "adopted": sum(1 for e in events if e.kind == "adopted"),
            "scheduler_starts": sum(1 for e in events if e.kind == "scheduler_started"),
            "problems": problems}


def _shared_gpus(starts):
    """Real processes: two jobs whose start..end spans overlap on one GPU."""
    per_gpu = {}
    for job, spans in starts.items():
        for start, end, gpus in spans:
            for g in gpus:
                per_gpu.setdefault(g, []).append((start, end if end is not None else float("inf"), job))
    out = []
    for g, spans in per_gpu.items():
        spans.sort()
        for (s1, e1, j1), (s2, _e2, j2) in zip(spans, spans[1:]):
            if s2 < e1:
                out.append("GPU %s ran %s and %s at once" % (g, j1, j2))
    return out


def _shared_gpus_in_events(events):
    """The ledger's view: a GPU handed out again before the attempt holding it ended."""
    held = {}
    out = []
    for e in events:
        key = (e.run, e.job, e.attempt)
        if e.kind == "launch_requested":
            for g in e.data["gpus"]:
                if g in held and held[g] != key:
                    out.append("GPU %s requested for %s while %s holds it" % (g, key, held[g]))
                held[g] = key
        elif e.kind in ("exited", "launch_lost", "launch_failed", "cancelled"):
            for g, k in list(held.items()):
                if k == key:
                    del held[g]
    return out
