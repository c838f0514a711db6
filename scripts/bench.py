#!/usr/bin/env python3
"""ledger's benchmark: GPU idle time against a naive baseline, ledger scale, the remote round
trip and the scheduler's own cost, measured side by side on this machine.

    .venv/bin/python scripts/bench.py                 # the full run (about 10 minutes)
    .venv/bin/python scripts/bench.py --quick         # the CI smoke version (about 1 minute)
    .venv/bin/python scripts/bench.py --only sim,scale --json out.json

Prints a markdown table and writes every figure (and the raw per-job timelines) as JSON
(``bench-results.json`` unless ``--json``). Everything is real: the ``ledger`` CLI, a
detached scheduler, GNU screen sessions, SQLite files, the GPU simulator's nvidia-smi and an
OpenSSH server on 127.0.0.1 (that part needs root, like the tests; without it it is skipped
and says so). README.md, section Performance, explains each figure.

Sections:
  sim     the same sweep run by ledger and by scripts/naive_baseline.py on the simulator;
          the ideal and the naive baseline at its default 60 s poll by a discrete-event model
          fed with the measured job runtimes (validated against the measured naive run)
  scale   append throughput, full and startup replay, status latency, peak memory at
          10k / 100k / 1M events (10k / 100k with --quick)
  remote  ``ledger status --host`` over real SSH: latency and SSH connections/commands
  sched   the scheduler's CPU while it waits on 8 running jobs; subprocesses per tick
"""

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from ledger import sim as ledger_sim  # noqa: E402

LEDGER = [sys.executable, "-m", "ledger.cli.main"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
NAIVE_DEFAULT_POLL = 60.0


# ---- small helpers -----------------------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else None


def pct(xs, p):
    """The p-th percentile (nearest rank) of xs."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(math.ceil(p / 100.0 * len(s))) - 1))
    return s[k]


def wait_until(predicate, timeout, interval=0.2, what="condition"):
    """Poll a condition in the world (an event in the ledger, a process gone) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def run_cli(args, env, timeout=300, check=True):
    res = subprocess.run(LEDGER + [str(a) for a in args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError("ledger %s failed (%d): %s %s" % (" ".join(map(str, args)), res.returncode,
                                                             res.stdout[-2000:], res.stderr[-2000:]))
    return res


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "sqlite": __import__("sqlite3").sqlite_version,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def boot_epoch():
    """Epoch time of boot, precise enough to turn /proc/<pid>/stat start times into epoch."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def proc_start_time(pid, boot):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return boot + int(fields[19]) / float(CLK_TCK)
    except (OSError, IndexError, ValueError):
        return None


def proc_cpu_seconds(pid):
    """(own user+system, waited-for children's user+system) CPU seconds of a process."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / float(CLK_TCK), (cutime + cstime) / float(CLK_TCK)


# ---- 1. GPU idle time on the simulator ---------------------------------------------------

class SimMonitor(threading.Thread):
    """Watches the simulator's state file and records every job allocation it ever held:
    GPU, pid, the process's start (from /proc), when memory was first taken, when the job
    ended (release time minus the lag) and when its memory was released. The simulator's
    writes are atomic renames, so reading without its lock is safe."""

    def __init__(self, state_dir, interval=0.05):
        super().__init__(daemon=True)
        self.path = os.path.join(state_dir, "state.json")
        self.interval = interval
        self.allocs = {}
        self.lag = None
        self.stopping = threading.Event()
        self.boot = boot_epoch()

    def run(self):
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(self.interval)
        self.sample()

    def sample(self):
        try:
            with open(self.path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            return
        self.lag = state["config"]["lag"]
        for a in state["allocations"]:
            if a["kind"] != "job":
                continue
            rec = self.allocs.get(a["id"])
            if rec is None:
                rec = self.allocs[a["id"]] = {"gpu": a["gpu"], "pid": a["pid"], "mem_start": a["since"],
                                              "proc_start": proc_start_time(a["pid"], self.boot),
                                              "mib": a["mib"], "release": None}
            rec["mib"] = max(rec["mib"], a["mib"])
            if a.get("released_at") is not None:
                rec["release"] = a["released_at"]

    def stop(self):
        self.stopping.set()
        self.join(5)

    def records(self):
        out = []
        for rec in self.allocs.values():
            rec = dict(rec)
            rec["exit"] = rec["release"] - self.lag if rec["release"] is not None else None
            if rec["proc_start"] is None:          # died before we saw it alive: use its first allocation
                rec["proc_start"] = rec["mem_start"]
            out.append(rec)
        return out


def sweep_jobs(n, quick, seed=7):
    """n jobs of known durations (a mix of 2-10 s; 1-3 s with --quick) and memory footprints."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        seconds = rng.choice([1, 2, 3]) if quick else rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 10])
        mem = rng.choice([16000, 24000, 32000, 48000, 64000])
        jobs.append({"id": "j%02d_%ds" % (i, seconds), "seconds": seconds, "mem": mem})
    return jobs


def job_cmd(job, ramp):
    return ("python3 -m ledger.sim job --mem %d --seconds %g --ramp %g --out results/%s.json"
            % (job["mem"], job["seconds"], ramp, job["id"]))


def pid_to_job(workdir):
    """pid -> job id from the results files the simulated jobs write (they record their pid)."""
    out = {}
    results = os.path.join(workdir, "results")
    for name in os.listdir(results) if os.path.isdir(results) else ():
        if name.endswith(".json"):
            with open(os.path.join(results, name)) as f:
                out[json.load(f)["pid"]] = name[:-len(".json")]
    return out


def analyse(records, t0, gpus, lag):
    """Schedule quality from per-job GPU timelines (measured or modelled alike).

    records: {gpu, proc_start, mem_start, exit, release}. A job occupies its GPU from its
    process start to its exit; its memory counts from mem_start to release (exit + lag).
    """
    by_gpu = {}
    for r in records:
        by_gpu.setdefault(r["gpu"], []).append(r)
    gaps, busy_launches, mem_overlaps = [], 0, 0
    last_start = max(r["proc_start"] for r in records)
    end = max(r["exit"] for r in records)
    idle_waiting = 0.0
    busy_total = sum(r["exit"] - r["proc_start"] for r in records)
    for g in range(gpus):
        rs = sorted(by_gpu.get(g, []), key=lambda r: r["proc_start"])
        for a, b in zip(rs, rs[1:]):
            gaps.append(b["proc_start"] - a["exit"])
            if b["proc_start"] < a["exit"]:
                busy_launches += 1             # started while another job of ours still ran on it
            if b["mem_start"] < a["release"] - 1e-3:
                mem_overlaps += 1              # took memory before the previous job's was released
        busy = 0.0
        for r in rs:
            lo, hi = max(r["proc_start"], t0), min(r["exit"], last_start)
            busy += max(0.0, hi - lo)
        idle_waiting += (last_start - t0) - busy
    return {
        "jobs": len(records), "makespan": end - t0, "first_start": min(r["proc_start"] for r in records) - t0,
        "idle_gpu_s_total": gpus * (end - t0) - busy_total,
        "idle_gpu_s_while_waiting": idle_waiting,
        "gap_median": median(gaps), "gap_p95": pct(gaps, 95), "gap_max": max(gaps) if gaps else None,
        "gap_min": min(gaps) if gaps else None,
        "gap_beyond_lag_median": median(gaps) - lag if gaps else None,
        "busy_gpu_launches": busy_launches, "memory_overlaps": mem_overlaps, "handoffs": len(gaps),
    }


def model(runtimes, startups, gpus, lag, poll=None, launch_delay=0.0):
    """Discrete-event model of the same jobs in manifest order.

    poll None: the ideal list schedule (a job starts the moment its GPU's memory is
    released: zero scheduler overhead). poll P: the naive loop, which looks at memory every P
    seconds and starts the next job on every GPU under the threshold (a job that has not
    allocated yet looks free: double launches happen when P < a job's startup).
    Returns timelines in the shape ``analyse`` takes.
    """
    records = []
    if poll is None:
        free_at = [0.0] * gpus
        for r, s in zip(runtimes, startups):
            g = min(range(gpus), key=lambda k: (free_at[k], k))
            start = free_at[g]
            records.append({"gpu": g, "proc_start": start, "mem_start": start + s, "exit": start + r,
                            "release": start + r + lag})
            free_at[g] = start + r + lag
        return records
    queue = list(zip(runtimes, startups))
    t = 0.0
    while queue:
        for g in range(gpus):
            if not queue:
                break
            held = any(rec["gpu"] == g and rec["mem_start"] <= t < rec["release"] for rec in records)
            if not held:
                r, s = queue.pop(0)
                start = t + launch_delay
                records.append({"gpu": g, "proc_start": start, "mem_start": start + s, "exit": start + r,
                                "release": start + r + lag})
        t += poll
    return records


def ledger_sweep(tmp, jobs, lag, ramp, gpus, env_base):
    """Run the sweep through the real CLI and scheduler; returns (records, t0, events summary)."""
    from ledger.store import open_store
    base = os.path.join(tmp, "ledger-sweep")
    work = os.path.join(base, "work")
    os.makedirs(work)
    db = os.path.join(base, "ledger", "ledger.db")
    env = dict(env_base, LEDGER_DB=db, LEDGER_HOME=os.path.join(base, "home"))
    manifest = {
        "project": "bench", "cwd": work, "gpu_provider": "sim:%dx80G,lag=%g" % (gpus, lag), "launcher": "screen",
        "gpu_free_threshold_mib": 500, "stale_grace": 60,
        "jobs": [{"id": j["id"], "cmd": job_cmd(j, ramp), "output_check": "results/%s.json" % j["id"]}
                 for j in jobs],
    }
    path = os.path.join(base, "sweep.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    monitor = SimMonitor(os.path.join(base, "ledger", "sim"))
    monitor.start()
    try:
        out = run_cli(["submit", path, "--host", "local"], env).stdout
        run = out.split("run ", 1)[1].split()[0]

        def finished():
            try:
                with open_store(db, readonly=True) as s:
                    return list(s.read(run=run, kinds=["run_finished"]))
            except Exception:
                return None
        wait_until(finished, timeout=600, interval=0.5, what="the ledger sweep to finish")
    finally:
        monitor.stop()
    from ledger.scheduler import scheduler_pid
    wait_until(lambda: scheduler_pid(db) is None, timeout=60, what="the scheduler to exit when idle")
    with open_store(db, readonly=True) as s:
        events = list(s.read(run=run))
    t0 = next(e.ts for e in events if e.kind == "run_submitted")
    # from the ledger itself: our own double launches (two attempts on one GPU at once), OOMs
    spans = {}
    for e in events:
        if e.kind == "launch_requested":
            for g in e.data["gpus"]:
                spans.setdefault(g, []).append([e.ts, None, (e.job, e.attempt)])
        elif e.kind == "exited":
            for g, lst in spans.items():
                for sp in lst:
                    if sp[2] == (e.job, e.attempt) and sp[1] is None:
                        sp[1] = e.data.get("ended_at", e.ts)
    double = 0
    for lst in spans.values():
        lst.sort()
        double += sum(1 for a, b in zip(lst, lst[1:]) if a[1] is None or b[0] < a[1])
    summary = {
        "events": len(events),
        "double_launches_in_ledger": double,
        "ooms": sum(1 for e in events if e.kind == "oom_detected"),
        "completed": sum(1 for e in events if e.kind == "completed"),
        "launches": sum(1 for e in events if e.kind == "launch_requested"),
    }
    records = monitor.records()
    names = pid_to_job(work)
    for r in records:
        r["job"] = names.get(r["pid"])
    return records, t0, summary


def naive_sweep(tmp, jobs, lag, ramp, gpus, poll, env_base):
    base = os.path.join(tmp, "naive-sweep")
    work = os.path.join(base, "work")
    os.makedirs(work)
    state_dir = os.path.join(base, "sim")
    ledger_sim.init_state(state_dir, "%dx80G" % gpus, lag)
    shim = os.path.join(ledger_sim.install_shim(state_dir), "nvidia-smi")
    jobs_path = os.path.join(base, "jobs.json")
    with open(jobs_path, "w") as f:
        json.dump([{"id": j["id"], "cmd": job_cmd(j, ramp)} for j in jobs], f)
    env = dict(env_base, LEDGER_SIM_DIR=state_dir, PYTHONPATH=ledger_sim.PACKAGE_ROOT)
    monitor = SimMonitor(state_dir)
    monitor.start()
    t0 = time.time()
    try:
        subprocess.run([sys.executable, os.path.join(HERE, "naive_baseline.py"), "--jobs", jobs_path,
                        "--poll", str(poll), "--nvidia-smi", shim, "--cwd", work,
                        "--log", os.path.join(base, "launches.jsonl")], env=env, check=True, timeout=1800)
    finally:
        monitor.stop()
    ooms = 0
    logs = os.path.join(work, "naive_logs")
    for name in os.listdir(logs):
        with open(os.path.join(logs, name), errors="replace") as f:
            ooms += "CUDA out of memory" in f.read()
    records = [r for r in monitor.records() if r["exit"] is not None]
    names = pid_to_job(work)
    for r in records:
        r["job"] = names.get(r["pid"])
    return records, t0, {"ooms": ooms, "completed": len(names)}


def bench_sim(tmp, quick):
    gpus = 8
    n = 16 if quick else 40
    lag = 2.0            # the simulator's default late release
    ramp = 0.5 if quick else 1.0
    scale = 0.1          # the bench runs the naive poll at 60 s x 0.1 = 6 s (see README)
    poll = NAIVE_DEFAULT_POLL * scale if not quick else 2.0
    jobs = sweep_jobs(n, quick)
    env = dict(os.environ)
    env.pop("LEDGER_DB", None)
    print("sim: ledger sweep of %d jobs on %d simulated GPUs ..." % (n, gpus), file=sys.stderr, flush=True)
    lrec, lt0, lsum = ledger_sweep(tmp, jobs, lag, ramp, gpus, env)
    led = analyse(lrec, lt0, gpus, lag)
    print("sim: naive baseline, poll %g s ..." % poll, file=sys.stderr, flush=True)
    nrec, nt0, nsum = naive_sweep(tmp, jobs, lag, ramp, gpus, poll, env)
    nai = analyse(nrec, nt0, gpus, lag)
    # the jobs' own runtimes and startups (process start -> exit; -> first memory), measured
    # in the ledger run, in manifest order; then the ideal and the naive loop modelled
    by_job = {r["job"]: r for r in lrec}
    runtimes = [by_job[j["id"]]["exit"] - by_job[j["id"]]["proc_start"] for j in jobs]
    startups = [by_job[j["id"]]["mem_start"] - by_job[j["id"]]["proc_start"] for j in jobs]
    ideal = analyse(model(runtimes, startups, gpus, lag), 0.0, gpus, lag)
    naive_model_bench = analyse(model(runtimes, startups, gpus, lag, poll=poll), 0.0, gpus, lag)
    naive_model_60 = analyse(model(runtimes, startups, gpus, lag, poll=NAIVE_DEFAULT_POLL), 0.0, gpus, lag)
    return {
        "gpus": gpus, "jobs": n, "lag": lag, "ramp": ramp, "durations": [j["seconds"] for j in jobs],
        "naive_poll_bench": poll, "naive_poll_scale": scale if not quick else poll / NAIVE_DEFAULT_POLL,
        "ledger": dict(led, **lsum), "naive": dict(nai, **nsum), "ideal": ideal,
        "naive_model_at_bench_poll": naive_model_bench, "naive_model_at_60s": naive_model_60,
        "makespan_over_ideal": led["makespan"] / ideal["makespan"],
        "ratio_idle_waiting_naive_over_ledger": _ratio(nai["idle_gpu_s_while_waiting"], led["idle_gpu_s_while_waiting"]),
        "ratio_idle_total_naive_over_ledger": _ratio(nai["idle_gpu_s_total"], led["idle_gpu_s_total"]),
        "ratio_makespan_naive_over_ledger": _ratio(nai["makespan"], led["makespan"]),
        "ratio_idle_waiting_naive60_over_ledger": _ratio(naive_model_60["idle_gpu_s_while_waiting"],
                                                        led["idle_gpu_s_while_waiting"]),
        "ratio_idle_total_naive60_over_ledger": _ratio(naive_model_60["idle_gpu_s_total"], led["idle_gpu_s_total"]),
        "ratio_makespan_naive60_over_ledger": _ratio(naive_model_60["makespan"], led["makespan"]),
        # idle the ideal schedule also has (the release lag, the sweep's ragged end) is nobody's
        # fault; what is left is what a scheduler adds
        "avoidable_idle_waiting": {k: v["idle_gpu_s_while_waiting"] - ideal["idle_gpu_s_while_waiting"]
                                   for k, v in (("ledger", led), ("naive", nai), ("naive_60s", naive_model_60))},
        "ratio_avoidable_idle_naive60_over_ledger": _ratio(
            naive_model_60["idle_gpu_s_while_waiting"] - ideal["idle_gpu_s_while_waiting"],
            led["idle_gpu_s_while_waiting"] - ideal["idle_gpu_s_while_waiting"]),
        "model_error_makespan_at_bench_poll": (naive_model_bench["makespan"] - nai["makespan"]) / nai["makespan"],
        "timelines": {"ledger": lrec, "naive": nrec, "ledger_t0": lt0, "naive_t0": nt0},
    }


def _ratio(a, b):
    return a / b if b else None


# ---- 2. ledger scale -----------------------------------------------------------------------

CHILD_REPLAY = r"""
import json, resource, sys, time
sys.path.insert(0, %(root)r)
from ledger.store import open_store
mode, path = sys.argv[1], sys.argv[2]
out = {}
with open_store(path, readonly=True) as s:
    t = time.perf_counter()
    if mode == "full":
        state = s.state(snapshot=False)
    else:
        state = s.state()
    out["seconds"] = time.perf_counter() - t
    out["jobs"] = sum(len(r.jobs) for r in state.runs.values())
    out["runs"] = len(state.runs)
    out["last_seq"] = state.last_seq
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps(out))
"""


def child_replay(mode, db):
    """Replay in a fresh process, so its time and peak memory are its own."""
    res = subprocess.run([sys.executable, "-c", CHILD_REPLAY % {"root": ROOT}, mode, db], capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_scale(tmp, quick):
    from ledger import api
    from ledger.projection import project
    from ledger.store import open_store
    from ledger_gen import synthetic_events
    out = {"sizes": {}}
    # append: one durable event at a time (its own BEGIN IMMEDIATE ... COMMIT, synchronous=FULL)
    n_append = 200 if quick else 2000
    db = os.path.join(tmp, "append.db")
    events = list(synthetic_events(n_append, seed=5))
    with open_store(db) as s:
        t = time.perf_counter()
        for e in events:
            s.append([e])
        el = time.perf_counter() - t
    out["append_events"] = n_append
    out["append_per_s"] = n_append / el
    out["append_ms_median_per_event"] = el / n_append * 1000
    sizes = (10000, 100000) if quick else (10000, 100000, 1000000)
    for n in sizes:
        print("scale: %d events ..." % n, file=sys.stderr, flush=True)
        db = os.path.join(tmp, "scale-%d.db" % n)
        with open_store(db) as s:
            t = time.perf_counter()
            s.append_bulk(synthetic_events(n, seed=11))
            build = time.perf_counter() - t
        row = {"events": n, "build_s": build, "file_mib": os.path.getsize(db) / 2 ** 20}
        reps = 2 if n >= 1000000 else 3
        full = [child_replay("full", db) for _ in range(reps)]
        row["full_replay_s"] = median([r["seconds"] for r in full])
        row["full_replay_events_per_s"] = n / row["full_replay_s"]
        row["peak_rss_mib_full"] = max(r["peak_rss_mib"] for r in full)
        row["jobs"], row["runs"] = full[0]["jobs"], full[0]["runs"]
        first = child_replay("startup", db)          # no snapshot yet: replays and writes one
        row["startup_first_s"] = first["seconds"]
        warm = [child_replay("startup", db) for _ in range(reps)]
        row["startup_s"] = median([r["seconds"] for r in warm])
        row["peak_rss_mib_startup"] = max(r["peak_rss_mib"] for r in warm)
        # invariant: the snapshot-backed state equals a full replay (and the plain fold)
        with open_store(db, readonly=True) as s:
            snap_state = s.state()
            row["snapshot_equals_full_replay"] = snap_state == s.state(snapshot=False)
            if n <= 100000:
                row["snapshot_equals_plain_project"] = snap_state == project(s.read())
        # status: in-process (api.status, warm, what the agent runs on the host) and the CLI
        lat = []
        for _ in range(7):
            t = time.perf_counter()
            api.status(db)
            lat.append(time.perf_counter() - t)
        row["status_ms"] = median(lat) * 1000
        cli = []
        env = dict(os.environ, LEDGER_DB=db)
        for _ in range(3):
            t = time.perf_counter()
            run_cli(["status"], env)
            cli.append(time.perf_counter() - t)
        row["status_cli_ms"] = median(cli) * 1000
        out["sizes"][str(n)] = row
        del snap_state
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ledger.cli.main"], check=True, cwd=ROOT)
    out["cli_import_ms"] = (time.perf_counter() - t) * 1000
    return out


# ---- 3. remote round trip --------------------------------------------------------------------

def bench_remote(tmp, quick):
    """``ledger status --host`` against a real sshd on 127.0.0.1 (tests/sshd_harness.py),
    logging in the ``ledgertest`` user whose ledger holds a 10k-event history."""
    import secrets
    from pathlib import Path

    import sshd_harness as harness
    from ledger.store import open_store
    from ledger_gen import synthetic_events
    try:
        harness.check_available()
        account = harness.ensure_test_user()
    except harness.Unavailable as exc:
        return {"skipped": str(exc)}
    work = Path(tmp) / "ssh"
    work.mkdir()
    host_key = harness.keygen(work / "host_ed25519", "bench-host")
    key = harness.keygen(work / "id_ed25519", "ledger-bench")
    harness.install_authorized_key(account, harness.public_key_text(key))
    scratch = Path(account.pw_dir) / ("ledger-bench-" + secrets.token_hex(4))
    events = 10000
    server = harness.start_sshd("bench", "127.0.0.1", host_key, work)
    try:
        config = work / "ssh_config"
        config.write_text("Host bench-gpu\n    HostName 127.0.0.1\n    Port %d\n    User %s\n    IdentityFile %s\n"
                          "    IdentitiesOnly yes\n" % (server.port, harness.TEST_USER, key))
        known = work / "known_hosts"
        known.write_text(harness.known_hosts_line("127.0.0.1", server.port, host_key))
        local_db = os.path.join(tmp, "remote-source.db")
        with open_store(local_db) as s:
            s.append_bulk(synthetic_events(events, seed=21))
        scratch.mkdir(mode=0o700)
        remote_db = scratch / "ledger.db"
        shutil.copyfile(local_db, remote_db)
        for path in (scratch, remote_db):
            os.chown(path, account.pw_uid, account.pw_gid)
            os.chmod(path, 0o700 if path == scratch else 0o600)
        env = dict(os.environ, LEDGER_SSH_CONFIG=str(config), LEDGER_KNOWN_HOSTS=str(known),
                   LEDGER_HOME=os.path.join(tmp, "laptop-home"))
        env.pop("LEDGER_DB", None)

        def settled_counts():
            """(connections, sessions) sshd accepted so far, once every connection it took
            has been closed and logged (sshd logs as it goes; wait until it caught up)."""
            def read():
                text = server.log_text()
                opened = set(re.findall(r"Connection from \S+ port (\d+)", text))
                ended = set(re.findall(r"(?:Closing connection to|Connection closed by|Connection reset by|"
                                       r"Disconnected from)\D*\S+ port (\d+)", text))
                if not opened <= ended:
                    return None
                return (text.count("Accepted publickey for %s" % harness.TEST_USER),
                        text.count("Starting session: "))        # exec commands and sftp alike
            return wait_until(read, timeout=10, interval=0.01, what="sshd to log the closed sessions")

        def one():
            before = settled_counts()
            t = time.perf_counter()
            run_cli(["--db", remote_db, "status", "--host", "bench-gpu"], env)
            took = time.perf_counter() - t
            after = settled_counts()
            return took, after[0] - before[0], after[1] - before[1]
        first = one()                         # installs the bundle on the host if it is not there yet
        warm = [one() for _ in range(5 if quick else 15)]
        # in process: connecting (TCP, key exchange, host key check, auth) apart from the command
        from ledger.remote import RemoteBackend
        saved = {k: os.environ.get(k) for k in ("LEDGER_SSH_CONFIG", "LEDGER_KNOWN_HOSTS", "LEDGER_HOME")}
        os.environ.update({k: env[k] for k in saved})
        connect, call = [], []
        try:
            for _ in range(5 if quick else 15):
                t = time.perf_counter()
                backend = RemoteBackend("bench-gpu", db=str(remote_db))
                t1 = time.perf_counter()
                backend.call("status")
                call.append(time.perf_counter() - t1)
                connect.append(t1 - t)
                commands = backend.transport.commands_run
                backend.close()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return {
            "events": events, "cli_ms_first": first[0] * 1000, "first_connections": first[1],
            "first_commands": first[2], "cli_ms_median": median([w[0] for w in warm]) * 1000,
            "cli_ms_all": [w[0] * 1000 for w in warm],
            "connections_per_command": max(w[1] for w in warm), "commands_per_command": max(w[2] for w in warm),
            "connect_ms_median": median(connect) * 1000, "call_ms_median": median(call) * 1000,
            "transport_commands_per_call": commands,
        }
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


# ---- 4. scheduler cost ---------------------------------------------------------------------

def strace_window(pid, seconds, out_path):
    """Subprocesses the process starts and its ticks (sleeps of its main loop) over a window,
    counted by strace attached to it (a separate window: ptrace slows what it traces)."""
    if not shutil.which("strace"):
        return None
    proc = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=clone,clone3,vfork,fork,execve,clock_nanosleep",
                             "-o", out_path, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)                      # the measurement window itself
    proc.send_signal(signal.SIGINT)          # strace detaches cleanly on SIGINT
    proc.wait(timeout=30)
    spawns, ticks, first_exec = 0, 0, {}
    with open(out_path, errors="replace") as f:
        for line in f:
            m = re.match(r"^(\d+)\s+(\w+)\((.*)", line)
            if not m:
                continue
            who, call, rest = int(m.group(1)), m.group(2), m.group(3)
            if who == pid and call in ("clone", "clone3", "vfork", "fork") and "CLONE_THREAD" not in rest:
                spawns += 1
            elif who == pid and call == "clock_nanosleep":
                ticks += 1
            elif call == "execve" and who != pid and who not in first_exec:
                first_exec[who] = os.path.basename(rest.split('"')[1]) if '"' in rest else "?"
    names = {}
    for name in first_exec.values():
        names[name] = names.get(name, 0) + 1
    return {"spawns": spawns, "ticks": ticks, "programs": names}


def bench_sched(tmp, quick):
    """The detached scheduler while 8 long jobs run and 8 more wait for a GPU."""
    from ledger.scheduler import scheduler_pid
    from ledger.store import open_store
    from ledger_gen import synthetic_events
    window = 6.0 if quick else 120.0
    trace_window = 4.0 if quick else 65.0      # the full window sees a GPU read and a dead-session check
    job_seconds = window + trace_window + 30
    base = os.path.join(tmp, "sched")
    work = os.path.join(base, "work")
    os.makedirs(work)
    db = os.path.join(base, "ledger", "ledger.db")
    env = dict(os.environ, LEDGER_DB=db, LEDGER_HOME=os.path.join(base, "home"))
    # the ledger already holds past sweeps, as a host's does after months: a tick must not
    # cost more because of them
    history = 10000 if quick else 100000
    with open_store(db) as s:
        history = s.append_bulk(synthetic_events(history, seed=31, exact=False))
    jobs = [{"id": "long%02d" % i, "seconds": job_seconds, "mem": 30000} for i in range(16)]
    manifest = {"project": "schedcost", "cwd": work, "gpu_provider": "sim:8x80G,lag=2", "launcher": "screen",
                "gpu_free_threshold_mib": 500, "stale_grace": 600,
                "jobs": [{"id": j["id"], "cmd": job_cmd(j, 1.0)} for j in jobs]}
    path = os.path.join(base, "sweep.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    out = run_cli(["submit", path, "--host", "local"], env).stdout
    run = out.split("run ", 1)[1].split()[0]
    try:
        def launched():
            with open_store(db, readonly=True) as s:
                return len(list(s.read(run=run, kinds=["launched"]))) >= 8
        wait_until(launched, timeout=120, what="8 jobs to run")
        # let the jobs' memory ramp finish and the scheduler's fast GPU sampling after the
        # launches wind down: the window measures the steady state of waiting
        state_file = os.path.join(base, "ledger", "sim", "state.json")

        def ramped():
            with open(state_file) as f:
                allocs = [a for a in json.load(f)["allocations"] if a["kind"] == "job"]
            return len(allocs) == 8 and all(a["mib"] >= 30000 for a in allocs)
        wait_until(ramped, timeout=60, what="the jobs' memory to ramp up")
        pid = scheduler_pid(db)
        own0, kids0 = proc_cpu_seconds(pid)
        t0 = time.monotonic()
        time.sleep(window)                   # the measurement window itself
        own1, kids1 = proc_cpu_seconds(pid)
        el = time.monotonic() - t0
        trace = strace_window(pid, trace_window, os.path.join(base, "strace.txt"))
        with open_store(db, readonly=True) as s:
            events = list(s.read(run=run))
        running = sum(1 for e in events if e.kind == "launched") - sum(1 for e in events if e.kind == "exited")
    finally:
        run_cli(["cancel", run, "--host", "local"], env, check=False)
        wait_until(lambda: scheduler_pid(db) is None, timeout=120, what="the scheduler to exit")
    own, kids = own1 - own0, kids1 - kids0
    res = {
        "window_s": el, "running": running, "waiting": len(jobs) - 8, "history_events": history,
        "own_cpu_s": own, "children_cpu_s": kids,
        "cpu_s_per_hour": (own + kids) / el * 3600, "own_cpu_s_per_hour": own / el * 3600,
        "children_cpu_s_per_hour": kids / el * 3600, "cpu_percent_of_core": (own + kids) / el * 100,
        "trace_window_s": trace_window,
    }
    if trace:
        res.update({"subprocesses": trace["spawns"], "ticks": trace["ticks"],
                    "subprocesses_per_tick": trace["spawns"] / float(trace["ticks"] or 1),
                    "spawned": ", ".join("%s x%d" % kv for kv in sorted(trace["programs"].items())) or "none"})
    else:
        res.update({"subprocesses": None, "ticks": None, "subprocesses_per_tick": None,
                    "spawned": "strace not installed"})
    return res


# ---- report -----------------------------------------------------------------------------

def targets(r):
    """Each target of issue 6: (figure, target, met?)."""
    out = []
    sim = r.get("sim")
    if sim:
        led = sim["ledger"]
        out.append(("idle gap median beyond the release lag", "< 1 s", led["gap_beyond_lag_median"],
                    led["gap_beyond_lag_median"] < 1.0))
        out.append(("makespan / ideal", "<= 1.05", sim["makespan_over_ideal"], sim["makespan_over_ideal"] <= 1.05))
        bad = led["busy_gpu_launches"] + led["memory_overlaps"] + led["double_launches_in_ledger"]
        out.append(("launches onto a busy GPU", "0", bad, bad == 0))
        ratio = sim["ratio_idle_waiting_naive60_over_ledger"]
        out.append(("idle GPU time while jobs waited, naive 60 s poll / ledger", ">= 30x", ratio,
                    ratio is not None and ratio >= 30))
    scale = r.get("scale")
    if scale:
        big = scale["sizes"].get("1000000")
        if big:
            out.append(("full replay of 1M events (no snapshot)", "< 2 s", big["full_replay_s"],
                        big["full_replay_s"] < 2))
            out.append(("startup replay of 1M events (snapshot + tail)", "< 2 s", big["startup_s"],
                        big["startup_s"] < 2))
        mid = scale["sizes"].get("100000")
        if mid:
            out.append(("status at 100k events (in process, warm)", "< 100 ms", mid["status_ms"],
                        mid["status_ms"] < 100))
    remote = r.get("remote")
    if remote and not remote.get("skipped"):
        out.append(("SSH connections / commands per status --host", "1 / 1",
                    "%s / %s" % (remote["connections_per_command"], remote["commands_per_command"]),
                    remote["connections_per_command"] == 1 and remote["commands_per_command"] == 1))
    sched = r.get("sched")
    if sched:
        out.append(("scheduler CPU while waiting (% of one core, children included)", "< 1 %",
                    sched["cpu_percent_of_core"], sched["cpu_percent_of_core"] < 1))
    return [{"figure": f, "target": t, "value": v, "met": bool(m)} for f, t, v, m in out]


def _f(x, digits=2, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float):
        return ("%%.%df%%s" % digits) % (x, unit)
    return "%s%s" % (x, unit)


def markdown(r):
    m = r["machine"]
    lines = ["Machine: %s cores (`nproc`), %s, Python %s, SQLite %s, Linux %s; %s%s." % (
        m["nproc"], m["cpu"], m["python"], m["sqlite"], m["kernel"], m["date"], " (--quick)" if r["quick"] else "")]
    sim = r.get("sim")
    if sim:
        led, nai, ide, n60 = sim["ledger"], sim["naive"], sim["ideal"], sim["naive_model_at_60s"]
        nmb = sim["naive_model_at_bench_poll"]
        lines += ["", "**GPU idle time**: %d jobs of %s s on %d simulated GPUs, memory ramp %g s, release lag %g s"
                  % (sim["jobs"], "%d-%d" % (min(sim["durations"]), max(sim["durations"])), sim["gpus"],
                     sim["ramp"], sim["lag"]), "",
                  "| | ledger | ideal (model) | naive, poll %g s (measured) | naive, poll %g s (model) | naive, poll 60 s (model) |"
                  % (sim["naive_poll_bench"], sim["naive_poll_bench"]),
                  "|---|---|---|---|---|---|"]

        def row(name, key, digits=1, unit=" s"):
            lines.append("| %s | %s | %s | %s | %s | %s |" % (name, _f(led[key], digits, unit), _f(ide[key], digits, unit),
                                                             _f(nai[key], digits, unit), _f(nmb[key], digits, unit),
                                                             _f(n60[key], digits, unit)))
        row("makespan", "makespan")
        row("idle GPU time while jobs waited (GPU-s)", "idle_gpu_s_while_waiting", 1, "")
        row("idle GPU time, whole sweep (GPU-s)", "idle_gpu_s_total", 1, "")
        row("idle gap on a GPU, median", "gap_median", 2)
        row("idle gap, p95", "gap_p95", 2)
        row("idle gap, max", "gap_max", 2)
        row("launches onto a busy GPU", "busy_gpu_launches", 0, "")
        row("allocations over unreleased memory", "memory_overlaps", 0, "")
        lines.append("| OOMs | %d | - | %d | - | - |" % (led["ooms"], nai["ooms"]))
        lines += ["", "ledger: makespan %.3f x ideal; gap median %.2f s beyond the %g s lag; double launches in "
                  "the ledger's events: %d. Naive / ledger: idle while waiting %.1fx (poll %g s measured), "
                  "%.1fx (poll 60 s model); whole-sweep idle %.1fx / %.1fx; makespan %.2fx / %.2fx. Idle "
                  "beyond the ideal's (avoidable): ledger %.1f GPU-s, naive at 60 s %.1f GPU-s (%.0fx). Model vs "
                  "measured naive makespan at poll %g s: %+.1f %%."
                  % (sim["makespan_over_ideal"], led["gap_beyond_lag_median"], sim["lag"],
                     led["double_launches_in_ledger"], sim["ratio_idle_waiting_naive_over_ledger"],
                     sim["naive_poll_bench"], sim["ratio_idle_waiting_naive60_over_ledger"],
                     sim["ratio_idle_total_naive_over_ledger"], sim["ratio_idle_total_naive60_over_ledger"],
                     sim["ratio_makespan_naive_over_ledger"], sim["ratio_makespan_naive60_over_ledger"],
                     sim["avoidable_idle_waiting"]["ledger"], sim["avoidable_idle_waiting"]["naive_60s"],
                     sim["ratio_avoidable_idle_naive60_over_ledger"] or float("inf"), sim["naive_poll_bench"], 100 * sim["model_error_makespan_at_bench_poll"])]
    scale = r.get("scale")
    if scale:
        lines += ["", "**Ledger scale**: append %.0f events/s (each its own durable transaction, median %.1f ms)"
                  % (scale["append_per_s"], scale["append_ms_median_per_event"]), "",
                  "| events | jobs | file | full replay | replay rate | startup (snapshot + tail) | first startup "
                  "(writes snapshot) | status (in process) | `ledger status` (CLI) | peak RSS full / startup | "
                  "snapshot = replay |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, row in sorted(scale["sizes"].items(), key=lambda kv: int(kv[0])):
            lines.append("| %s | %d | %.0f MiB | %.2f s | %.0fk ev/s | %.3f s | %.2f s | %.0f ms | %.0f ms | %.0f / %.0f MiB | %s |" % (
                "{:,}".format(int(n)), row["jobs"], row["file_mib"], row["full_replay_s"],
                row["full_replay_events_per_s"] / 1000, row["startup_s"], row["startup_first_s"], row["status_ms"],
                row["status_cli_ms"], row["peak_rss_mib_full"], row["peak_rss_mib_startup"],
                "yes" if row["snapshot_equals_full_replay"] and row.get("snapshot_equals_plain_project", True) else "NO"))
        lines.append("")
        lines.append("(`ledger status` CLI times include starting Python and importing the CLI: %.0f ms alone.)"
                     % scale["cli_import_ms"])
    remote = r.get("remote")
    if remote:
        lines += [""]
        if remote.get("skipped"):
            lines.append("**Remote round trip**: skipped (%s)." % remote["skipped"])
        else:
            lines.append("**Remote round trip** (`ledger status --host` to sshd on 127.0.0.1, %d-event ledger): "
                         "median %.0f ms per command (the CLI, end to end); in process: connect %.0f ms + "
                         "command %.0f ms. Per command: %s SSH connection(s), %s command(s) (counted in sshd's "
                         "log). First call: %.0f ms, %d connection(s), %d command(s) (%s)."
                         % (remote["events"], remote["cli_ms_median"], remote["connect_ms_median"],
                            remote["call_ms_median"], remote["connections_per_command"],
                            remote["commands_per_command"], remote["cli_ms_first"], remote["first_connections"],
                            remote["first_commands"], "it uploaded the bundle" if remote["first_commands"] > 1
                            else "the bundle was already on the host"))
    sched = r.get("sched")
    if sched:
        lines += ["", "**Scheduler cost** while %d jobs run and %d wait, on a ledger holding %d past events "
                  "(window %.0f s): %.2f CPU-s per hour "
                  "(%.3f %% of one core; %.2f s own + %.2f s in its subprocesses per hour); %.3f subprocesses per "
                  "tick (%d in %d ticks: %s)."
                  % (sched["running"], sched["waiting"], sched["history_events"], sched["window_s"],
                     sched["cpu_s_per_hour"],
                     sched["cpu_percent_of_core"], sched["own_cpu_s_per_hour"], sched["children_cpu_s_per_hour"],
                     sched["subprocesses_per_tick"], sched["subprocesses"], sched["ticks"], sched["spawned"])]
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in r["targets"]:
        v = t["value"]
        lines.append("| %s | %s | %s | %s |" % (t["figure"], t["target"], _f(v, 3) if isinstance(v, float) else v,
                                               "yes" if t["met"] else "**no**"))
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------

SECTIONS = ("sim", "scale", "remote", "sched")


def main(argv=None):
    parser = argparse.ArgumentParser(description="ledger benchmark")
    parser.add_argument("--quick", action="store_true", help="the short CI version")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    parser.add_argument("--json", default="bench-results.json", help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    results = {"machine": machine(), "quick": args.quick, "sections": only}
    tmp = tempfile.mkdtemp(prefix="ledger-bench-")
    started = time.time()
    try:
        for name in SECTIONS:
            if name in only:
                results[name] = globals()["bench_" + name](tmp, args.quick)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["seconds"] = time.time() - started
    results["targets"] = targets(results)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True, default=str)
    print(markdown(results))
    print("\n(JSON: %s)" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
