"""Events: small immutable records of what happened, in the past tense.

An ``Event`` is a name (``kind``), a UTC time (``ts``, epoch seconds), the run and
job it concerns, the job's attempt, and a JSON payload (``data``). The store gives
it a gap-free ``seq`` and a per-job ``version``. ``KINDS`` documents every kind
and its payload keys; docs/events.md is checked against it by a test.
"""

import json
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional

#: kind -> (one-line meaning, payload keys). Job-level unless listed in states.RUN_EVENTS.
KINDS = {
    "run_submitted": ("a plan was recorded as a new run", "project, plan, plan_hash, host, cwd, actor, request_id"),
    "submitted": ("a job of the run was recorded", "phase, cmd, gpus_per_job"),
    "blocked": ("a precondition or dependency does not hold", "reason"),
    "unblocked": ("what blocked the job holds now", "reason"),
    "launch_requested": ("GPUs were reserved and the session is about to start", "gpus, gpu_uuids, session, log, control"),
    "launched": ("the session started and the job's own pid is known", "pid, session, gpus, gpu_uuids"),
    "launch_lost": ("on resume, an unconfirmed launch left no trace; it will be launched again", "reason"),
    "launch_failed": ("the session could not be started", "reason"),
    "adopted": ("a restarted scheduler took over a live session", "pid, session"),
    "timed_out": ("the attempt exceeded its timeout; its process group was killed", "timeout"),
    "stale_cleaned": ("a lingering or orphaned session was killed", "reason, output_found"),
    "exited": ("the attempt ended", "exit_code, signal, duration, log_tail"),
    "completed": ("the attempt succeeded", "outputs"),
    "oom_detected": ("the attempt ran out of GPU memory", "oom_kind, requested_mib, line, retry_at, delay"),
    "failed": ("the attempt failed for another reason", "reason, exit_code, log_tail, retry_at, delay"),
    "retried": ("the retry delay passed; the job waits for a GPU again", "next_attempt"),
    "stuck": ("the job needs a human", "reason"),
    "manual_retry": ("a human sent a stuck, blocked or cancelled job back to pending", "actor, next_attempt"),
    "cancelled": ("a human cancelled the job (its session is killed)", "actor, reason"),
    "run_finished": ("every job is completed, stuck, blocked or cancelled", "counts"),
    "run_cancelled": ("a human cancelled the whole run", "actor"),
    "run_reopened": ("a human retried a job of a finished or cancelled run; the run is active again", "actor, job"),
    "paused": ("a human stopped launching for the run", "actor"),
    "resumed": ("a human allowed launching again", "actor"),
    "scheduler_started": ("a scheduler took the ledger's lock", "pid, version, bundle, gpu_provider, host"),
    "scheduler_stopped": ("a scheduler exited cleanly", "pid, reason"),
    "stop_requested": ("a human asked the scheduler to exit (`ledger stop`, or a submit upgrading the host's bundle); running jobs go on", "actor, pid, reason"),
    "gpu_unreadable": ("a GPU's state could not be read; nothing launches on it", "gpu, reason"),
    "gpu_readable": ("a GPU's state can be read again", "gpu"),
    "launching_halted": ("the scheduler stopped launching", "reason"),
    "launching_resumed": ("the scheduler launches again", "reason"),
    "summary_written": ("summary.md was written by replay", "path"),
    "hook_ran": ("an on_complete/on_stuck hook ran", "hook, exit_code, job"),
    "sessions_wiped": ("dead sessions of ours (`Dead ???` in `screen -ls`) were wiped", "launcher, sessions"),
}

#: (kind, payload version) -> function(data) -> data of the next version. Run on read.
UPCASTERS = {}


@dataclass(frozen=True)
class Event:
    kind: str
    run: str
    job: Optional[str] = None
    attempt: int = 0
    data: Dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0
    seq: Optional[int] = None
    version: Optional[int] = None

    def stamped(self, ts):
        return replace(self, ts=ts)


def encode_data(data):
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


_scan_json = json.JSONDecoder().scan_once


def decode_data(kind, text):
    """Decode a payload and bring it up to date through the upcasters."""
    if not text:
        data = {}
    else:
        try:
            data, end = _scan_json(text, 0)     # json.loads without its layers (replay speed)
        except StopIteration:
            data, end = None, -1
        if end != len(text):
            data = json.loads(text)             # anything unusual: the full decoder (and its errors)
    if not UPCASTERS:
        return data
    version = data.get("_v", 1)
    while (kind, version) in UPCASTERS:
        data = UPCASTERS[(kind, version)](data)
        version += 1
    return data


def event_to_dict(event):
    """The JSON-lines shape used by ``ledger replay --json`` and the remote agent."""
    return {
        "seq": event.seq, "ts": event.ts, "run": event.run, "job": event.job,
        "version": event.version, "attempt": event.attempt, "kind": event.kind, "data": event.data,
    }


def event_from_dict(d):
    return Event(kind=d["kind"], run=d["run"], job=d.get("job"), attempt=d.get("attempt", 0),
                 data=d.get("data") or {}, ts=d.get("ts", 0.0), seq=d.get("seq"), version=d.get("version"))
