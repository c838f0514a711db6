"""Job states and the one table of allowed transitions.

States are few; events say what happened. ``TRANSITIONS[(status, kind)]`` is the
status after a job-level event of that kind; a pair missing from the table is an
impossible transition, which the projection refuses (``TransitionError``).
The outcome of an attempt (success, oom, exit code, signal, timeout, missing output)
is data on the events, never a status.
"""

from enum import Enum


class JobStatus(str, Enum):
    PENDING = "pending"        # waiting for its phase, a GPU, or its retry turn
    BLOCKED = "blocked"        # a precondition or a dependency does not hold
    LAUNCHING = "launching"    # launch intended, not yet confirmed
    RUNNING = "running"        # its session is alive (or was, until we judge it)
    RETRY_WAIT = "retry_wait"  # an attempt failed; waiting for the retry delay
    COMPLETED = "completed"    # succeeded (exit 0 and output present)
    STUCK = "stuck"            # needs a human
    CANCELLED = "cancelled"    # a human stopped it

    def __str__(self):
        return self.value


P, B, L, R, W, C, S, X = (
    JobStatus.PENDING, JobStatus.BLOCKED, JobStatus.LAUNCHING, JobStatus.RUNNING,
    JobStatus.RETRY_WAIT, JobStatus.COMPLETED, JobStatus.STUCK, JobStatus.CANCELLED,
)

#: (status before, event kind) -> status after. ``None`` before means "no such job yet".
TRANSITIONS = {
    (None, "submitted"): P,
    (P, "blocked"): B,
    (B, "blocked"): B,            # the reason changed
    (B, "unblocked"): P,
    (P, "launch_requested"): L,
    (L, "launched"): R,
    (L, "launch_lost"): P,        # resume found no trace of an unconfirmed launch
    (L, "launch_failed"): W,      # the session could not be started
    (R, "adopted"): R,            # a restarted scheduler took over a live session
    (R, "timed_out"): R,          # killed for exceeding its timeout; `exited` follows
    (R, "stale_cleaned"): R,      # its lingering session was killed; `exited` follows
    (R, "exited"): R,             # exit code recorded; the verdict follows in the same append
    (R, "completed"): C,
    (R, "oom_detected"): W,
    (R, "failed"): W,
    (W, "retried"): P,
    (W, "stuck"): S,
    (P, "stuck"): S,
    (B, "stuck"): S,
    (S, "manual_retry"): P,
    (X, "manual_retry"): P,
    (B, "manual_retry"): P,
    (P, "cancelled"): X,
    (B, "cancelled"): X,
    (L, "cancelled"): X,
    (R, "cancelled"): X,
    (W, "cancelled"): X,
}

#: A job in one of these statuses will not change without a human.
FINAL = frozenset({C, S, X})
#: Jobs that hold (or are about to hold) GPUs.
ACTIVE = frozenset({L, R})

#: Run-level events (no job): they never change a job's status.
RUN_EVENTS = frozenset({
    "run_submitted", "run_finished", "run_cancelled", "run_reopened", "paused", "resumed",
    "scheduler_started", "scheduler_stopped", "gpu_unreadable", "gpu_readable",
    "launching_halted", "launching_resumed", "summary_written", "hook_ran",
    "sessions_wiped", "stop_requested",
})


def next_status(status, kind):
    """The status after ``kind``, or None when the table forbids it."""
    return TRANSITIONS.get((status, kind))


def transition_table():
    """Rows (from, event, to) for docs and ``ledger states``."""
    return [(str(a) if a else "-", k, str(b)) for (a, k), b in TRANSITIONS.items()]
