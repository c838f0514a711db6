"""What each command does on the host that owns the ledger, as plain JSON-able data.

The click layer calls these directly for ``--host local``; for a remote host the
same functions run there through ``ledger.agent`` and their JSON comes back over
one SSH command. Formatting (tables, colours, summaries) stays on the laptop.
"""

import getpass
import os
import re
import signal
import socket
import time
from datetime import datetime, timezone

from . import scheduler as sched
from .errors import ConflictError, LedgerError, NotFoundError
from .events import Event, event_to_dict
from .plan import Plan
from .states import ACTIVE, FINAL, JobStatus
from .summary import job_runtime, render_summary


def actor():
    """Who did a manual action: user@host (recorded on every manual event)."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = str(os.getuid())
    return "%s@%s" % (user, socket.gethostname())


def db_path(db=None):
    """The ledger file this host uses: ``db``, else $LEDGER_DB, else ~/.ledger/ledger.db; moved to
    a local disk when that folder is on a network filesystem (see ledger/localdisk.py)."""
    from .localdisk import ledger_path
    from .store import default_db_path
    return ledger_path(os.path.abspath(os.path.expanduser(db or default_db_path())))


def _open(db, readonly=False):
    from .store import open_store
    return open_store(db_path(db), readonly=readonly)


def _state(db, until_ts=None, until_seq=None):
    path = db_path(db)
    if not os.path.exists(path):
        raise NotFoundError("no ledger at %s (nothing submitted on this host yet)" % path)
    with _open(path, readonly=True) as store:
        return store.state(until_ts=until_ts, until_seq=until_seq)


# ---- time arguments -------------------------------------------------------

_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text, now=None, allow_seq=True):
    """SINCE/UNTIL/AT: an ISO time (UTC unless it says otherwise), a relative time
    (`90m`, `2h`, `1d` ago) or an event number. Returns ("ts", epoch) or ("seq", n)."""
    now = time.time() if now is None else now
    text = str(text).strip()
    if allow_seq and re.fullmatch(r"#?\d+", text) and not re.fullmatch(r"\d{8}", text):
        return ("seq", int(text.lstrip("#")))
    m = _REL.match(text)
    if m:
        return ("ts", now - float(m.group(1)) * _UNIT[m.group(2)])
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LedgerError("time %r: expected an ISO time (2026-12-03T14:00), a relative time (90m, 2h, 1d)%s"
                          % (text, " or an event number" if allow_seq else ""))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return ("ts", dt.timestamp())


# ---- submit -------------------------------------------------------------

def new_run_id(project, now, existing):
    base = "%s-%s" % (project, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))
    run_id, n = base, 2
    while run_id in existing:
        run_id, n = "%s-%d" % (base, n), n + 1
    return run_id


def submit(db, plan_dict, host="local", new_run=False, gpu_provider=None, start_scheduler=True,
           request_id=None):
    """Record a plan as a run (one atomic append) and make sure the host's scheduler runs.

    The same plan again returns the run it already made, unless ``new_run``; the same
    ``request_id`` again (a client rerunning after a dropped connection) always returns
    the run that request made. A scheduler of an older bundle is replaced first.
    """
    plan = Plan.from_dict(plan_dict)
    if gpu_provider:
        plan = Plan.from_dict(dict(plan.to_dict(), gpu_provider=gpu_provider))
    path = db_path(db)
    want = plan.gpu_provider or "nvidia-smi"
    upgraded = _stop_outdated_scheduler(path) if start_scheduler else None
    phash = plan.content_hash()

    def build(state):
        _check_provider(path, state, want)
        mine = [r for r in state.runs.values() if request_id and r.request_id == request_id]
        same = [r for r in state.runs.values() if r.plan_hash == phash]
        if mine or (same and not new_run):
            run = mine[0] if mine else max(same, key=lambda r: r.submitted_at)
            return [], {"run": run.id, "created": bool(mine), "finished": run.finished, "jobs": len(run.jobs)}
        run_id = new_run_id(plan.project, time.time(), state.runs)
        data = {"project": plan.project, "plan": plan.to_dict(), "plan_hash": phash, "host": host,
                "cwd": plan.cwd, "actor": actor()}
        if request_id:
            data["request_id"] = request_id
        events = [Event(kind="run_submitted", run=run_id, data=data)]
        events += [Event(kind="submitted", run=run_id, job=j.id, attempt=1,
                         data={"phase": j.phase, "cmd": j.cmd, "gpus_per_job": j.gpus_per_job})
                   for j in plan.jobs]
        return events, {"run": run_id, "created": True, "finished": False, "jobs": len(plan.jobs)}

    # Nothing may be appended between reading the ledger and recording the run, or two
    # submits of one plan (or one request rerun after a drop) could both record it.
    try:
        for _ in range(200):
            with _open(path) as store:
                state = store.state()
                events, out = build(state)
                try:
                    if events:
                        store.append(events, expect_last_seq=state.last_seq)
                    break
                except ConflictError:
                    time.sleep(0.02)
        else:
            raise LedgerError("the ledger at %s kept changing; nothing was submitted, try again" % path)
    except BaseException:
        if upgraded:        # never leave the host without the scheduler this call stopped
            ensure_scheduler(path)
        raise
    if start_scheduler and (not out["finished"] or upgraded):
        out["scheduler_pid"] = ensure_scheduler(path, want)
    if upgraded:
        out["upgraded_from"] = upgraded
    out["db"] = path
    return out


def _check_provider(path, state, want):
    """The GPU provider belongs to the host's scheduler: one per ledger."""
    running = sched.scheduler_pid(path)
    have = state.scheduler.get("gpu_provider") if running else None
    if have and have != want:
        raise LedgerError("gpu provider %s differs from this host's running scheduler's (%s); "
                          "wait for its runs to finish or use another --db" % (want, have))
    for run in state.runs.values():
        other = run.plan.get("gpu_provider") or "nvidia-smi"
        if not run.finished and other != want:
            raise LedgerError("gpu provider %s differs from unfinished run %s's (%s); one provider per "
                              "ledger" % (want, run.id, other))


def _version_tuple(key):
    version = (key or "").split("-", 1)[0]
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _stop_outdated_scheduler(path, wait=5.0, stop_wait=60.0):
    """If this ledger's scheduler runs from an older bundle than this program's, stop it
    cleanly (SIGTERM: it records scheduler_stopped; running jobs go on) so that the
    caller starts the new one, which adopts them. Returns the old bundle key, or None.
    A scheduler of a newer release is left alone (another laptop upgraded the host)."""
    mine = os.environ.get("LEDGER_BUNDLE_KEY")
    if not mine or not os.path.exists(path):
        return None
    deadline = time.time() + wait
    while True:
        pid = sched.scheduler_pid(path)
        if pid is None:
            return None
        with _open(path, readonly=True) as store:
            info = store.state().scheduler
        if info.get("running") and info.get("pid") == pid:
            break
        if time.time() > deadline:
            return None     # a scheduler that never announced itself: leave it
        time.sleep(0.05)
    theirs = info.get("bundle")
    if theirs == mine or (theirs and _version_tuple(theirs) > _version_tuple(mine)):
        return None
    out = stop(path, wait=stop_wait, reason="upgrade from bundle %s to %s" % (theirs or "?", mine))
    if not out["stopped"]:
        raise LedgerError("the scheduler (pid %s) of the older bundle %s did not stop within %.0f s; "
                          "nothing was submitted" % (pid, theirs or "?", stop_wait))
    return theirs or "unknown"


def ensure_scheduler(path, provider=None, wait=5.0):
    """The pid of the ledger's scheduler, starting one (detached) if none runs."""
    deadline = time.time() + wait
    while True:
        pid = sched.scheduler_pid(path)
        if pid is None:
            break
        with _open(path, readonly=True) as store:
            state = store.state()
        if state.scheduler.get("running", False) or time.time() > deadline:
            return pid
        time.sleep(0.05)   # a scheduler is shutting down; start a new one once it is gone
    return sched.spawn_detached(path, provider)


# ---- read side ------------------------------------------------------------

def _pick_run(state, run=None):
    if run:
        if run not in state.runs:
            matches = [r for r in state.runs if r.startswith(run)]
            if len(matches) != 1:
                raise NotFoundError("no run %r in this ledger (runs: %s)" % (run, ", ".join(sorted(state.runs)) or "none"))
            run = matches[0]
        return state.runs[run]
    return None


def _job_lookup(state, job, run=None):
    if run:
        r = _pick_run(state, run)
        if job not in r.jobs:
            raise NotFoundError("no job %r in run %s" % (job, r.id))
        return r, r.jobs[job]
    runs = sorted((r for r in state.runs.values() if job in r.jobs), key=lambda r: r.submitted_at)
    if not runs:
        raise NotFoundError("no job %r in any run of this ledger" % job)
    return runs[-1], runs[-1].jobs[job]


def run_row(run, now):
    c = run.counts()
    if run.finished:
        st = "finished"
    elif run.paused:
        st = "paused"
    else:
        st = "running"
    return {"run": run.id, "state": st, "done": c["completed"], "total": len(run.jobs),
            "running": c["running"] + c["launching"], "retrying": c["retry_wait"], "stuck": c["stuck"],
            "blocked": c["blocked"], "cancelled": c["cancelled"], "pending": c["pending"],
            "started": run.submitted_at, "finished_at": run.finished_at,
            "elapsed": (run.finished_at or now) - run.submitted_at}


def job_row(job, now):
    a = job.attempts[-1] if job.attempts else None
    if job.status in ACTIVE and a:
        elapsed = now - (a.started_at or a.requested_at or now)
    else:
        elapsed = job_runtime(job) or None
    return {"job": job.id, "phase": job.phase, "status": job.status.value,
            "gpus": list(job.gpus) if job.status in ACTIVE else (list(a.gpus) if a else []),
            "attempt": job.attempt, "elapsed": elapsed, "pid": job.pid, "session": job.session,
            "oom_count": job.oom_count, "last_error": job.reason if job.status != JobStatus.COMPLETED else None,
            "retry_at": job.retry_at}


def status(db, run=None, at=None, now=None):
    """One run in detail (named, or the only unfinished one), else one row per run."""
    until = parse_when(at, allow_seq=True) if at else None
    state = _state(db, until_ts=until[1] if until and until[0] == "ts" else None,
                   until_seq=until[1] if until and until[0] == "seq" else None)
    now = now or (state.last_ts if at else time.time())
    picked = _pick_run(state, run)
    if picked is None:
        unfinished = [r for r in state.runs.values() if not r.finished]
        if len(unfinished) == 1:
            picked = unfinished[0]
        elif len(state.runs) == 1:
            picked = next(iter(state.runs.values()))
    sched_info = scheduler_info(db, state)
    if picked is None:
        return {"kind": "runs", "at": state.last_ts if at else None, "scheduler": sched_info,
                "runs": [run_row(r, now) for r in sorted(state.runs.values(), key=lambda r: r.submitted_at)]}
    waits = _pending_reasons(picked, sched_info["running"] or bool(at))
    return {"kind": "run", "at": state.last_ts if at else None, "scheduler": sched_info,
            "run": run_row(picked, now), "counts": picked.counts(),
            "jobs": [dict(job_row(j, now), waiting=waits.get(j.id)) for j in picked.jobs.values()],
            "launching_halted": state.launching_halted, "unreadable_gpus": {str(k): v for k, v in state.unreadable_gpus.items()}}


def _pending_reasons(run, scheduler_running):
    """job id -> why a pending job is not running yet, from the state alone."""
    from .decide import phase_gate
    if run.finished:
        return {}
    plan = run.plan_obj
    gate = phase_gate(run, plan)
    deps = {p.name: p.depends_on for p in plan.phases}
    out = {}
    for job in run.jobs.values():
        if job.status != JobStatus.PENDING:
            continue
        if gate.get(job.phase) == "wait":
            out[job.id] = "waits for phase %s" % ", ".join(deps.get(job.phase, ()))
        elif run.paused:
            out[job.id] = "run paused (`ledger resume`)"
        elif not scheduler_running:
            out[job.id] = "no scheduler running (`ledger resume`)"
        else:
            out[job.id] = "waits for a free GPU"
    return out


def scheduler_info(db, state=None):
    path = db_path(db)
    pid = sched.scheduler_pid(path)
    state = state or _state(db)
    return {"running": pid is not None, "pid": pid, "gpu_provider": state.scheduler.get("gpu_provider"),
            "unfinished_runs": sum(1 for r in state.runs.values() if not r.finished),
            "version": state.scheduler.get("version"), "host": socket.gethostname(),
            "halted": sched.scheduler_note(path) if pid is not None else None}


def replay(db, since=None, until=None, job=None, kinds=None, run=None):
    path = db_path(db)
    if not os.path.exists(path):
        raise NotFoundError("no ledger at %s" % path)
    kw = {}
    for name, value in (("since", since), ("until", until)):
        if value is not None:
            kind, v = parse_when(value)
            kw["%s_%s" % (name, kind)] = v
    _check_window(kw, since, until)
    _check_kinds(kinds)
    if "since_seq" in kw:
        kw["since_seq"] -= 1     # `--since 5` includes event 5
    with _open(path, readonly=True) as store:
        if run or job:
            state = store.state()
            run = _pick_run(state, run).id if run else None
            if job and not any(job in r.jobs for r in state.runs.values() if run is None or r.id == run):
                raise NotFoundError("no job named %s in %s" % (job, "run %s" % run if run else "the ledger"))
        return [event_to_dict(e) for e in store.read(run=run, job=job, kinds=kinds or None, **kw)]


def _check_window(kw, since, until):
    """--since after --until matches nothing: say so instead of printing nothing."""
    for unit in ("ts", "seq"):
        lo, hi = kw.get("since_" + unit), kw.get("until_" + unit)
        if lo is not None and hi is not None and lo > hi:
            raise LedgerError("--since %s is after --until %s; nothing can match" % (since, until))


def _check_kinds(kinds):
    """A misspelt --kind would silently match nothing: refuse it, suggesting the closest kind."""
    import difflib
    from .events import KINDS
    for kind in kinds or ():
        if kind not in KINDS:
            close = difflib.get_close_matches(kind, list(KINDS), n=1)
            raise NotFoundError("unknown event kind %r%s; docs/events.md lists them all" % (
                kind, " (did you mean %r?)" % close[0] if close else ""))


def history(db, job, run=None):
    """Every attempt of one job: GPU, start, end, exit code, OOM, retry delay, log."""
    state = _state(db)
    r, j = _job_lookup(state, job, run)
    attempts = [{"attempt": a.number, "gpus": list(a.gpus), "gpu_uuids": list(a.gpu_uuids),
                 "session": a.session, "pid": a.pid, "requested_at": a.requested_at,
                 "started_at": a.started_at, "ended_at": a.ended_at, "exit_code": a.exit_code,
                 "signal": a.signal, "outcome": a.outcome, "oom": a.oom, "reason": a.reason,
                 "retry_delay": a.retry_delay, "stale_cleaned": a.stale_cleaned, "log": a.log}
                for a in j.attempts]
    return {"run": r.id, "job": j.id, "phase": j.phase, "status": j.status.value, "reason": j.reason,
            "attempts": attempts}


def summary(db, run=None):
    state = _state(db)
    picked = _pick_run(state, run) or _only_run(state)
    return {"run": picked.id, "markdown": render_summary(state, picked.id)}


def _only_run(state):
    if not state.runs:
        raise NotFoundError("this ledger has no runs yet")
    return max(state.runs.values(), key=lambda r: r.submitted_at)


def sql(db, query):
    path = db_path(db)
    if not os.path.exists(path):
        raise NotFoundError("no ledger at %s" % path)
    with _open(path, readonly=True) as store:
        columns, rows = store.sql(query)
    return {"columns": list(columns), "rows": [list(r) for r in rows]}


def logs(db, job, run=None, attempt=None, lines=100):
    state = _state(db)
    r, j = _job_lookup(state, job, run)
    if not j.attempts:
        raise NotFoundError("job %s of run %s has not been launched yet" % (j.id, r.id))
    picked = j.attempts[-1]
    if attempt is not None:
        picked = next((a for a in j.attempts if a.number == int(attempt)), None)
        if picked is None:
            raise NotFoundError("job %s has no attempt %s (attempts: %s)"
                                % (j.id, attempt, ", ".join(str(a.number) for a in j.attempts)))
    from .outcomes import read_tail
    text = read_tail(picked.log, 256 * 1024) if picked.log else ""
    tail = "\n".join(text.splitlines()[-lines:]) if lines else text
    return {"run": r.id, "job": j.id, "attempt": picked.number, "path": picked.log,
            "exists": bool(picked.log and os.path.exists(picked.log)), "text": tail,
            "active": j.status in ACTIVE and picked.number == j.attempt}


# ---- manual actions (each is an event, with who and when) ----------------

def _manual_append(db, build):
    """Build events from the current state and append them, retrying if the
    scheduler wrote to the same job meanwhile (optimistic concurrency)."""
    for _ in range(20):
        with _open(db) as store:
            state = store.state()
            events, expect, result = build(state)
            if not events:
                return result
            try:
                store.append(events, expect=expect)
                return result
            except ConflictError:
                time.sleep(0.05)
    raise LedgerError("the ledger kept changing under this command; try again")


def cancel(db, target, run=None):
    """Cancel one job (JOB, newest run having it, or --run) or a whole run (RUN)."""
    who = actor()

    def build(state):
        if target in state.runs or (run is None and _is_run_prefix(state, target)):
            r = _pick_run(state, target)
            jobs = [j for j in r.jobs.values() if j.status not in FINAL]
            if not jobs:
                raise LedgerError("run %s has no job left to cancel (%s)" % (
                    r.id, ", ".join("%s %d" % kv for kv in r.counts().items() if kv[1])))
            events = [Event(kind="cancelled", run=r.id, job=j.id, attempt=j.attempt,
                            data={"actor": who, "reason": "run cancelled by %s" % who}) for j in jobs]
            events.append(Event(kind="run_cancelled", run=r.id, data={"actor": who}))
            return events, {(r.id, j.id): j.version for j in jobs}, {"run": r.id, "cancelled": [j.id for j in jobs]}
        r, j = _job_lookup(state, target, run)
        if j.status in FINAL:
            raise LedgerError("job %s of run %s is already %s; nothing to cancel" % (j.id, r.id, j.status.value))
        ev = Event(kind="cancelled", run=r.id, job=j.id, attempt=j.attempt,
                   data={"actor": who, "reason": "cancelled by %s" % who})
        return [ev], {(r.id, j.id): j.version}, {"run": r.id, "cancelled": [j.id]}
    result = _manual_append(db, build)
    _kill_now(db, result["run"], result["cancelled"])
    return result


def _is_run_prefix(state, text):
    return sum(1 for r in state.runs if r.startswith(text)) == 1 and not any(text in r.jobs for r in state.runs.values())


def _kill_now(db, run_id, job_ids):
    """Kill cancelled jobs' sessions right away (the scheduler also does, idempotently)."""
    from . import launchers
    state = _state(db)
    run = state.runs[run_id]
    control = os.path.join(os.path.dirname(db_path(db)), "runs", run_id)
    for jid in job_ids:
        job = run.jobs[jid]
        if not job.attempts:
            continue
        a = job.attempts[-1]
        pid = a.pid or launchers.read_pid(launchers.control_paths(control, jid, a.number))
        if pid and launchers.process_alive(pid):
            launchers.kill_group(pid, grace=3.0)
        if a.session:
            try:
                launchers.get_launcher(run.plan_obj.launcher or "screen").kill(a.session)
            except LedgerError:
                pass


def retry(db, job, run=None):
    """A stuck, blocked or cancelled job back to pending, as a new attempt."""
    who = actor()

    def build(state):
        r, j = _job_lookup(state, job, run)
        if j.status not in (JobStatus.STUCK, JobStatus.CANCELLED, JobStatus.BLOCKED):
            raise LedgerError("job %s of run %s is %s; only stuck, blocked or cancelled jobs can be retried"
                              % (j.id, r.id, j.status.value))
        events = []
        reopen = r.finished or r.cancelled
        if reopen:
            events.append(Event(kind="run_reopened", run=r.id, data={"actor": who, "job": j.id}))
        nxt = j.attempt + 1 if j.attempts else j.attempt
        events.append(Event(kind="manual_retry", run=r.id, job=j.id, attempt=nxt,
                            data={"actor": who, "next_attempt": nxt}))
        return events, {(r.id, j.id): j.version}, {"run": r.id, "job": j.id, "attempt": nxt, "reopened": reopen}
    result = _manual_append(db, build)
    result["scheduler_pid"] = ensure_scheduler(db_path(db), _state(db).runs[result["run"]].plan.get("gpu_provider"))
    return result


def _run_event(db, kind, run):
    who = actor()

    def build(state):
        r = _pick_run(state, run) if run else None
        targets = [r] if r else [x for x in state.runs.values() if not x.finished]
        events = [Event(kind=kind, run=x.id, data={"actor": who}) for x in targets
                  if (kind == "paused") != x.paused]
        return events, None, {"runs": [x.id for x in targets], kind: True}
    return _manual_append(db, build)


def pause(db, run=None):
    return _run_event(db, "paused", run)


def resume(db, run=None):
    """Allow launching again, and make sure a scheduler runs while runs are unfinished:
    after `ledger stop`, a reboot or a crash, this is how the queue starts moving again."""
    out = _run_event(db, "resumed", run)
    path = db_path(db)
    state = _state(path)
    unfinished = sorted((r for r in state.runs.values() if not r.finished), key=lambda r: r.submitted_at)
    if unfinished and sched.scheduler_pid(path) is None:
        out["scheduler_pid"] = ensure_scheduler(path, unfinished[0].plan.get("gpu_provider"))
        out["scheduler_started"] = True
    return out


def stop(db, wait=15.0, reason=None):
    """Ask the scheduler to exit cleanly (SIGTERM); running jobs go on."""
    path = db_path(db)
    pid = sched.scheduler_pid(path)
    if pid is None or pid <= 0:
        return {"stopped": False, "reason": "no scheduler is running for %s" % path}
    data = {"actor": actor(), "pid": pid}
    if reason:
        data["reason"] = reason
    with _open(path) as store:     # a manual action: who asked, and when
        store.append([Event(kind="stop_requested", run="-", data=data)])
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + wait
    while time.time() < deadline and sched.scheduler_pid(path) is not None:
        time.sleep(0.05)
    return {"stopped": sched.scheduler_pid(path) is None, "pid": pid}


def backup(db, dest=None):
    """A consistent snapshot (SQLite's online backup) at ``dest``, or, without one, at a
    fresh private name beside the ledger (what `ledger pull` downloads, then removes)."""
    path = db_path(db)
    if not os.path.exists(path):
        raise NotFoundError("no ledger at %s (nothing submitted on this host yet)" % path)
    if dest is None:
        dest = os.path.join(os.path.dirname(path), "pull-%d-%s.db" % (os.getpid(), os.urandom(4).hex()))
    with _open(path, readonly=True) as store:
        store.backup(dest)
    return {"path": dest, "size": os.path.getsize(dest)}


# ---- host-level -----------------------------------------------------------

def _provider(db, spec):
    from .gpus import provider_from_spec
    return provider_from_spec(spec, os.path.dirname(db_path(db)))


def check(db, plan_dict):
    """Preflight report for a plan on this host (see preflight.py)."""
    from .preflight import check as run_check
    plan = Plan.from_dict(plan_dict)
    return run_check(plan, _provider(db, plan.gpu_provider))


def host_info(db):
    """Scheduler state, runs and a one-line GPU picture, for `ledger hosts`."""
    path = db_path(db)
    info = {"db": path, "hostname": socket.gethostname(), "runs": [], "scheduler": {"running": False}}
    if os.path.exists(path):
        state = _state(db)
        now = time.time()
        info["runs"] = [run_row(r, now) for r in sorted(state.runs.values(), key=lambda r: r.submitted_at)]
        info["scheduler"] = scheduler_info(db, state)
        spec = state.scheduler.get("gpu_provider")
    else:
        spec = None
    try:
        snap = _provider(db, spec).read()
        info["gpus"] = snap.error or " ".join(
            "%d:%s" % (i, "?" if g.used_mib is None else "%d/%dG" % (round(g.used_mib / 1024), round((g.total_mib or 0) / 1024)))
            for i, g in sorted(snap.gpus.items()))
    except LedgerError as exc:
        info["gpus"] = str(exc)
    return info
