"""Projection snapshots are provably equal to a full replay.

The argument: the fold is deterministic, so project(e1..en) == fold(S_k, ek+1..en) where
S_k = project(e1..ek); a snapshot is decode(encode(S_k)), so snapshot + tail equals the full
replay exactly when decode(encode(S)) == S for every state S the fold can reach. These tests
check that identity (and the fold from the snapshot) at every cut of ledgers that walk the
whole transition table at random, and of realistic sweeps; then that the store really uses
the snapshot, gets the same State as a plain replay, and ignores snapshots that do not
belong to the ledger or to this code.
"""

import marshal
import os
import random
import shutil
import sys

import pytest

from ledger import store as store_mod
from ledger.events import Event
from ledger.projection import State, apply, decode_state, encode_state, project
from ledger.states import RUN_EVENTS, TRANSITIONS
from ledger.store import open_store

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from ledger_gen import synthetic_events  # noqa: E402

JOB_KINDS_BY_STATUS = {}
for (_before, _kind), _after in TRANSITIONS.items():
    JOB_KINDS_BY_STATUS.setdefault(_before, []).append(_kind)
RUN_KINDS = ["run_finished", "run_cancelled", "run_reopened", "paused", "resumed", "summary_written",
             "hook_ran"]
HOST_KINDS = ["scheduler_started", "scheduler_stopped", "gpu_unreadable", "gpu_readable", "launching_halted",
              "launching_resumed", "sessions_wiped", "stop_requested"]


def _payload(rng, kind, job):
    t = rng.uniform(1e9, 2e9)
    gpus = sorted(rng.sample(range(8), rng.randint(1, 2)))
    return {
        "submitted": {"phase": rng.choice(["main", "student"]), "cmd": "python x.py", "gpus_per_job": len(gpus)},
        "blocked": {"reason": rng.choice(["precondition: ckpt missing", "dependency failed"])},
        "unblocked": {"reason": "precondition holds now"},
        "launch_requested": {"gpus": gpus, "gpu_uuids": ["GPU-%d" % g for g in gpus], "session": "s.%s" % job,
                             "log": "/l/%s.log" % job, "control": "/c"},
        "launched": {"pid": rng.randint(2, 99999), "session": "s", "gpus": rng.choice([None, gpus])},
        "launch_lost": {"reason": "no trace"},
        "launch_failed": {"reason": "screen failed", "retry_at": rng.choice([None, t])},
        "adopted": {"pid": rng.choice([None, 4242])},
        "timed_out": {"timeout": 60},
        "stale_cleaned": {"reason": "lingering", "output_found": True},
        "exited": {"exit_code": rng.choice([0, 1, None]), "signal": rng.choice([None, 9]),
                   **({"ended_at": t} if rng.random() < 0.8 else {})},
        "completed": {"outputs": rng.choice([None, ["out/%s.json" % job]])},
        "oom_detected": {"line": rng.choice([None, "CUDA out of memory"]), "delay": 12, "retry_at": t},
        "failed": {"reason": "exit 3", "outcome": rng.choice([None, "exit_code"]), "delay": 5, "retry_at": t},
        "retried": rng.choice([{}, {"next_attempt": rng.randint(2, 5)}]),
        "stuck": {"reason": "needs a human"},
        "manual_retry": {"actor": "me", "next_attempt": rng.randint(2, 6)},
        "cancelled": {"actor": "me", "reason": rng.choice([None, "not needed"])},
    }.get(kind, {})


def random_walk(seed, n):
    """``n`` events the projection accepts, drawn at random from the whole transition table,
    run-level and host-level events included."""
    rng = random.Random(seed)
    state = State()
    out = []
    ts = 1000.0
    for seq in range(1, n + 1):
        ts += rng.choice([0.0, 0.001, 0.5, 3.0])
        roll = rng.random()
        if not state.runs or roll < 0.03:
            run = "run%d" % len(state.runs)
            ev = Event(kind="run_submitted", run=run, ts=ts, seq=seq, version=1,
                       data={"project": "p", "plan": {"project": "p", "jobs": [], "gpus": [0, 1]},
                             "plan_hash": "h%d" % seq, "host": rng.choice([None, "box"]),
                             "request_id": rng.choice([None, "rq"])})
        elif roll < 0.10:
            kind = rng.choice(HOST_KINDS)
            data = {"gpu": rng.choice([0, 1, "all"]), "reason": rng.choice(["ERR!", "hang"]), "pid": 7,
                    "version": "0.1"}
            ev = Event(kind=kind, run="-", ts=ts, seq=seq, data=data)
        elif roll < 0.15:
            ev = Event(kind=rng.choice(RUN_KINDS), run=rng.choice(sorted(state.runs)), ts=ts, seq=seq, data={})
        else:
            run = state.runs[rng.choice(sorted(state.runs))]
            jobs = sorted(run.jobs)
            movable = [j for j in jobs if run.jobs[j].status in JOB_KINDS_BY_STATUS]
            if not movable or rng.random() < 0.15:
                job, status = "j%d" % len(jobs), None
            else:
                job = rng.choice(movable)
                status = run.jobs[job].status
            kind = rng.choice(JOB_KINDS_BY_STATUS[status])
            attempt = run.jobs[job].attempt if job in run.jobs else 1
            version = run.jobs[job].version + 1 if job in run.jobs else 1
            ev = Event(kind=kind, run=run.id, job=job, attempt=attempt, ts=ts, seq=seq,
                       version=rng.choice([version, None]), data=_payload(rng, kind, job))
        assert ev.kind in RUN_EVENTS or ev.job is not None
        apply(state, ev)
        out.append(ev)
    return out


def _through_marshal(state):
    return decode_state(marshal.loads(marshal.dumps(encode_state(state))))


@pytest.mark.parametrize("seed", range(6))
def test_snapshot_plus_tail_equals_full_replay_at_every_cut(seed):
    events = random_walk(seed, 700)
    full = project(events)
    state = State()
    for k, ev in enumerate(events, 1):
        apply(state, ev)
        restored = _through_marshal(state)
        assert restored == state                      # decode ∘ encode is the identity here
        if k % 7 == 0 or k == len(events):
            for tail in events[k:]:
                apply(restored, tail)
            assert restored == full, "snapshot at event %d + tail differs from the full replay" % k


def test_snapshot_round_trips_realistic_sweeps():
    events = [Event(kind=e.kind, run=e.run, job=e.job, attempt=e.attempt, data=e.data, ts=e.ts, seq=i)
              for i, e in enumerate(synthetic_events(6000, seed=3), 1)]
    full = project(events)
    for k in (1, 2, 150, 2999, 4000, 5999):
        restored = _through_marshal(project(events[:k]))
        for tail in events[k:]:
            apply(restored, tail)
        assert restored == full


@pytest.fixture
def big_ledger(tmp_path):
    path = str(tmp_path / "ledger.db")
    events = list(synthetic_events(store_mod.SNAPSHOT_EVERY + 3000, seed=1))
    with open_store(path) as s:
        s.append_bulk(events[:store_mod.SNAPSHOT_EVERY + 1000])
    return path, events[store_mod.SNAPSHOT_EVERY + 1000:]


def _plain_replay(store):
    return project(store.read())


def test_the_store_writes_uses_and_extends_its_snapshot(big_ledger, monkeypatch):
    path, rest = big_ledger
    with open_store(path, readonly=True) as s:
        assert not os.path.exists(s.snapshot_path())
        first = s.state()                        # folded > SNAPSHOT_EVERY events: leaves a snapshot
        assert first == _plain_replay(s) == s.state(snapshot=False)
    assert os.path.exists(path + ".state")
    assert oct(os.stat(path + ".state").st_mode & 0o777) == "0o600"
    with open_store(path) as s:
        s.append_bulk(rest)                      # the snapshot is now behind the ledger
        loaded = s._load_snapshot()
        assert loaded is not None and loaded == first
        folded = []
        real_fold = s._fold
        monkeypatch.setattr(s, "_fold", lambda state, **kw: folded.append(real_fold(state, **kw)) or folded[-1])
        assert s.state() == _plain_replay(s)
        assert folded == [len(rest)]             # only the tail after the snapshot was read


def test_snapshots_that_do_not_belong_are_ignored(big_ledger, tmp_path, monkeypatch):
    path, _rest = big_ledger
    with open_store(path) as s:
        s.state()
        assert s._load_snapshot() is not None
        # another ledger file (a copy has its own inode) never uses this one's snapshot
        other = str(tmp_path / "copy.db")
        shutil.copyfile(path, other)
        shutil.copyfile(path + ".state", other + ".state")
        os.chmod(other + ".state", 0o600)
        with open_store(other, readonly=True) as o:
            assert o._load_snapshot() is None
            assert o.state() == _plain_replay(o)
        # a snapshot others could have written is not trusted
        os.chmod(s.snapshot_path(), 0o620)
        assert s._load_snapshot() is None
        os.chmod(s.snapshot_path(), 0o600)
        # other code (the fold changed) never reads it
        monkeypatch.setattr(store_mod, "_CODE_HASH", ["another-version"])
        assert s._load_snapshot() is None
        monkeypatch.undo()
        assert s._load_snapshot() is not None
        # garbage is ignored, and a replay puts a good snapshot back
        with open(s.snapshot_path(), "wb") as f:
            f.write(b"\x00garbage")
        assert s._load_snapshot() is None
        assert s.state() == _plain_replay(s)
        assert s._load_snapshot() is not None


def test_bounded_states_never_use_the_snapshot(big_ledger):
    path, _rest = big_ledger
    with open_store(path) as s:
        s.state()
        events = list(s.read())
        cut = events[len(events) // 2]
        assert s.state(until_seq=cut.seq) == project(events, until_seq=cut.seq)
        assert s.state(until_ts=cut.ts) == project(events, until_ts=cut.ts)
