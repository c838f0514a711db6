"""The projection is a pure fold that enforces the one transition table."""

import pytest

from ledger.errors import TransitionError
from ledger.events import Event
from ledger.plan import JobSpec, Plan
from ledger.projection import project
from ledger.states import TRANSITIONS, JobStatus

PLAN = Plan(project="p", cwd="/tmp/p", jobs=(JobSpec(id="a", phase="main", cmd="true"),
                                             JobSpec(id="b", phase="main", cmd="true")))
RUN = "p-20261203T000000Z"


def recorded():
    """A run where job a OOMs once then completes, and job b fails and is stuck."""
    def ev(seq, kind, job=None, attempt=1, **data):
        return Event(kind=kind, run=RUN, job=job, attempt=attempt, data=data, ts=1000.0 + seq, seq=seq)
    return [
        ev(1, "run_submitted", attempt=0, project="p", plan=PLAN.to_dict(), plan_hash=PLAN.content_hash()),
        ev(2, "submitted", "a", phase="main"),
        ev(3, "submitted", "b", phase="main"),
        ev(4, "launch_requested", "a", gpus=[0], gpu_uuids=["GPU-0"], session="s.a.1", log="/l/a.1.log"),
        ev(5, "launch_requested", "b", gpus=[1], gpu_uuids=["GPU-1"], session="s.b.1", log="/l/b.1.log"),
        ev(6, "launched", "a", pid=101),
        ev(7, "launched", "b", pid=102),
        ev(8, "exited", "a", exit_code=1, signal=None, ended_at=1008.0),
        ev(9, "oom_detected", "a", line="torch.OutOfMemoryError: CUDA out of memory.", retry_at=1020.0, delay=12),
        ev(10, "exited", "b", exit_code=3, signal=None, ended_at=1010.0),
        ev(11, "failed", "b", reason="exit code 3: boom", retry_at=None),
        ev(12, "stuck", "b", reason="exit code 3: boom"),
        ev(13, "retried", "a", next_attempt=2),
        ev(14, "launch_requested", "a", attempt=2, gpus=[0], gpu_uuids=["GPU-0"], session="s.a.2", log="/l/a.2.log"),
        ev(15, "launched", "a", attempt=2, pid=103),
        ev(16, "exited", "a", attempt=2, exit_code=0, signal=None, ended_at=1030.0),
        ev(17, "completed", "a", attempt=2, outputs=["out/a.json"]),
        ev(18, "run_finished", attempt=0, counts={}),
    ]


def test_recorded_sequence_gives_the_expected_state():
    state = project(recorded())
    run = state.runs[RUN]
    a, b = run.jobs["a"], run.jobs["b"]
    assert a.status == JobStatus.COMPLETED and a.attempt == 2 and a.oom_count == 1
    assert [x.number for x in a.attempts] == [1, 2]
    assert a.attempts[0].oom and a.attempts[0].retry_delay == 12 and a.attempts[0].exit_code == 1
    assert a.attempts[1].outcome == "success" and a.outputs == ("out/a.json",)
    assert b.status == JobStatus.STUCK and b.reason == "exit code 3: boom" and b.failures == 1
    assert run.finished and state.last_seq == 18


def test_replay_is_deterministic_and_a_prefix_is_the_past():
    events = recorded()
    assert project(events) == project(events)
    past = project(events, until_seq=9)
    assert past.runs[RUN].jobs["a"].status == JobStatus.RETRY_WAIT
    assert past.runs[RUN].jobs["b"].status == JobStatus.RUNNING
    by_time = project(events, until_ts=1009.0)
    assert by_time.runs[RUN].jobs["a"].status == JobStatus.RETRY_WAIT and by_time.last_seq == 9


def test_an_impossible_transition_is_an_error_not_an_overwrite():
    events = recorded()[:3] + [Event(kind="completed", run=RUN, job="a", attempt=1, seq=4, ts=1004.0)]
    with pytest.raises(TransitionError, match="completed is not allowed from pending"):
        project(events)


def test_every_transition_in_the_table_names_a_documented_kind():
    from ledger.events import KINDS
    assert {kind for (_before, kind) in TRANSITIONS} <= set(KINDS)


def test_docs_show_every_event_kind_and_the_transition_table():
    import os
    from ledger.events import KINDS
    from ledger.states import transition_table
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "events.md")).read()
    for kind in KINDS:
        assert "`%s`" % kind in doc, kind
    for before, kind, after in transition_table():
        assert "| %s | `%s` | %s |" % (before, kind, after) in doc, (before, kind, after)
