"""The scheduler's pure brain, ``decide(state, observation, config) -> events``, on hand-made
states and observations: no processes, no clock, no files."""

from ledger.decide import (LAUNCH_GRACE, VANISH_GRACE, AttemptObs, Config, GpuObs, Observation, decide,
                           free_gpus, phase_gate)
from ledger.events import Event
from ledger.plan import JobSpec, Phase, Plan, RetryPolicy
from ledger.projection import apply, project

RUN = "p-20261204T000000Z"
CONFIG = Config(control_root="/ledger/runs", home="/home/u")
T = 10000.0


def plan(*jobs, phases=(Phase("main"),), **kw):
    return Plan(project="p", cwd="~/w", jobs=tuple(jobs), phases=phases, **kw)


def job(jid, phase="main", **kw):
    return JobSpec(id=jid, phase=phase, cmd="python train.py", **kw)


def state_of(p, *later):
    """The projection after submitting plan ``p`` and then the events ``later``
    (each a (kind, job, attempt, data) tuple), one second apart."""
    evs = [Event(kind="run_submitted", run=RUN, data={"project": "p", "plan": p.to_dict(), "plan_hash": "h"},
                 ts=T, seq=1)]
    evs += [Event(kind="submitted", run=RUN, job=j.id, attempt=1, data={"phase": j.phase,
                                                                        "gpus_per_job": j.gpus_per_job},
                  ts=T, seq=2 + i) for i, j in enumerate(p.jobs)]
    for i, (kind, jid, attempt, data) in enumerate(later):
        evs.append(Event(kind=kind, run=RUN, job=jid, attempt=attempt, data=data, ts=T + 1 + i,
                         seq=len(evs) + 1))
    return project(evs)


def gpus(*used, total=81920, uuid="GPU-%d"):
    return {i: GpuObs(index=i, uuid=uuid % i, used_mib=u, total_mib=total) for i, u in enumerate(used)}


def obs(now, gpu_map=None, taken_at=None, **kw):
    return Observation(now=now, gpus=gpu_map, gpus_taken_at=now if taken_at is None else taken_at, **kw)


def kinds(events):
    return [(e.kind, e.job) for e in events]


def launched(jid, gpu, attempt=1):
    return [("launch_requested", jid, attempt, {"gpus": [gpu], "gpu_uuids": ["GPU-%d" % gpu],
                                                "session": "s.%s.%d" % (jid, attempt), "log": "/l"}),
            ("launched", jid, attempt, {"pid": 100 + gpu})]


def test_pending_jobs_get_free_gpus_in_manifest_order_one_job_per_gpu():
    st = state_of(plan(job("a"), job("b"), job("c")))
    out = decide(st, obs(T + 5, gpus(0, 30000, 0)), CONFIG)
    req = [e for e in out if e.kind == "launch_requested"]
    assert [(e.job, e.data["gpus"], e.data["gpu_uuids"]) for e in req] == [("a", [0], ["GPU-0"]),
                                                                           ("b", [2], ["GPU-2"])]
    assert req[0].data["session"] == "ledger.%s.a.a1" % RUN
    assert req[0].data["log"] == "/home/u/w/experiment_queue/%s/logs/a.1.log" % RUN


def test_nothing_launches_without_a_gpu_reading_or_on_an_unreadable_gpu():
    st = state_of(plan(job("a")))
    assert not [e for e in decide(st, obs(T + 5, None), CONFIG) if e.kind == "launch_requested"]
    bad = {0: GpuObs(index=0, used_mib=None, total_mib=81920, error="[N/A]")}
    out = decide(st, obs(T + 5, bad), CONFIG)
    assert kinds(out) == [("gpu_unreadable", None)] and out[0].data == {"gpu": 0, "reason": "[N/A]"}
    failed = Observation(now=T + 5, gpus={}, gpu_error="nvidia-smi timed out after 10 s", gpus_taken_at=T + 5)
    assert kinds(decide(st, failed, CONFIG)) == [("gpu_unreadable", None)]


def test_an_unreadable_gpu_is_recorded_once_per_failure_not_once_per_garbled_read():
    st = state_of(plan(job("a")))
    first = Observation(now=T + 5, gpus={}, gpu_error="nvidia-smi: unreadable output: unexpected line: x7#q",
                        gpus_taken_at=T + 5)
    (ev,) = decide(st, first, CONFIG)
    apply(st, Event(kind=ev.kind, run=ev.run, data=ev.data, ts=T + 5, seq=st.last_seq + 1))
    again = Observation(now=T + 6, gpus={}, gpu_error="nvidia-smi: unreadable output: unexpected line: ]]k2",
                        gpus_taken_at=T + 6)
    assert decide(st, again, CONFIG) == []
    other = Observation(now=T + 7, gpus={}, gpu_error="nvidia-smi: timed out after 10 s", gpus_taken_at=T + 7)
    assert kinds(decide(st, other, CONFIG)) == [("gpu_unreadable", None)]


def test_a_gpu_handed_out_is_reserved_before_its_memory_shows():
    st = state_of(plan(job("a"), job("b")), *launched("a", 0))
    out = decide(st, obs(T + 5, gpus(0, 0)), CONFIG)    # a's memory not visible yet on GPU 0
    assert [(e.job, e.data["gpus"]) for e in out if e.kind == "launch_requested"] == [("b", [1])]


def test_a_gpu_just_left_waits_for_a_reading_taken_after_the_job_left():
    """The wave-transition race: the sample that shows GPU 0 empty was taken before the
    job left it, so the late-released memory could still be there."""
    p = plan(job("a"), job("b"))
    st = state_of(p, *launched("a", 0),
                  ("exited", "a", 1, {"exit_code": 0, "ended_at": T + 50}), ("completed", "a", 1, {}))
    early = obs(T + 51, gpus(0), taken_at=T + 49)
    assert free_gpus(st, early, p, RUN) == []
    assert not [e for e in decide(st, early, CONFIG) if e.kind == "launch_requested"]
    still_full = obs(T + 52, gpus(20000), taken_at=T + 51)
    assert free_gpus(st, still_full, p, RUN) == []
    released = obs(T + 53, gpus(0), taken_at=T + 52.5)
    assert [(e.job, e.data["gpus"]) for e in decide(st, released, CONFIG) if e.kind == "launch_requested"] \
        == [("b", [0])]


def test_threshold_foreign_memory_and_allowed_gpus():
    p = plan(job("a"), job("b"), gpus=(1, 2, 3), gpu_free_threshold_mib=1000)
    st = state_of(p)
    got = free_gpus(st, obs(T, gpus(0, 999, 1000, 60000)), p, RUN)
    assert got == [1]   # 0 is not ours to use; 2 is at the threshold; 3 holds another user's process


def test_max_parallel_and_multi_gpu_jobs_keep_manifest_order():
    p = plan(job("big", gpus_per_job=2), job("small"), max_parallel=4)
    st = state_of(p)
    out = decide(st, obs(T, gpus(0, 0, 90000)), CONFIG)
    assert [(e.job, e.data["gpus"]) for e in out if e.kind == "launch_requested"] == [("big", [0, 1])]
    one_free = decide(st, obs(T, gpus(0, 90000, 90000)), CONFIG)
    assert not [e for e in one_free if e.kind == "launch_requested"]   # small waits behind big
    p2 = plan(job("a"), job("b"), job("c"), max_parallel=2)
    out = decide(state_of(p2), obs(T, gpus(0, 0, 0)), CONFIG)
    assert [e.job for e in out if e.kind == "launch_requested"] == ["a", "b"]


def test_launch_is_confirmed_by_the_jobs_pid_and_lost_only_after_the_grace():
    p = plan(job("a"))
    st = state_of(p, ("launch_requested", "a", 1, {"gpus": [0], "gpu_uuids": ["GPU-0"], "session": "s",
                                                   "log": "/l"}))
    requested = st.job(RUN, "a").current.requested_at
    seen = {(RUN, "a"): AttemptObs(pid=4242, pid_alive=True)}
    out = decide(st, obs(requested + 0.5, None, attempts=seen), CONFIG)
    assert kinds(out) == [("launched", "a")] and out[0].data["pid"] == 4242
    nothing = {(RUN, "a"): AttemptObs(session_alive=False)}
    assert decide(st, obs(requested + LAUNCH_GRACE - 1, None, attempts=nothing), CONFIG) == []
    lost = decide(st, obs(requested + LAUNCH_GRACE + 1, None, attempts=nothing), CONFIG)
    assert kinds(lost) == [("launch_lost", "a")]
    alive_session = {(RUN, "a"): AttemptObs(session_alive=True)}
    assert decide(st, obs(requested + 60, None, attempts=alive_session), CONFIG) == []


def test_a_restarted_scheduler_adopts_live_jobs_and_judges_those_that_ended_meanwhile():
    p = plan(job("a"), job("b"), job("c"))
    st = state_of(p, *launched("a", 0), *launched("b", 1), *launched("c", 2))
    seen = {(RUN, "a"): AttemptObs(pid=100, pid_alive=True),
            (RUN, "b"): AttemptObs(pid=101, exit={"exit_code": 0, "ended_at": T + 20}),
            (RUN, "c"): AttemptObs(pid=102, exit={"exit_code": 1, "ended_at": T + 21}, log_tail="RuntimeError: x")}
    out = decide(st, obs(T + 30, None, attempts=seen, adopting=True), CONFIG)
    assert kinds(out) == [("adopted", "a"), ("exited", "b"), ("completed", "b"), ("exited", "c"),
                          ("failed", "c"), ("stuck", "c")]
    assert out[3].data["exit_code"] == 1 and "RuntimeError: x" in out[5].data["reason"]


def test_oom_is_retried_after_its_delay_up_to_max_attempts_then_stuck():
    p = plan(job("a", oom_retry=RetryPolicy(max_attempts=2, delay=120)))
    oom = {(RUN, "a"): AttemptObs(pid=100, exit={"exit_code": 1, "ended_at": T + 20},
                                  log_tail="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")}
    st = state_of(p, *launched("a", 0))
    out = decide(st, obs(T + 21, None, attempts=oom), CONFIG)
    assert kinds(out) == [("exited", "a"), ("oom_detected", "a")]
    assert out[1].data["retry_at"] == T + 21 + 120 and out[1].data["delay"] == 120
    for e in out:
        apply(st, e)
    assert decide(st, obs(T + 100, None), CONFIG) == []                     # still waiting
    retried = decide(st, obs(T + 142, None), CONFIG)
    assert kinds(retried) == [("retried", "a")] and retried[0].data["next_attempt"] == 2
    st = state_of(p, *launched("a", 0), ("exited", "a", 1, {"exit_code": 1}),
                  ("oom_detected", "a", 1, {"retry_at": T}), ("retried", "a", 1, {"next_attempt": 2}),
                  *launched("a", 1, attempt=2))
    out = decide(st, obs(T + 300, None, attempts=oom), CONFIG)
    assert kinds(out) == [("exited", "a"), ("oom_detected", "a"), ("stuck", "a")]
    assert "2 of 2 attempts" in out[2].data["reason"]


def test_an_allocation_larger_than_the_gpu_goes_straight_to_stuck():
    st = state_of(plan(job("a")), *launched("a", 0))
    huge = {(RUN, "a"): AttemptObs(pid=100, exit={"exit_code": 1},
                                   log_tail="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 200.00 GiB")}
    out = decide(st, obs(T + 30, gpus(0), attempts=huge), CONFIG)
    assert kinds(out) == [("exited", "a"), ("oom_detected", "a"), ("stuck", "a")]


def test_exit_zero_without_the_output_fails_and_with_it_completes():
    p = plan(job("a", output_check="out/a.json"))
    st = state_of(p, *launched("a", 0))
    missing = decide(st, obs(T + 9, None, attempts={(RUN, "a"): AttemptObs(pid=1, exit={"exit_code": 0})}), CONFIG)
    assert kinds(missing) == [("exited", "a"), ("failed", "a"), ("stuck", "a")]
    assert "out/a.json" in missing[1].data["reason"]
    found = {(RUN, "a"): AttemptObs(pid=1, exit={"exit_code": 0}, outputs=("out/a.json",))}
    done = decide(st, obs(T + 9, None, attempts=found), CONFIG)
    assert kinds(done) == [("exited", "a"), ("completed", "a")] and done[1].data["outputs"] == ["out/a.json"]


def test_a_job_lingering_after_its_output_is_cleaned_after_the_grace():
    p = plan(job("a", output_check="out/a.json"), stale_grace=60)
    st = state_of(p, *launched("a", 0))
    lingering = {(RUN, "a"): AttemptObs(pid=1, pid_alive=True, outputs=("out/a.json",), output_since=T + 10)}
    assert decide(st, obs(T + 69, None, attempts=lingering), CONFIG) == []
    out = decide(st, obs(T + 71, None, attempts=lingering), CONFIG)
    assert kinds(out) == [("stale_cleaned", "a")] and out[0].data["output_found"] is True
    for e in out:
        apply(st, e)
    killed = {(RUN, "a"): AttemptObs(pid=1, exit={"exit_code": None, "signal": 15}, outputs=("out/a.json",))}
    assert kinds(decide(st, obs(T + 80, None, attempts=killed), CONFIG)) == [("exited", "a"), ("completed", "a")]


def test_a_live_session_whose_job_process_is_gone_is_cleaned():
    st = state_of(plan(job("a")), *launched("a", 0))
    gone = {(RUN, "a"): AttemptObs(pid=1, pid_alive=False, session_alive=True, gone_since=T + 10)}
    assert decide(st, obs(T + 10 + VANISH_GRACE - 1, None, attempts=gone), CONFIG) == []
    out = decide(st, obs(T + 10 + VANISH_GRACE + 1, None, attempts=gone), CONFIG)
    assert kinds(out) == [("stale_cleaned", "a")] and "process is gone" in out[0].data["reason"]


def test_a_session_that_vanished_without_an_exit_record_is_judged_as_such():
    st = state_of(plan(job("a")), *launched("a", 0))
    vanished = {(RUN, "a"): AttemptObs(pid=1, pid_alive=False, session_alive=False, gone_since=T + 10)}
    out = decide(st, obs(T + 10 + VANISH_GRACE + 1, None, attempts=vanished), CONFIG)
    assert kinds(out) == [("exited", "a"), ("failed", "a"), ("stuck", "a")]
    assert out[0].data["exit_code"] is None and "without an exit record" in out[2].data["reason"]
    assert out[1].data["outcome"] == "lost"         # it ran: not a launch failure


def test_a_job_that_ran_and_lost_its_session_follows_the_retry_policy():
    st = state_of(plan(job("a", retry=RetryPolicy(max_attempts=2, delay=5))), *launched("a", 0))
    hup = {(RUN, "a"): AttemptObs(pid=1, exit={"exit_code": None, "signal": None, "ended_at": T + 4,
                                              "reason": "wrapper received SIGHUP"})}
    out = decide(st, obs(T + 5, None, attempts=hup), CONFIG)
    assert kinds(out) == [("exited", "a"), ("failed", "a")]
    assert out[1].data["outcome"] == "lost" and out[1].data["retry_at"] == T + 10


def test_timeout_kills_then_fails_with_reason_timeout():
    st = state_of(plan(job("a", timeout=30)), *launched("a", 0))
    running = {(RUN, "a"): AttemptObs(pid=1, pid_alive=True)}
    started = st.job(RUN, "a").current.started_at
    assert decide(st, obs(started + 29, None, attempts=running), CONFIG) == []
    out = decide(st, obs(started + 31, None, attempts=running), CONFIG)
    assert kinds(out) == [("timed_out", "a")]
    for e in out:
        apply(st, e)
    killed = {(RUN, "a"): AttemptObs(pid=1, exit={"exit_code": None, "signal": 15})}
    verdict = decide(st, obs(started + 35, None, attempts=killed), CONFIG)
    assert kinds(verdict) == [("exited", "a"), ("failed", "a"), ("stuck", "a")]
    assert verdict[2].data["reason"].startswith("timeout")


def test_phases_wait_for_their_dependency_and_a_stuck_one_blocks_the_dependents():
    phases = (Phase("teach"), Phase("student", ("teach",)))
    p = plan(job("t1", "teach"), job("t2", "teach"), job("s1", "student"), phases=phases)
    st = state_of(p, *launched("t1", 0))
    assert phase_gate(st.runs[RUN], p) == {"teach": None, "student": "wait"}
    out = decide(st, obs(T + 5, gpus(90000, 0, 0)), CONFIG)
    assert [e.job for e in out if e.kind == "launch_requested"] == ["t2"]
    st = state_of(p, *launched("t1", 0), ("exited", "t1", 1, {"exit_code": 2}), ("failed", "t1", 1, {}),
                  ("stuck", "t1", 1, {"reason": "exit code 2"}))
    out = decide(st, obs(T + 9, gpus(0, 0, 0)), CONFIG)
    blocked = [e for e in out if e.kind == "blocked"]
    assert [e.job for e in blocked] == ["s1"] and "teach" in blocked[0].data["reason"]
    assert [e.job for e in out if e.kind == "launch_requested"] == ["t2"]


def test_a_failing_precondition_blocks_and_unblocks_when_it_holds():
    p = plan(job("a"))
    st = state_of(p)
    out = decide(st, obs(T, gpus(0), preconditions={(RUN, "a"): "checkpoint_exists: ck.pt not found"}), CONFIG)
    assert kinds(out) == [("blocked", "a")]
    for e in out:
        apply(st, e)
    out = decide(st, obs(T + 1, gpus(0), preconditions={(RUN, "a"): None}), CONFIG)
    assert kinds(out) == [("unblocked", "a")]


def test_paused_or_halted_runs_do_not_launch_and_a_finished_run_is_announced_once():
    p = plan(job("a"))
    st = state_of(p)
    apply(st, Event(kind="paused", run=RUN, data={}, ts=T + 1, seq=99))
    assert decide(st, obs(T + 2, gpus(0)), CONFIG) == []
    st = state_of(p)
    assert decide(st, obs(T + 2, gpus(0), launching_allowed=False), CONFIG) == []
    done = state_of(p, *launched("a", 0), ("exited", "a", 1, {"exit_code": 0}), ("completed", "a", 1, {}))
    out = decide(done, obs(T + 9, None), CONFIG)
    assert kinds(out) == [("run_finished", None)]
    apply(done, Event(kind="run_finished", run=RUN, data={}, ts=T + 10, seq=100))
    assert decide(done, obs(T + 11, None), CONFIG) == []


def test_two_runs_share_the_gpus_without_colliding():
    p = plan(job("a"), job("b"))
    st = state_of(p, *launched("a", 0))
    other = Plan(project="q", cwd="/w", jobs=(JobSpec(id="x", phase="main", cmd="true"),))
    apply(st, Event(kind="run_submitted", run="q-1", data={"project": "q", "plan": other.to_dict(),
                                                           "plan_hash": "q"}, ts=T + 20, seq=50))
    apply(st, Event(kind="submitted", run="q-1", job="x", attempt=1, data={"phase": "main"}, ts=T + 20, seq=51))
    out = decide(st, obs(T + 30, gpus(0, 0, 0)), CONFIG)
    got = [(e.run, e.job, e.data["gpus"]) for e in out if e.kind == "launch_requested"]
    assert got == [(RUN, "b", [1]), ("q-1", "x", [2])]


def test_decide_is_pure_the_same_inputs_give_the_same_events():
    p = plan(job("a"), job("b"), job("c"))
    st = state_of(p, *launched("a", 0))
    o = obs(T + 5, gpus(0, 0, 0), attempts={(RUN, "a"): AttemptObs(pid=100, pid_alive=True)})
    first, second = decide(st, o, CONFIG), decide(st, o, CONFIG)
    assert first == second and first
    assert st == state_of(p, *launched("a", 0))    # the state was not touched


def test_a_job_needing_more_gpus_than_the_host_has_is_blocked_and_does_not_hold_up_the_others():
    st = state_of(plan(job("wide", gpus_per_job=8), job("narrow", gpus_per_job=2)))
    out = decide(st, obs(T + 5, gpus(0, 0, 0, 0)), CONFIG)
    assert kinds(out) == [("blocked", "wide"), ("launch_requested", "narrow")]
    assert out[0].data["reason"] == "needs 8 GPUs; this host offers 4 (0,1,2,3)"
    for e in out:
        apply(st, e)
    # no flapping: neither a later reading nor a failing nvidia-smi unblocks it
    assert [k for k in kinds(decide(st, obs(T + 6, gpus(0, 0, 0, 0)), CONFIG)) if k[1] == "wide"] == []
    assert [k for k in kinds(decide(st, obs(T + 7, None, gpu_error="nvidia-smi hung"), CONFIG))
            if k[1] == "wide"] == []
    allowed = state_of(plan(job("x", gpus_per_job=2), gpus=(3, 9)))
    out = decide(allowed, obs(T + 5, gpus(0, 0, 0, 0)), CONFIG)
    assert kinds(out) == [("blocked", "x")] and out[0].data["reason"] == "needs 2 GPUs; this host offers 1 (3)"


def test_summary_counts_failures_and_ooms_of_every_attempt_across_a_manual_retry():
    from ledger.summary import render_summary

    def failed_attempt(n, oom=False):
        verdict = ("oom_detected", "a", n, {"oom_kind": "torch", "retry_at": None, "delay": None}) if oom else \
            ("failed", "a", n, {"reason": "exit 3", "outcome": "exit_code", "exit_code": 3, "retry_at": None})
        return [*launched("a", 0, attempt=n), ("exited", "a", n, {"exit_code": 1 if oom else 3}), verdict,
                ("stuck", "a", n, {"reason": "needs a human"})]
    st = state_of(plan(job("a", oom_retry=RetryPolicy(max_attempts=1))),
                  *failed_attempt(1), ("manual_retry", "a", 2, {"actor": "me", "next_attempt": 2}),
                  *failed_attempt(2), ("manual_retry", "a", 3, {"actor": "me", "next_attempt": 3}),
                  *failed_attempt(3, oom=True))
    text = render_summary(st, RUN)
    phase_row = [line for line in text.splitlines() if line.startswith("| main ")][0]
    assert [c.strip() for c in phase_row.strip("|").split("|")] == ["main", "1", "0/1", "1", "2", phase_row.split("|")[6].strip()]


def test_an_attempts_duration_runs_from_the_wrappers_own_start_not_the_launched_event():
    st = state_of(plan(job("a")), *launched("a", 0))            # launched recorded at T + 2
    done = {(RUN, "a"): AttemptObs(pid=1, exit={"exit_code": 0, "signal": None, "started_at": T + 1.5,
                                                "ended_at": T + 1.75})}
    out = decide(st, obs(T + 3, None, attempts=done), CONFIG)
    assert out[0].kind == "exited" and out[0].data["duration"] == 0.25
