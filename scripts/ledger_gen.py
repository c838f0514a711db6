"""Synthetic ledgers for the benchmark and the snapshot tests: realistic event streams, fast.

``synthetic_events(n)`` yields about ``n`` events (exactly ``n`` when ``exact``) that the
projection accepts, shaped like real sweeps: a run of ``jobs_per_run`` jobs (its plan in
``run_submitted``), every job submitted, launched on a GPU, exited with a log tail of
training lines, and completed; about one job in eight runs out of GPU memory once and is
retried; one in forty fails for good (stuck); a few are cancelled; each run ends with
``run_finished`` and ``summary_written``, between scheduler starts and stops.

Deterministic for a seed. Events carry ts but no seq/version: the store assigns those
(``Store.append_bulk``).
"""

import random

from ledger.events import Event

GPUS = 8


def _plan(run, project, jobs):
    return {
        "project": project, "cwd": "~/work/%s" % project, "conda": "torch", "ssh": "gpu-box",
        "gpus": list(range(GPUS)), "max_parallel": GPUS, "gpu_free_threshold_mib": 500,
        "launcher": "screen", "gpu_provider": None, "stale_grace": 60,
        "phases": [{"name": "main", "depends_on": []}],
        "jobs": [{"id": j, "phase": "main", "cmd": "python train.py --seed %d --lr 3e-4 --n_hidden 256" % i,
                  "gpus_per_job": 1, "output_check": "results/%s.json" % j, "env": {},
                  "timeout": None} for i, j in enumerate(jobs)],
    }


def _tail(rng, steps):
    lines = ["epoch %d step %d loss %.4f lr 3.0e-04 tokens/s %d" % (1 + s // 50, s, 2.5 / (1 + 0.01 * s),
                                                                      rng.randint(38000, 42000))
             for s in range(steps - 12, steps)]
    return "\n".join(lines + ["saved results to results/out.json"])


def _run_events(rng, r, t, jobs_per_run):
    project = "sweep%03d" % (r % 1000)
    run = "%s-2026%04dT%06dZ" % (project, r // 1000, r % 1000000)
    jobs = ["s%d_N%d" % (i, 64 << (i % 3)) for i in range(jobs_per_run)]
    out = [Event(kind="scheduler_started", run="-", ts=t,
                 data={"pid": 1000 + r, "version": "0.1.0", "bundle": None, "gpu_provider": "nvidia-smi",
                       "host": "gpu-box"})]
    plan = _plan(run, project, jobs)
    out.append(Event(kind="run_submitted", run=run, ts=t,
                     data={"project": project, "plan": plan, "plan_hash": "%064x" % rng.getrandbits(256),
                           "host": "gpu-box", "cwd": plan["cwd"], "actor": "alice@laptop",
                           "request_id": "%016x" % rng.getrandbits(64)}))
    for spec in plan["jobs"]:
        out.append(Event(kind="submitted", run=run, job=spec["id"], attempt=1, ts=t,
                         data={"phase": "main", "cmd": spec["cmd"], "gpus_per_job": 1}))
    clock = [t + 0.1 * g for g in range(GPUS)]
    for i, job in enumerate(jobs):
        g = min(range(GPUS), key=lambda k: clock[k])
        attempt = 1
        fate = rng.random()
        oom_first = fate < 0.125
        while True:
            start = clock[g] + rng.uniform(0.3, 1.0)
            session = "ledger.%s.%s.a%d" % (run, job, attempt)
            log = "/home/alice/work/%s/experiment_queue/%s/logs/%s.%d.log" % (project, run, job, attempt)
            out.append(Event(kind="launch_requested", run=run, job=job, attempt=attempt, ts=start,
                             data={"gpus": [g], "gpu_uuids": ["GPU-%08x" % g], "session": session, "log": log,
                                   "control": "/home/alice/.ledger/runs/%s" % run}))
            pid = rng.randint(10000, 4000000)
            out.append(Event(kind="launched", run=run, job=job, attempt=attempt, ts=start + 0.2,
                             data={"pid": pid, "session": session, "gpus": [g], "gpu_uuids": ["GPU-%08x" % g]}))
            if fate > 0.99:
                out.append(Event(kind="cancelled", run=run, job=job, attempt=attempt, ts=start + 5,
                                 data={"actor": "alice@laptop", "reason": None}))
                clock[g] = start + 5
                break
            dur = rng.uniform(60, 3600)
            end = start + dur
            oom = oom_first and attempt == 1
            code = 1 if (oom or fate > 0.975) else 0
            out.append(Event(kind="exited", run=run, job=job, attempt=attempt, ts=end + 0.3,
                             data={"exit_code": code, "signal": None, "ended_at": end, "duration": round(dur, 3),
                                   "log_tail": _tail(rng, 200 + int(dur)), "reason": None}))
            clock[g] = end + 2.0
            if oom:
                out.append(Event(kind="oom_detected", run=run, job=job, attempt=attempt, ts=end + 0.3,
                                 data={"oom_kind": "pytorch", "requested_mib": 2048,
                                       "line": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                                       "retry_at": end + 120.3, "delay": 120}))
                out.append(Event(kind="retried", run=run, job=job, attempt=attempt, ts=end + 120.5,
                                 data={"next_attempt": attempt + 1}))
                attempt += 1
                clock[g] = max(clock[g], end + 120.5)
                continue
            if code:
                out.append(Event(kind="failed", run=run, job=job, attempt=attempt, ts=end + 0.3,
                                 data={"reason": "exit code 1", "outcome": "exit_code", "exit_code": 1,
                                       "log_tail": "Traceback (most recent call last):\nValueError: bad config",
                                       "retry_at": None, "delay": None}))
                out.append(Event(kind="stuck", run=run, job=job, attempt=attempt, ts=end + 0.3,
                                 data={"reason": "exit code 1"}))
            else:
                out.append(Event(kind="completed", run=run, job=job, attempt=attempt, ts=end + 0.3,
                                 data={"outputs": ["results/%s.json" % job]}))
            break
    end = max(clock) + 1
    out.append(Event(kind="run_finished", run=run, ts=end, data={"counts": {"completed": len(jobs)}}))
    out.append(Event(kind="summary_written", run=run, ts=end,
                     data={"path": "/home/alice/work/%s/experiment_queue/%s/summary.md" % (project, run)}))
    out.append(Event(kind="scheduler_stopped", run="-", ts=end + 1,
                     data={"pid": 1000 + r, "reason": "idle: every run is finished"}))
    return out, end + 60


def synthetic_events(n, seed=0, jobs_per_run=64, start_ts=1.7e9, exact=True):
    """About ``n`` events (exactly ``n`` if ``exact``: the last run may be cut short, which
    leaves it unfinished, as a live ledger's last run is)."""
    rng = random.Random(seed)
    t = start_ts
    produced = 0
    r = 0
    while produced < n:
        events, t = _run_events(rng, r, t, jobs_per_run)
        r += 1
        if exact and produced + len(events) > n:
            events = events[:n - produced]
        for e in events:
            yield e
        produced += len(events)
