"""The projection: current state as a pure fold over events.

``project(events)`` builds a fresh ``State``; ``apply(state, event)`` folds one more
event into a state the caller owns (the scheduler keeps one up to date this way).
No I/O, no clock: replaying the same events always gives the same state, and a
prefix gives the state as of that event. Job transitions are checked against
``states.TRANSITIONS``; an impossible one raises ``TransitionError``.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .errors import TransitionError
from .plan import Plan
from .states import FINAL, RUN_EVENTS, TRANSITIONS, JobStatus, next_status


@dataclass
class Attempt:
    """One attempt of a job, as the audit (`ledger history`) shows it."""

    number: int
    gpus: Tuple[int, ...] = ()
    gpu_uuids: Tuple[str, ...] = ()
    session: Optional[str] = None
    log: Optional[str] = None
    pid: Optional[int] = None
    requested_at: Optional[float] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    outcome: Optional[str] = None      # success | oom | exit_code | signal | timeout | missing_output | ...
    reason: Optional[str] = None
    oom: bool = False
    retry_delay: Optional[float] = None
    stale_cleaned: bool = False


@dataclass
class JobState:
    id: str
    run: str
    phase: str
    status: JobStatus = JobStatus.PENDING
    attempt: int = 1
    version: int = 0
    gpus_per_job: int = 1
    gpus: Tuple[int, ...] = ()
    pid: Optional[int] = None
    session: Optional[str] = None
    reason: Optional[str] = None       # last error / why blocked / why stuck
    retry_at: Optional[float] = None
    oom_count: int = 0
    failures: int = 0                  # non-OOM failed attempts
    submitted_at: Optional[float] = None
    updated_at: Optional[float] = None
    outputs: Tuple[str, ...] = ()
    attempts: List[Attempt] = field(default_factory=list)

    @property
    def current(self):
        """The record of the current attempt, created on first need."""
        if not self.attempts or self.attempts[-1].number != self.attempt:
            self.attempts.append(Attempt(number=self.attempt))
        return self.attempts[-1]


@dataclass
class RunState:
    id: str
    project: str
    plan: Dict[str, Any]
    plan_hash: str
    submitted_at: float
    host: Optional[str] = None
    request_id: Optional[str] = None
    finished_at: Optional[float] = None
    cancelled: bool = False
    paused: bool = False
    jobs: Dict[str, JobState] = field(default_factory=dict)
    _plan_obj: Optional[Plan] = field(default=None, compare=False, repr=False)  # a cache of plan

    @property
    def plan_obj(self):
        if self._plan_obj is None:
            self._plan_obj = Plan.from_dict(self.plan)
        return self._plan_obj

    @property
    def finished(self):
        return self.finished_at is not None

    def counts(self):
        out = {s.value: 0 for s in JobStatus}
        for job in self.jobs.values():
            out[job.status.value] += 1
        return out

    def all_final(self):
        return all(j.status in FINAL or j.status == JobStatus.BLOCKED for j in self.jobs.values())


@dataclass
class State:
    runs: Dict[str, RunState] = field(default_factory=dict)
    last_seq: int = 0
    last_ts: float = 0.0
    scheduler: Dict[str, Any] = field(default_factory=dict)   # last scheduler_started payload
    launching_halted: Optional[str] = None
    unreadable_gpus: Dict[int, str] = field(default_factory=dict)

    def job(self, run, job):
        return self.runs[run].jobs[job]


def project(events, until_seq=None, until_ts=None):
    """Fold events into a new State, stopping after ``until_seq`` / ``until_ts``."""
    state = State()
    for event in events:
        if until_seq is not None and event.seq is not None and event.seq > until_seq:
            break
        if until_ts is not None and event.ts > until_ts:
            break
        apply(state, event)
    return state


def apply(state, event):
    """Fold one event into ``state`` (which the caller owns) and return it."""
    if event.job is None or event.kind in RUN_EVENTS:
        _RUN_HANDLERS.get(event.kind, _ignore)(state, event)
    else:
        _apply_job(state, event)
    if event.seq is not None:
        state.last_seq = event.seq
    state.last_ts = event.ts
    return state


def check(state, event):
    """Raise TransitionError if ``event`` cannot follow ``state`` (nothing is changed)."""
    if event.job is None or event.kind in RUN_EVENTS:
        if event.kind != "run_submitted" and event.run is not None and event.run not in state.runs:
            if event.kind not in ("scheduler_started", "scheduler_stopped", "gpu_unreadable",
                                  "gpu_readable", "launching_halted", "launching_resumed", "sessions_wiped",
                                  "stop_requested"):
                raise TransitionError("event %s names unknown run %s" % (event.kind, event.run))
        return
    run = state.runs.get(event.run)
    if run is None:
        raise TransitionError("event %s names unknown run %s" % (event.kind, event.run))
    job = run.jobs.get(event.job)
    before = job.status if job else None
    if next_status(before, event.kind) is None:
        raise TransitionError("job %s/%s: %s is not allowed from %s"
                              % (event.run, event.job, event.kind, before or "nothing"))


def _apply_job(state, event, _transitions=TRANSITIONS):
    run = state.runs.get(event.run)
    if run is None:
        raise TransitionError("event %s names unknown run %s" % (event.kind, event.run))
    kind = event.kind
    job = run.jobs.get(event.job)
    before = job.status if job is not None else None
    after = _transitions.get((before, kind))    # states.next_status, inlined: replay speed
    if after is None:
        raise TransitionError("job %s/%s: %s is not allowed from %s (seq %s)"
                              % (event.run, event.job, kind, before or "nothing", event.seq))
    if job is None:
        job = run.jobs[event.job] = JobState(id=event.job, run=event.run, phase=event.data.get("phase", "main"),
                                             gpus_per_job=int(event.data.get("gpus_per_job", 1)),
                                             submitted_at=event.ts)
    handler = _JOB_HANDLERS.get(kind)
    if handler is not None:
        handler(job, event)
    job.status = after
    job.version = event.version if event.version is not None else job.version + 1
    job.updated_at = event.ts


def _ignore(*_):
    pass


# ---- job handlers: each records the event's facts on the job and its attempt ----

def _blocked(job, e):
    job.reason = e.data.get("reason")


def _unblocked(job, e):
    job.reason = None


def _launch_requested(job, e):
    a = job.current
    a.gpus = job.gpus = tuple(e.data.get("gpus", ()))
    a.gpu_uuids = tuple(e.data.get("gpu_uuids", ()))
    a.session = job.session = e.data.get("session")
    a.log = e.data.get("log")
    a.requested_at = e.ts
    job.retry_at = None


def _launched(job, e):
    a = job.current
    a.pid = job.pid = e.data.get("pid")
    a.started_at = e.ts
    if e.data.get("gpus") is not None:
        a.gpus = job.gpus = tuple(e.data["gpus"])


def _adopted(job, e):
    if e.data.get("pid"):
        job.pid = job.current.pid = e.data["pid"]


def _launch_lost(job, e):
    job.gpus, job.pid, job.session = (), None, None
    job.reason = e.data.get("reason")


def _launch_failed(job, e):
    a = job.current
    a.ended_at = e.ts
    a.outcome = "launch_failed"
    a.reason = job.reason = e.data.get("reason")
    job.retry_at = e.data.get("retry_at")
    job.gpus, job.pid = (), None
    job.failures += 1


def _stale_cleaned(job, e):
    job.current.stale_cleaned = True


def _timed_out(job, e):
    job.current.outcome = "timeout"


def _exited(job, e):
    a = job.current
    a.exit_code = e.data.get("exit_code")
    a.signal = e.data.get("signal")
    a.ended_at = e.data.get("ended_at", e.ts)


def _completed(job, e):
    a = job.current
    a.outcome = "success"
    job.outputs = tuple(e.data.get("outputs") or ())
    job.reason = None
    job.gpus, job.pid = (), None


def _oom_detected(job, e):
    a = job.current
    a.oom, a.outcome = True, "oom"
    a.reason = job.reason = e.data.get("line") or "CUDA out of memory"
    a.retry_delay = e.data.get("delay")
    job.retry_at = e.data.get("retry_at")
    job.oom_count += 1
    job.gpus, job.pid = (), None


def _failed(job, e):
    a = job.current
    if a.outcome != "timeout":
        a.outcome = e.data.get("outcome", "failed")
    a.reason = job.reason = e.data.get("reason")
    a.retry_delay = e.data.get("delay")
    job.retry_at = e.data.get("retry_at")
    job.failures += 1
    job.gpus, job.pid = (), None


def _retried(job, e):
    job.attempt = int(e.data.get("next_attempt", job.attempt + 1))
    job.retry_at = None


def _stuck(job, e):
    job.reason = e.data.get("reason")
    job.retry_at = None
    job.gpus, job.pid = (), None


def _manual_retry(job, e):
    job.attempt = int(e.data.get("next_attempt", job.attempt + 1))
    job.reason = None
    job.oom_count = 0
    job.failures = 0


def _cancelled(job, e):
    job.reason = e.data.get("reason") or "cancelled by %s" % e.data.get("actor", "a human")
    if job.attempts and job.attempts[-1].ended_at is None and job.attempts[-1].requested_at is not None:
        job.attempts[-1].ended_at = e.ts
        job.attempts[-1].outcome = job.attempts[-1].outcome or "cancelled"
    job.gpus, job.pid = (), None


_JOB_HANDLERS = {
    "blocked": _blocked, "unblocked": _unblocked, "launch_requested": _launch_requested,
    "launched": _launched, "adopted": _adopted, "launch_lost": _launch_lost,
    "launch_failed": _launch_failed, "stale_cleaned": _stale_cleaned, "timed_out": _timed_out,
    "exited": _exited, "completed": _completed, "oom_detected": _oom_detected, "failed": _failed,
    "retried": _retried, "stuck": _stuck, "manual_retry": _manual_retry, "cancelled": _cancelled,
}


# ---- run-level handlers ----

def _run_submitted(state, e):
    d = e.data
    state.runs[e.run] = RunState(id=e.run, project=d.get("project", ""), plan=d.get("plan", {}),
                                 plan_hash=d.get("plan_hash", ""), submitted_at=e.ts, host=d.get("host"),
                                 request_id=d.get("request_id"))


def _run_finished(state, e):
    if e.run in state.runs:
        state.runs[e.run].finished_at = e.ts


def _run_reopened(state, e):
    """A retried job makes its run active again, even a cancelled one (else it would wait
    for a launch that a cancelled run never gets)."""
    if e.run in state.runs:
        state.runs[e.run].finished_at = None
        state.runs[e.run].cancelled = False


def _run_cancelled(state, e):
    if e.run in state.runs:
        state.runs[e.run].cancelled = True


def _paused(state, e):
    if e.run in state.runs:
        state.runs[e.run].paused = True


def _resumed(state, e):
    if e.run in state.runs:
        state.runs[e.run].paused = False


def _scheduler_started(state, e):
    state.scheduler = dict(e.data, started_at=e.ts, running=True)


def _scheduler_stopped(state, e):
    state.scheduler = dict(state.scheduler, running=False, stopped_at=e.ts)


def _gpu_unreadable(state, e):
    state.unreadable_gpus[e.data.get("gpu")] = e.data.get("reason")


def _gpu_readable(state, e):
    state.unreadable_gpus.pop(e.data.get("gpu"), None)


def _launching_halted(state, e):
    state.launching_halted = e.data.get("reason")


def _launching_resumed(state, e):
    state.launching_halted = None


_RUN_HANDLERS = {
    "run_submitted": _run_submitted, "run_finished": _run_finished, "run_cancelled": _run_cancelled,
    "run_reopened": _run_reopened,
    "paused": _paused, "resumed": _resumed, "scheduler_started": _scheduler_started,
    "scheduler_stopped": _scheduler_stopped, "gpu_unreadable": _gpu_unreadable,
    "gpu_readable": _gpu_readable, "launching_halted": _launching_halted,
    "launching_resumed": _launching_resumed,
}


# ---- snapshots: a State as plain builtins and back (pure) ----
#
# ``encode_state`` turns a State into nested tuples of str/int/float/None/bool/dict/tuple
# (what ``marshal`` stores natively) and ``decode_state`` rebuilds an equal State. The store
# keeps such a snapshot beside the ledger and folds only the events after it, which gives
# the same State as a full replay because the fold is deterministic: project(e1..en) ==
# fold(decode_state(encode_state(project(e1..ek))), ek+1..en) whenever decode∘encode is the
# identity on every State (tests/test_snapshot.py checks both at every cut of whole ledgers).
# The field lists are part of SNAPSHOT_LAYOUT, so a snapshot written by a different version
# of these classes is never read.

_ATTEMPT_FIELDS = tuple(f for f in Attempt.__dataclass_fields__)
_JOB_FIELDS = tuple(f for f in JobState.__dataclass_fields__ if f != "attempts")
_RUN_FIELDS = tuple(f for f in RunState.__dataclass_fields__ if f not in ("jobs", "_plan_obj"))
_STATE_FIELDS = tuple(f for f in State.__dataclass_fields__ if f != "runs")
_STATUS_AT = _JOB_FIELDS.index("status")
_STATUS_BY_VALUE = {s.value: s for s in JobStatus}
#: Changes whenever a class above gains, loses or reorders a field.
SNAPSHOT_LAYOUT = "1|%s|%s|%s|%s" % tuple(",".join(f) for f in (_ATTEMPT_FIELDS, _JOB_FIELDS, _RUN_FIELDS,
                                                                   _STATE_FIELDS))


def encode_state(state):
    """The State as nested tuples of builtins (job status as its string value)."""
    runs = []
    for run in state.runs.values():
        rd = run.__dict__
        jobs = []
        for job in run.jobs.values():
            jd = job.__dict__
            row = [jd[k] for k in _JOB_FIELDS]
            row[_STATUS_AT] = jd["status"].value
            row.append(tuple(tuple(a.__dict__[k] for k in _ATTEMPT_FIELDS) for a in job.attempts))
            jobs.append(tuple(row))
        runs.append(tuple(rd[k] for k in _RUN_FIELDS) + (tuple(jobs),))
    return tuple(state.__dict__[k] for k in _STATE_FIELDS) + (tuple(runs),)


def decode_state(data):
    """The State ``encode_state`` was given (objects built without running __init__)."""
    new = object.__new__
    state = new(State)
    sd = state.__dict__
    sd.update(zip(_STATE_FIELDS, data))
    runs = sd["runs"] = {}
    for rt in data[-1]:
        run = new(RunState)
        rd = run.__dict__
        rd.update(zip(_RUN_FIELDS, rt))
        rd["_plan_obj"] = None
        jobs = rd["jobs"] = {}
        for jt in rt[-1]:
            job = new(JobState)
            jd = job.__dict__
            jd.update(zip(_JOB_FIELDS, jt))
            jd["status"] = _STATUS_BY_VALUE[jt[_STATUS_AT]]
            attempts = jd["attempts"] = []
            for at in jt[-1]:
                a = new(Attempt)
                a.__dict__.update(zip(_ATTEMPT_FIELDS, at))
                attempts.append(a)
            jobs[job.id] = job
        runs[run.id] = run
    return state
