"""The scheduler's brain: ``decide(state, observation, config) -> events``.

Pure: no clock, no files, no processes. The loop in ``scheduler.py`` gathers an
``Observation`` of the world (exit files, pids, sessions, GPU memory, outputs,
preconditions), calls ``decide``, appends what it returns, then carries out the
side effects that follow from the appended events. Everything here can be unit
tested with hand-made states and observations.
"""

import posixpath
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from . import outcomes
from .events import Event
from .names import session_name
from .states import ACTIVE, FINAL, JobStatus

P, B, L, R, W, C, S, X = (
    JobStatus.PENDING, JobStatus.BLOCKED, JobStatus.LAUNCHING, JobStatus.RUNNING,
    JobStatus.RETRY_WAIT, JobStatus.COMPLETED, JobStatus.STUCK, JobStatus.CANCELLED,
)

#: A launch recorded as intended but showing no trace after this long is declared lost.
LAUNCH_GRACE = 5.0
#: A job whose process is gone but whose wrapper has not written an exit file yet.
VANISH_GRACE = 3.0
#: Launch failures (the session would not start) tolerated before a job is stuck.
MAX_LAUNCH_FAILURES = 3
LAUNCH_RETRY_DELAY = 10.0


@dataclass(frozen=True)
class AttemptObs:
    """What the loop saw of one launching/running attempt."""

    pid: Optional[int] = None            # the job's own pid, from the wrapper's pid file
    pid_alive: bool = False
    exit: Optional[dict] = None          # the wrapper's exit record, once the job ended
    session_alive: Optional[bool] = None  # None: not looked at this tick
    outputs: Tuple[str, ...] = ()        # files the output check matches now
    output_since: Optional[float] = None  # when the loop first saw them
    log_tail: str = ""                   # read only once the attempt ended
    gone_since: Optional[float] = None   # when the loop first saw the job's pid gone without an exit record


@dataclass(frozen=True)
class GpuObs:
    index: int
    uuid: str = ""
    used_mib: Optional[int] = None
    total_mib: Optional[int] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class Observation:
    now: float
    gpus: Optional[Dict[int, GpuObs]] = None   # None: not sampled this tick
    gpu_error: Optional[str] = None            # the whole read failed (nvidia-smi hung, ...)
    gpus_taken_at: float = 0.0
    attempts: Dict[Tuple[str, str], AttemptObs] = field(default_factory=dict)
    preconditions: Dict[Tuple[str, str], Optional[str]] = field(default_factory=dict)  # None: holds
    adopting: bool = False                     # first tick after a (re)start
    launching_allowed: bool = True


@dataclass(frozen=True)
class Config:
    control_root: str          # <ledger dir>/runs: control files per run
    home: str                  # to expand ~ in cwd
    stale_grace: Optional[float] = None   # overrides the plan's (tests)


def expand_home(path, home):
    if path == "~" or path.startswith("~/"):
        return home + path[1:]
    return path


def attempt_paths(run, job, attempt, cwd, config):
    """Where an attempt's log and control files live (pure)."""
    root = expand_home(cwd, config.home)
    return {
        "session": session_name(run, job, attempt),
        "log": posixpath.join(root, "experiment_queue", run, "logs", "%s.%d.log" % (job, attempt)),
        "control": posixpath.join(config.control_root, run),
    }


def decide(state, obs, config):
    """Every event the world, as observed, calls for now."""
    out = []
    out += _gpu_health(state, obs)
    for run in state.runs.values():
        if run.finished:
            continue
        plan = run.plan_obj
        for job in run.jobs.values():
            key = (run.id, job.id)
            if job.status in ACTIVE:
                out += _watch_active(run, plan, job, obs.attempts.get(key), obs, config)
            elif job.status == W and job.retry_at is not None and job.retry_at <= obs.now:
                out.append(_ev("retried", run, job, next_attempt=job.attempt + 1))
        out += _gate_phases(run, plan, obs)
    out += _launches(state, obs, config, already=out)
    out += _finish_runs(state, out)
    return out


def _ev(kind, run, job, attempt=None, **data):
    return Event(kind=kind, run=run.id, job=job.id if job else None,
                 attempt=job.attempt if (job and attempt is None) else (attempt or 0), data=data)


# ---- GPUs ---------------------------------------------------------------

def _gpu_health(state, obs):
    """Record GPUs turning unreadable or readable again, once per change."""
    if obs.gpus is None and obs.gpu_error is None:
        return []
    out = []
    now_bad = {}
    if obs.gpu_error is not None:
        now_bad["all"] = obs.gpu_error
    else:
        for g in obs.gpus.values():
            if g.error is not None or g.used_mib is None:
                now_bad[g.index] = g.error or "memory.used unreadable"
    for gpu, reason in sorted(now_bad.items(), key=lambda kv: str(kv[0])):
        if _failure_kind(state.unreadable_gpus.get(gpu)) != _failure_kind(reason):
            out.append(Event(kind="gpu_unreadable", run="-", data={"gpu": gpu, "reason": reason}))
    for gpu in sorted(state.unreadable_gpus, key=str):
        if gpu not in now_bad:
            out.append(Event(kind="gpu_readable", run="-", data={"gpu": gpu}))
    return out


def _failure_kind(reason):
    """What went wrong, without the details that change from one read to the next (the garbage
    line nvidia-smi printed this time): "nvidia-smi: unreadable output: <junk>" and the same
    with other junk are one failure, recorded once."""
    if reason is None:
        return None
    return ": ".join(reason.split(": ")[:2])


def free_gpus(state, obs, plan, run_id, claims=None):
    """GPUs a job of ``run_id`` may take now, in index order.

    Free means: readable, memory.used below the threshold in a sample taken after
    the last of our jobs left it, and not held (or about to be held) by any job of
    ours in any run. Never a guess: an unreadable GPU is never free. ``claims``:
    ``gpu_claims(state, obs.gpus_taken_at)`` when the caller has it already.
    """
    if obs.gpus is None or obs.gpu_error is not None:
        return []
    held, left_at = claims if claims is not None else gpu_claims(state, obs.gpus_taken_at)
    allowed = set(plan.gpus) if plan.gpus is not None else None
    free = []
    for idx in sorted(obs.gpus):
        g = obs.gpus[idx]
        if allowed is not None and idx not in allowed:
            continue
        if g.error is not None or g.used_mib is None or idx in held:
            continue
        if g.used_mib >= plan.gpu_free_threshold_mib:
            continue
        if left_at.get(idx, 0.0) >= obs.gpus_taken_at:
            continue  # our job left it after this sample: its memory may not be released yet
        free.append(idx)
    return free


def gpu_claims(state, since=None):
    """GPUs held by active jobs (any run), and when each GPU was last left.

    A run that finished before ``since`` (the GPU sample's time) is skipped: it holds
    nothing and every attempt of it ended before it finished, so none of its exits can
    be newer than the sample. That keeps a tick's cost independent of the ledger's past.
    """
    held, left_at = set(), {}
    for run in state.runs.values():
        if since is not None and run.finished_at is not None and run.finished_at < since:
            continue
        for job in run.jobs.values():
            if job.status in ACTIVE:
                held.update(job.gpus)
            for a in job.attempts:
                if a.ended_at is not None:
                    for g in a.gpus:
                        left_at[g] = max(left_at.get(g, 0.0), a.ended_at)
    return held, left_at


# ---- active attempts ----------------------------------------------------

def _watch_active(run, plan, job, seen, obs, config):
    spec = plan.job(job.id)
    a = job.current
    seen = seen or AttemptObs()
    out = []
    if job.status == L:
        if seen.pid is not None or seen.exit is not None:
            out.append(_ev("launched", run, job, pid=seen.pid, session=a.session,
                           gpus=list(a.gpus), gpu_uuids=list(a.gpu_uuids)))
        elif seen.session_alive is False and obs.now - (a.requested_at or obs.now) > LAUNCH_GRACE:
            return [_ev("launch_lost", run, job, reason="no session, pid or exit record %.0f s after "
                        "the launch was requested; launching again" % (obs.now - a.requested_at))]
        else:
            return []
    elif obs.adopting and seen.pid_alive and seen.exit is None:
        out.append(_ev("adopted", run, job, pid=seen.pid, session=a.session))
    if seen.exit is not None:
        return out + _judge(run, plan, spec, job, seen, obs, config)
    started = a.started_at or a.requested_at or obs.now
    if spec.timeout and not _timed_out(job) and obs.now - started > spec.timeout:
        return out + [_ev("timed_out", run, job, timeout=spec.timeout, pid=seen.pid, session=a.session)]
    grace = config.stale_grace if config.stale_grace is not None else plan.stale_grace
    if (seen.pid_alive and seen.outputs and seen.output_since is not None
            and obs.now - seen.output_since > grace and not a.stale_cleaned):
        return out + [_ev("stale_cleaned", run, job, pid=seen.pid, session=a.session, output_found=True,
                          reason="output written %.0f s ago but the job still runs (grace %.0f s)"
                          % (obs.now - seen.output_since, grace))]
    if not seen.pid_alive and (job.status == R or out) and seen.session_alive is not None:
        ended_for = obs.now - (seen.gone_since if seen.gone_since is not None else obs.now)
        if seen.session_alive and not a.stale_cleaned and ended_for > VANISH_GRACE:
            return out + [_ev("stale_cleaned", run, job, pid=seen.pid, session=a.session,
                              output_found=bool(seen.outputs),
                              reason="session alive but the job's process is gone")]
        if not seen.session_alive and ended_for > VANISH_GRACE:
            vanished = {"exit_code": None, "signal": None, "ended_at": obs.now,
                        "reason": "the session ended without an exit record"}
            return out + _judge(run, plan, spec, job, AttemptObs(pid=seen.pid, exit=vanished,
                                                                  outputs=seen.outputs, log_tail=seen.log_tail),
                                obs, config)
    return out


def _timed_out(job):
    return job.current.outcome == "timeout"


def _judge(run, plan, spec, job, seen, obs, config):
    """The attempt ended: record how, then the verdict (and what comes next)."""
    ex = seen.exit
    a = job.current
    # The wrapper's own start time (from the exit record) is when the job really began;
    # the launched event lands a tick later.
    started = ex.get("started_at") or a.started_at or a.requested_at or obs.now
    ended = ex.get("ended_at") or obs.now
    tail = outcomes.last_lines(seen.log_tail, 20, 4000)
    out = [_ev("exited", run, job, exit_code=ex.get("exit_code"), signal=ex.get("signal"),
               ended_at=ended, duration=round(max(0.0, ended - started), 3), log_tail=tail,
               reason=ex.get("reason"))]
    output_ok = None
    if spec.output_check:
        output_ok = bool(seen.outputs)
    if a.stale_cleaned and output_ok:
        return out + [_ev("completed", run, job, outputs=list(seen.outputs), note="cleaned after writing its output")]
    if ex.get("reason") and ex.get("exit_code") is None:
        # No exit code: the job never started (launch_failed), or it ran and its session
        # ended without one (killed with its screen, a reboot): that is a failure of the
        # attempt like any other, and the retry policy applies.
        ran = a.pid is not None or seen.pid is not None or a.started_at is not None
        verdict = outcomes.Verdict("lost" if ran else "launch_failed", ex["reason"], None, False)
        if output_ok:
            return out + [_ev("completed", run, job, outputs=list(seen.outputs),
                              note="exit unknown; output present")]
    elif _timed_out(job):
        verdict = outcomes.Verdict("timeout", "timeout: killed after %s s" % _fmt_num(spec.timeout), None, False)
    else:
        total = _gpu_total(obs, a.gpus)
        verdict = outcomes.judge(ex.get("exit_code"), ex.get("signal"), seen.log_tail, output_ok,
                                 total, output_pattern=spec.output_check)
    if verdict.outcome == "success":
        return out + [_ev("completed", run, job, outputs=list(seen.outputs))]
    if verdict.outcome == "oom":
        return out + _after_oom(run, spec, job, verdict, obs)
    return out + _after_failure(run, spec, job, verdict, ex, tail, obs)


def _after_oom(run, spec, job, verdict, obs):
    oom = verdict.oom
    data = {"oom_kind": oom.kind if oom else None, "line": oom.line if oom else verdict.reason,
            "requested_mib": oom.requested_mib if oom else None}
    policy = spec.oom_retry
    if verdict.impossible:
        return [_ev("oom_detected", run, job, retry_at=None, delay=None, **data),
                _ev("stuck", run, job, reason=verdict.reason)]
    if job.oom_count + 1 < policy.max_attempts:
        return [_ev("oom_detected", run, job, retry_at=obs.now + policy.delay, delay=policy.delay, **data)]
    return [_ev("oom_detected", run, job, retry_at=None, delay=None, **data),
            _ev("stuck", run, job, reason="CUDA OOM on %d of %d attempts (oom_retry.max_attempts)"
                % (job.oom_count + 1, policy.max_attempts))]


def _after_failure(run, spec, job, verdict, ex, tail, obs):
    policy = spec.retry
    code = ex.get("exit_code")
    retryable = (verdict.outcome not in ("launch_failed",)
                 and job.failures + 1 < policy.max_attempts
                 and (policy.exit_codes is None or code in policy.exit_codes))
    base = {"reason": verdict.reason, "outcome": verdict.outcome, "exit_code": code, "log_tail": tail}
    if retryable:
        return [_ev("failed", run, job, retry_at=obs.now + policy.delay, delay=policy.delay, **base)]
    return [_ev("failed", run, job, retry_at=None, delay=None, **base),
            _ev("stuck", run, job, reason=verdict.reason)]


def _gpu_total(obs, gpus):
    if not obs.gpus:
        return None
    totals = [obs.gpus[g].total_mib for g in gpus if g in obs.gpus and obs.gpus[g].total_mib]
    return min(totals) if totals else None


def _fmt_num(x):
    return ("%g" % x) if x is not None else "?"


# ---- phases, preconditions ----------------------------------------------

def phase_gate(run, plan):
    """phase name -> None if its jobs may start, "wait" while a dependency runs,
    or the reason it never will (a dependency ended with a stuck/blocked/cancelled job)."""
    by_phase = {}
    for job in run.jobs.values():
        by_phase.setdefault(job.phase, []).append(job)
    gate = {}
    for phase in plan.phases:       # topological order
        reason = None
        for dep in phase.depends_on:
            dep_jobs = by_phase.get(dep, [])
            bad = [j for j in dep_jobs if j.status in (S, X, B)]
            if gate.get(dep) not in (None, "wait"):
                reason = "phase %s cannot start: %s" % (dep, gate[dep])
                break
            if bad:
                reason = "dependency %s has %s job %s" % (dep, bad[0].status.value, bad[0].id)
                break
            if any(j.status != C for j in dep_jobs):
                reason = "wait"
        gate[phase.name] = reason
    return gate


def _gate_phases(run, plan, obs):
    """Block jobs whose dependency failed or whose precondition does not hold; unblock
    them when it does."""
    if run.cancelled:
        return []
    gate = phase_gate(run, plan)
    out = []
    for job in run.jobs.values():
        g = gate.get(job.phase)
        if g == "wait":
            continue
        reason = g or obs.preconditions.get((run.id, job.id)) or _never_fits(job, plan, obs)
        if job.status == P and reason:
            out.append(_ev("blocked", run, job, reason=reason))
        elif job.status == B and reason is None and (run.id, job.id) in obs.preconditions:
            out.append(_ev("unblocked", run, job, reason="precondition holds now"))
        elif job.status == B and reason and reason != job.reason:
            out.append(_ev("blocked", run, job, reason=reason))
    return out


NEVER_FITS = "needs %d GPUs; this host offers %d (%s)"


def _never_fits(job, plan, obs):
    """Why a job can never launch here (it asks for more GPUs than the host has, among
    those the manifest allows), else None. Without a GPU reading a job blocked for this
    stays blocked: a failing nvidia-smi must not make it flap."""
    if obs.gpus is None or obs.gpu_error is not None or not obs.gpus:
        sticky = job.status == B and job.reason and job.reason.startswith("needs ")
        return job.reason if sticky else None
    usable = [i for i in sorted(obs.gpus) if plan.gpus is None or i in plan.gpus]
    if job.gpus_per_job > len(usable):
        return NEVER_FITS % (job.gpus_per_job, len(usable), ",".join(map(str, usable)) or "none")
    return None


def launch_candidates(run, plan):
    """Pending jobs whose phase may start, in manifest order."""
    if run.paused or run.cancelled or run.finished:
        return []
    gate = phase_gate(run, plan)
    return [j for j in run.jobs.values() if j.status == P and gate.get(j.phase) is None]


# ---- launches -----------------------------------------------------------

def _launches(state, obs, config, already):
    """Hand free GPUs to waiting jobs, oldest run first, in manifest order.

    Within a run the order is strict: a job that needs more GPUs than are free now
    waits, and the jobs behind it wait too (no starvation of multi-GPU jobs).
    """
    if not obs.launching_allowed or state.launching_halted or obs.gpus is None:
        return []
    touched = {(e.run, e.job) for e in already}
    taken = set()
    out = []
    claims = None
    for run in sorted((r for r in state.runs.values() if not r.finished), key=lambda r: (r.submitted_at, r.id)):
        plan = run.plan_obj
        candidates = launch_candidates(run, plan)
        if not candidates:
            continue
        if claims is None:
            claims = gpu_claims(state, obs.gpus_taken_at)
        active = sum(1 for j in run.jobs.values() if j.status in ACTIVE)
        limit = plan.max_parallel or 10 ** 6
        free = [g for g in free_gpus(state, obs, plan, run.id, claims) if g not in taken]
        for job in candidates:
            if (run.id, job.id) in touched or obs.preconditions.get((run.id, job.id)):
                continue
            if active >= limit or len(free) < job.gpus_per_job:
                break
            gpus, free = free[:job.gpus_per_job], free[job.gpus_per_job:]
            taken.update(gpus)
            active += 1
            paths = attempt_paths(run.id, job.id, job.attempt, plan.cwd, config)
            out.append(_ev("launch_requested", run, job, gpus=gpus,
                           gpu_uuids=[obs.gpus[g].uuid for g in gpus], **paths))
    return out


# ---- run end ------------------------------------------------------------

def _finish_runs(state, pending_events):
    """A run whose every job is final (or blocked) is finished, once."""
    if pending_events:
        return []   # let this tick's events land first; the next tick sees the new statuses
    out = []
    for run in state.runs.values():
        if run.finished or not run.jobs:
            continue
        if all(j.status in FINAL or j.status == B for j in run.jobs.values()):
            out.append(Event(kind="run_finished", run=run.id, data={"counts": run.counts()}))
    return out


def is_idle(state):
    """True when no run has work left: the scheduler may exit."""
    return all(r.finished for r in state.runs.values())


def job_env_for_hook(job, reason):
    return {"LEDGER_RUN": job.run, "LEDGER_JOB": job.id, "LEDGER_REASON": reason or "",
            "LEDGER_ATTEMPT": str(job.attempt)}


__all__ = ["AttemptObs", "GpuObs", "Observation", "Config", "decide", "free_gpus", "phase_gate",
           "launch_candidates", "attempt_paths", "expand_home", "is_idle"]
