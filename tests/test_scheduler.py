"""The scheduler on the GPU simulator, with real screen sessions and real processes.

Each test submits a manifest through the real `ledger` command, which starts a
detached scheduler; the assertions read the ledger the scheduler wrote.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_for
from fixtures_run import (assert_no_gpu_shared, events, kill_scheduler, kinds_of, ledger, scheduler_pid,
                          started_scheduler_pid, state, submit, wait_event, wait_finished, write_manifest)

SIM_JOB = "python3 -m ledger.sim job"


def test_grid_of_12_on_4_gpus_completes_never_sharing_a_gpu(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: grid12
        cwd: {cwd}
        gpu_provider: "sim:4x80G,lag=0.3"
        grid: {{seed: [1, 2, 3], lr: [1, 2, 3, 4]}}
        template:
          id: "s${{seed}}_lr${{lr}}"
          cmd: {job} --mem 30000 --seconds 1 --out out/s${{seed}}_lr${{lr}}.json
          output_check: out/s${{seed}}_lr${{lr}}.json
        """, job=SIM_JOB)
    run = submit(m)
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 12
    evs = events(ledger_db, run)
    assert not [e for e in evs if e.kind == "oom_detected"]
    assert_no_gpu_shared(evs)
    launched = [e for e in evs if e.kind == "launch_requested"]
    assert len(launched) == 12 and {g for e in launched for g in e.data["gpus"]} == {0, 1, 2, 3}
    assert all(e.data["gpu_uuids"][0].startswith("GPU-") for e in launched)
    summary = tmp_path / "work" / "experiment_queue" / run / "summary.md"
    assert summary.exists() and "12 completed" in summary.read_text()
    log = tmp_path / "work" / "experiment_queue" / run / "logs" / "s1_lr1.1.log"
    assert log.exists()
    out = ledger("status", run).stdout
    assert "completed" in out and "s3_lr4" in out


def test_oom_under_foreign_load_retries_and_completes_after_it_leaves(tmp_path, ledger_db):
    from ledger.sim import add_load, remove_load
    m = write_manifest(tmp_path, """
        project: foreign
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0.2"
        oom_retry: {{delay: 1, max_attempts: 3}}
        jobs:
          - id: big
            cmd: {job} --mem 40000 --ramp 2 --seconds 2 --out out/big.json
            output_check: out/big.json
        """, job=SIM_JOB)
    run = submit(m)
    wait_event(ledger_db, run, "launched", "big")
    sim_dir = os.path.join(os.path.dirname(ledger_db), "sim")
    load = add_load(sim_dir, 0, 70000)
    wait_event(ledger_db, run, "oom_detected", "big")
    wait_event(ledger_db, run, "retried", "big")
    time.sleep(1.0)   # a window in which a careless scheduler would launch onto the loaded GPU
    assert not [e for e in events(ledger_db, run, ["launch_requested"]) if e.attempt == 2]
    unloaded_at = time.time()
    remove_load(sim_dir, id=load)
    final = wait_finished(ledger_db, run)
    job = final.jobs["big"]
    assert job.status.value == "completed" and job.attempt == 2 and job.oom_count == 1
    second = [e for e in events(ledger_db, run, ["launch_requested"]) if e.attempt == 2][0]
    assert second.ts >= unloaded_at
    oom = events(ledger_db, run, ["oom_detected"])[0]
    assert "CUDA out of memory" in oom.data["line"]
    first = ledger("logs", "big", "--attempt", "1")
    assert "CUDA out of memory" in first.stdout and "big.1.log (attempt 1)" in first.stderr
    latest = ledger("logs", "big")
    assert "big.2.log (attempt 2)" in latest.stderr and "CUDA out of memory" not in latest.stdout
    audit = ledger("history", "big").stdout.splitlines()
    assert [line.split()[0] for line in audit[3:]] == ["1", "2"] and " yes " in audit[3]


def test_late_memory_release_never_lands_a_wave_on_a_busy_gpu(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: lag
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=1.5"
        oom_retry: {{delay: 1, max_attempts: 1}}
        grid: {{i: [1, 2, 3]}}
        template:
          id: "w${{i}}"
          cmd: {job} --mem 60000 --seconds 0.5 --out out/w${{i}}.json
          output_check: out/w${{i}}.json
        """, job=SIM_JOB)
    run = submit(m)
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 3
    evs = events(ledger_db, run)
    assert not [e for e in evs if e.kind == "oom_detected"]
    ends = {e.job: e.data["ended_at"] for e in evs if e.kind == "exited"}
    starts = {e.job: e.ts for e in evs if e.kind == "launch_requested"}
    assert starts["w2"] >= ends["w1"] + 1.4 and starts["w3"] >= ends["w2"] + 1.4


def test_failures_end_as_described(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: failing
        cwd: {cwd}
        gpu_provider: "sim:4x80G,lag=0"
        jobs:
          - id: no_output
            cmd: "true"
            output_check: out/never.json
          - id: exits_3
            cmd: "echo about to fail; echo boom >&2; exit 3"
          - id: flaky
            cmd: "exit 5"
            retry: {{max_attempts: 2, delay: 0}}
          - id: too_slow
            cmd: "sleep 60"
            timeout: 1
        """)
    run = submit(m)
    final = wait_finished(ledger_db, run)
    evs = events(ledger_db, run)
    jobs = final.jobs
    assert jobs["no_output"].status.value == "stuck"
    failed = [e for e in evs if e.kind == "failed" and e.job == "no_output"][0]
    assert failed.data["outcome"] == "missing_output" and "out/never.json" in failed.data["reason"]
    assert jobs["exits_3"].status.value == "stuck"
    f3 = [e for e in evs if e.kind == "failed" and e.job == "exits_3"][0]
    assert f3.data["exit_code"] == 3 and "boom" in f3.data["log_tail"]
    assert kinds_of(evs, "flaky").count("failed") == 2 and "retried" in kinds_of(evs, "flaky")
    assert jobs["flaky"].attempt == 2 and jobs["flaky"].status.value == "stuck"
    assert "timed_out" in kinds_of(evs, "too_slow")
    assert jobs["too_slow"].status.value == "stuck" and "timeout" in jobs["too_slow"].reason


def test_job_hung_after_writing_its_output_is_cleaned_and_counts_as_completed(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: hang
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        stale_grace: 1
        jobs:
          - id: lingers
            cmd: {job} --mem 1000 --seconds 0.2 --out out/l.json --hang-after-output
            output_check: out/l.json
        """, job=SIM_JOB)
    run = submit(m)
    final = wait_finished(ledger_db, run, timeout=60)
    job = final.jobs["lingers"]
    assert job.status.value == "completed" and job.attempts[-1].stale_cleaned
    pid = job.attempts[-1].pid
    assert pid and not os.path.exists("/proc/%d" % pid) or _is_zombie(pid)


def _is_zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_teacher_student_phases_and_a_stuck_teacher_blocks_its_students(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: distill
        cwd: {cwd}
        gpu_provider: "sim:2x80G,lag=0"
        phases:
          - name: train_teachers
            grid: {{N: [384, 512]}}
            template:
              id: "teacher_N${{N}}"
              cmd: {job} --mem 1000 --seconds 0.3 --out checkpoints/teacher_N${{N}}.pt
              output_check: checkpoints/teacher_N${{N}}.pt
          - name: distill_students
            depends_on: train_teachers
            grid: {{N: [384, 512], seed: [42, 200]}}
            template:
              id: "student_N${{N}}_s${{seed}}"
              cmd: {job} --mem 1000 --seconds 0.2 --out figures/distill_N${{N}}_x_seed${{seed}}.json
              output_check: "figures/distill_N${{N}}_*_seed${{seed}}.json"
              preconditions:
                - type: checkpoint_exists
                  path: checkpoints/teacher_N${{N}}.pt
        """, job=SIM_JOB)
    run = submit(m)
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 6
    evs = events(ledger_db, run)
    teacher_end = max(e.data["ended_at"] for e in evs if e.kind == "exited" and e.job.startswith("teacher"))
    student_start = min(e.ts for e in evs if e.kind == "launch_requested" and e.job.startswith("student"))
    assert student_start >= teacher_end

    # Same phases, but every teacher fails. The checkpoints of the first run are still on
    # disk, so only the stuck dependency (not a missing precondition) can hold the students.
    m2 = tmp_path / "bad.yaml"
    m2.write_text(open(m).read().replace("project: distill", "project: distill_bad").replace(
        "--out checkpoints/teacher_N${N}.pt", "--out checkpoints/teacher_N${N}.pt --exit 1"))
    m2 = str(m2)
    run2 = submit(m2)
    final2 = wait_finished(ledger_db, run2)
    c = final2.counts()
    assert c["stuck"] == 2 and c["blocked"] == 4
    assert not [e for e in events(ledger_db, run2, ["launch_requested"]) if e.job.startswith("student")]
    reason = final2.jobs["student_N384_s42"].reason
    assert "train_teachers" in reason and "stuck" in reason


def test_repeated_kill_9_of_the_scheduler_completes_every_job_exactly_once(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: chaos
        cwd: {cwd}
        gpu_provider: "sim:4x80G,lag=0.2"
        grid: {{i: [1, 2, 3, 4, 5, 6, 7, 8]}}
        template:
          id: "j${{i}}"
          cmd: "echo started >> starts/j${{i}}; {job} --mem 20000 --seconds 1.5 --out out/j${{i}}.json"
          output_check: out/j${{i}}.json
        """, job=SIM_JOB)
    (tmp_path / "work" / "starts").mkdir(parents=True)
    run = submit(m)
    rng = random.Random(7)
    kills = 0
    while kills < 6 and not state(ledger_db).runs[run].finished:
        time.sleep(rng.uniform(0.2, 0.9))
        if kill_scheduler(ledger_db):
            kills += 1
        submit(m)   # same plan: same run; restarts the scheduler
    final = wait_finished(ledger_db, run)
    assert kills >= 3
    assert final.counts()["completed"] == 8
    for i in range(1, 9):
        starts = (tmp_path / "work" / "starts" / ("j%d" % i)).read_text().splitlines()
        assert len(starts) == 1, "j%d started %d times" % (i, len(starts))
    evs = events(ledger_db)
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
    assert_no_gpu_shared(evs)


def test_cancel_kills_the_session_and_retry_runs_it_again(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: cancel
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - id: long
            cmd: "if [ ${{ATTEMPT}} = 1 ]; then sleep 300; fi; echo done > out.txt"
            output_check: out.txt
        """)
    run = submit(m)
    launched = wait_event(ledger_db, run, "launched", "long")[0]
    pid = launched.data["pid"]
    assert os.path.exists("/proc/%d" % pid)
    ledger("cancel", "long")
    wait_for(lambda: not os.path.exists("/proc/%d" % pid) or _is_zombie(pid), timeout=15, what="job killed")
    st = state(ledger_db)
    assert st.runs[run].jobs["long"].status.value == "cancelled"
    cancelled = events(ledger_db, run, ["cancelled"])[0]
    assert "@" in cancelled.data["actor"]
    session = launched.data["session"]
    wait_for(lambda: session not in subprocess.run(["screen", "-ls"], capture_output=True, text=True).stdout,
             timeout=15, what="screen gone")
    wait_finished(ledger_db, run)
    ledger("retry", "long", "--run", run)
    final = wait_finished(ledger_db, run)
    job = final.jobs["long"]
    assert job.status.value == "completed" and job.attempt == 2
    assert "manual_retry" in kinds_of(events(ledger_db, run), "long")


def test_stop_leaves_jobs_running_and_the_next_scheduler_adopts_them(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: adopt
        cwd: {cwd}
        gpu_provider: "sim:2x80G,lag=0"
        grid: {{i: [1, 2]}}
        template:
          id: "a${{i}}"
          cmd: "echo started >> starts.txt; {job} --mem 1000 --seconds 3 --out out/a${{i}}.json"
          output_check: out/a${{i}}.json
        """, job=SIM_JOB)
    run = submit(m)
    evs = wait_event(ledger_db, run, "launched", count=2)
    pids = [e.data["pid"] for e in evs]
    out = ledger("stop").stdout
    assert "stopped" in out and scheduler_pid(ledger_db) is None
    assert all(os.path.exists("/proc/%d" % p) for p in pids)
    assert events(ledger_db, None, ["scheduler_stopped"])
    (asked,) = events(ledger_db, None, ["stop_requested"])
    assert "@" in asked.data["actor"] and asked.data["pid"] > 0     # who asked, and when (ts)
    submit(m)
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 2
    assert len(events(ledger_db, run, ["adopted"])) == 2
    assert len((tmp_path / "work" / "starts.txt").read_text().splitlines()) == 2


def test_a_second_scheduler_on_the_same_ledger_is_refused(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: lock
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - id: s
            cmd: "sleep 5"
        """)
    run = submit(m)
    wait_event(ledger_db, run, "launched", "s")
    res = subprocess.run([sys.executable, "-m", "ledger.scheduler", "--db", ledger_db], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 3 and "already runs" in res.stderr
    other = write_manifest(tmp_path, """
        project: other
        cwd: {cwd}
        gpu_provider: "sim:8x80G"
        jobs: [{{id: x, cmd: "true"}}]
        """, name="other.yaml")
    res = ledger("submit", other, "--host", "local", check=False)
    assert res.returncode == 2 and "differs" in res.stderr and "Traceback" not in res.stderr


def test_two_gpu_jobs_get_two_gpus_and_see_them(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: multi
        cwd: {cwd}
        gpu_provider: "sim:4x80G,lag=0"
        gpus_per_job: 2
        grid: {{i: [1, 2, 3]}}
        template:
          id: "m${{i}}"
          cmd: "echo $CUDA_VISIBLE_DEVICES > out/m${{i}}.gpus; echo ${{GPU}} >> out/m${{i}}.gpus; sleep 0.5"
        """)
    (tmp_path / "work" / "out").mkdir(parents=True)
    run = submit(m)
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 3
    evs = events(ledger_db, run)
    assert_no_gpu_shared(evs)
    for e in [e for e in evs if e.kind == "launch_requested"]:
        assert len(e.data["gpus"]) == 2
        seen = (tmp_path / "work" / "out" / ("%s.gpus" % e.job)).read_text().split()
        assert seen[0] == seen[1] == ",".join(str(g) for g in e.data["gpus"])


@pytest.mark.parametrize("launcher", ["tmux", "process"])
def test_other_launchers_run_jobs_too(tmp_path, ledger_db, launcher):
    m = write_manifest(tmp_path, """
        project: launch_{launcher}
        cwd: {cwd}
        launcher: {launcher}
        gpu_provider: "sim:2x80G,lag=0"
        grid: {{i: [1, 2, 3]}}
        template:
          id: "l${{i}}"
          cmd: "echo hello from ${{i}}; exit 0"
        """, launcher=launcher)
    run = submit(m)
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 3
    log = tmp_path / "work" / "experiment_queue" / run / "logs" / "l2.1.log"
    assert "hello from 2" in log.read_text()


def test_pause_stops_launching_and_resume_restarts_it(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: pause
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        grid: {{i: [1, 2]}}
        template:
          id: "p${{i}}"
          cmd: "sleep 1"
        """)
    run = submit(m)
    wait_event(ledger_db, run, "launched", "p1")
    ledger("pause")
    wait_event(ledger_db, run, "completed", "p1")
    time.sleep(1.0)   # a window in which p2 would launch if pause were ignored
    assert state(ledger_db).runs[run].jobs["p2"].status.value == "pending"
    ledger("resume")
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 2


def test_hooks_run_on_stuck_and_on_complete(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: hooks
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        on_stuck: 'echo "$LEDGER_JOB: $LEDGER_REASON" >> stuck.txt'
        on_complete: 'echo "$LEDGER_RUN" > complete.txt'
        jobs:
          - id: bad
            cmd: "exit 4"
        """)
    run = submit(m)
    wait_finished(ledger_db, run)
    wait_for(lambda: len(events(ledger_db, run, ["hook_ran"])) == 2, timeout=20, what="hooks")
    assert (tmp_path / "work" / "stuck.txt").read_text().startswith("bad: exit code 4")
    assert (tmp_path / "work" / "complete.txt").read_text().strip() == run


def test_submit_follow_shows_progress_until_the_end_and_the_scheduler_is_detached(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: follow
        cwd: {cwd}
        gpu_provider: "sim:2x80G,lag=0"
        jobs:
          - {{id: a, cmd: "sleep 1.5"}}
          - {{id: b, cmd: "sleep 1.5"}}
          - {{id: c, cmd: "sleep 0.2"}}
        """)
    proc = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "submit", m, "--host", "local", "--follow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = started_scheduler_pid(ledger_db)
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    session, tty = int(fields[3]), int(fields[4])
    assert session == pid and tty == 0          # its own session, no terminal: survives the shell
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    progress = [line for line in lines if " done, " in line]
    assert progress[-1].startswith("follow-") and "3/3 done" in progress[-1]
    assert len(progress) == len(set(line.split(", elapsed")[0] for line in progress))  # only changes
    assert any(line.startswith("run follow-") and "(finished)" in line for line in lines)
    assert sum(1 for line in lines if line.split()[:1] in (["a"], ["b"], ["c"])) == 3   # the jobs table


def test_status_watch_follows_a_running_run_to_its_end(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: watch
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - {{id: w, cmd: "sleep 1"}}
        """)
    run = submit(m)
    wait_event(ledger_db, run, "launched", "w")
    out = ledger("status", "--watch", timeout=60).stdout
    assert "%s: 1/1 done" % run in out and "run %s (finished): completed 1" % run in out


def test_a_screen_killed_hard_is_judged_and_its_dead_socket_wiped(tmp_path, ledger_db):
    from ledger.launchers import ScreenLauncher
    m = write_manifest(tmp_path, """
        project: deadscreen
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - {{id: d, cmd: "sleep 60"}}
        """)
    run = submit(m)
    (ev,) = wait_event(ledger_db, run, "launched", "d")
    session = ev.data["session"]
    screen = ScreenLauncher()
    (server,) = [pid for pid, name, _dead in screen.entries() if name == session]
    os.kill(server, signal.SIGKILL)      # the screen server dies without cleaning its socket
    (wiped,) = wait_event(ledger_db, "-", "sessions_wiped", timeout=30)
    assert session in wiped.data["sessions"] and wiped.data["launcher"] == "screen"
    assert session not in {name for _pid, name, _dead in screen.entries()}
    final = wait_finished(ledger_db, run)
    assert final.jobs["d"].status.value == "stuck"       # judged by what its wrapper recorded


def test_a_run_submitted_while_the_scheduler_runs_is_taken_by_it(tmp_path, ledger_db):
    first = write_manifest(tmp_path, """
        project: first
        cwd: {cwd}
        gpu_provider: "sim:2x80G,lag=0"
        jobs:
          - {{id: f1, cmd: "sleep 2"}}
        """)
    second = write_manifest(tmp_path, """
        project: second
        cwd: {cwd}
        gpu_provider: "sim:2x80G,lag=0"
        jobs:
          - {{id: s1, cmd: "sleep 0.5"}}
          - {{id: s2, cmd: "sleep 0.5"}}
        """, name="second.yaml")
    run1 = submit(first)
    wait_event(ledger_db, run1, "launched", "f1")
    pid = scheduler_pid(ledger_db)
    run2 = submit(second)
    assert wait_finished(ledger_db, run2).counts()["completed"] == 2
    assert wait_finished(ledger_db, run1).counts()["completed"] == 1
    started = events(ledger_db, None, ["scheduler_started"])
    assert [e.data["pid"] for e in started] == [pid]              # one scheduler took both runs
    assert_no_gpu_shared(events(ledger_db))


def test_ctrl_c_detaches_follow_and_leaves_the_scheduler_running(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: detach
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - {{id: long, cmd: "sleep 30"}}
        """)
    proc = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "submit", m, "--host", "local", "--follow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_event(ledger_db, None, "launched", "long", timeout=30)
    proc.send_signal(signal.SIGINT)
    out, _err = proc.communicate(timeout=30)
    assert "detached; the scheduler goes on" in out
    assert scheduler_pid(ledger_db) and not events(ledger_db, None, ["scheduler_stopped"])
    (run,) = state(ledger_db).runs.values()
    assert run.jobs["long"].status.value == "running"


def test_logs_follow_prints_new_lines_until_the_attempt_ends(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: tail
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - id: chatty
            cmd: "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.4; done"
        """)
    run = submit(m)
    wait_event(ledger_db, run, "launched", "chatty")
    res = ledger("logs", "chatty", "-f", timeout=60)
    assert [x for x in res.stdout.splitlines() if x.startswith("line")] == ["line %d" % i for i in range(1, 7)]
    assert state(ledger_db).runs[run].jobs["chatty"].status.value == "completed"


def test_a_local_submit_checks_first_and_refuses_a_run_that_cannot_start(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: refuse
        cwd: {cwd}/missing
        jobs:
          - {{id: r, cmd: "true"}}
        """)
    res = ledger("submit", m, "--host", "local", check=False, env=dict(os.environ, PATH="/usr/bin:/bin"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert "local: cwd exists failed: %s/work/missing" % tmp_path in lines[0]
    assert "nvidia-smi not found" in res.stderr and "gpu_provider: sim:4x80G" in res.stderr
    assert not os.path.exists(ledger_db) or not state(ledger_db).runs      # nothing recorded


def test_an_output_left_by_an_earlier_run_never_ends_a_running_job(tmp_path, ledger_db):
    """Only a file this attempt wrote starts the linger grace: an old result in the same
    cwd (a rerun, a retry) must not get a running job killed and counted as completed."""
    m = write_manifest(tmp_path, """
        project: rerun
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        stale_grace: 1
        jobs:
          - id: slow
            cmd: {job} --mem 1000 --seconds 4 --out out/a.json
            output_check: out/a.json
        """, job=SIM_JOB)
    old = tmp_path / "work" / "out" / "a.json"
    old.parent.mkdir(parents=True)
    old.write_text('{"old": true}')
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    run = submit(m)
    final = wait_finished(ledger_db, run, timeout=60)
    attempt = final.jobs["slow"].attempts[-1]
    assert final.jobs["slow"].status.value == "completed"
    assert not attempt.stale_cleaned and attempt.exit_code == 0
    assert "stale_cleaned" not in kinds_of(events(ledger_db, run), "slow")
    assert '"old"' not in old.read_text()          # the job ran to its end and wrote its own


def test_events_other_writers_append_between_the_schedulers_reads_are_never_skipped(tmp_path, ledger_db):
    """The scheduler folds its own appends in seq order with whatever a submit or cancel
    appended just before them, so its state always equals a fresh replay."""
    from ledger import api
    from ledger.events import Event
    from ledger.manifest import load_manifest
    from ledger.scheduler import Scheduler
    from ledger.store import open_store
    plans = []
    for name in ("first", "second"):
        m = write_manifest(tmp_path, """
            project: {project}
            cwd: {cwd}
            gpu_provider: "sim:1x80G"
            jobs:
              - {{id: a, cmd: "true"}}
            """, name=name + ".yaml", project=name)
        plans.append(load_manifest(m).to_dict())
    first = api.submit(ledger_db, plans[0], start_scheduler=False)["run"]
    with open_store(ledger_db) as store:
        scheduler = Scheduler(store, None, "sim:1x80G", exit_when_idle=False)
        scheduler.state = store.state()
        second = api.submit(ledger_db, plans[1], start_scheduler=False)["run"]   # another writer
        scheduler._append([Event(kind="paused", run=first, data={"actor": "test"})])
        assert second in scheduler.state.runs, "the other writer's run was skipped"
        fresh = store.state()
        assert scheduler.state.last_seq == fresh.last_seq
        assert sorted(scheduler.state.runs) == sorted(fresh.runs) == sorted([first, second])
        assert scheduler.state.runs[first].paused


def test_retrying_a_job_of_a_cancelled_run_reopens_the_run_and_runs_the_job(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: reopen
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - id: a
            cmd: "if [ ${{ATTEMPT}} = 1 ]; then sleep 300; fi; echo done > a.txt"
            output_check: a.txt
          - {{id: b, cmd: "sleep 300"}}
        """)
    run = submit(m)
    wait_event(ledger_db, run, "launched", "a")
    ledger("cancel", run)
    out = ledger("retry", "a", "--run", run).stdout
    assert "will run again as attempt 2" in out
    wait_for(lambda: state(ledger_db).runs[run].jobs["a"].status.value == "completed", timeout=60,
             what="the retried job of the cancelled run to complete")
    final = wait_finished(ledger_db, run)
    assert final.jobs["b"].status.value == "cancelled"
    assert "run_reopened" in [e.kind for e in events(ledger_db, run)]


def test_a_job_needing_more_gpus_than_the_host_has_is_refused_by_check_and_submit(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: toobig
        cwd: {cwd}
        gpu_provider: "sim:2x80G"
        jobs:
          - {{id: wide, cmd: "true", gpus_per_job: 3}}
          - {{id: narrow, cmd: "true"}}
        """)
    res = ledger("check", m, "--host", "local", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "jobs: 1 ready, 1 blocked" in res.stdout
    assert "  wide: needs 3 GPUs; this host offers 2 (0,1)" in res.stdout
    res = ledger("submit", m, "--host", "local", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "local: job wide blocked: needs 3 GPUs; this host offers 2 (0,1)" in res.stderr
    assert not os.path.exists(ledger_db) or not state(ledger_db).runs      # nothing recorded


def test_after_a_crash_status_says_the_queue_is_stalled_and_resume_restarts_it(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: revive
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        grid: {{i: [1, 2]}}
        template:
          id: "r${{i}}"
          cmd: "echo started >> starts.txt; {job} --mem 1000 --seconds 2 --out out/r${{i}}.json"
          output_check: out/r${{i}}.json
        """, job=SIM_JOB)
    run = submit(m)
    wait_event(ledger_db, run, "launched", "r1")
    kill_scheduler(ledger_db)                      # SIGKILL: nothing recorded, r2 still pending
    wait_for(lambda: scheduler_pid(ledger_db) is None, timeout=15, what="the lock to be released")
    out = ledger("status").stdout
    assert "scheduler: not running; 1 unfinished run(s) wait: `ledger resume` starts it" in out
    rows = {j["job"]: j for j in json.loads(ledger("status", "--json").stdout)["jobs"]}
    assert rows["r2"]["status"] == "pending" and rows["r2"]["waiting"] == "no scheduler running (`ledger resume`)"
    assert "no scheduler running" in [line for line in out.splitlines() if line.startswith("r2 ")][0]
    out = ledger("resume").stdout
    assert "scheduler started (pid" in out
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 2
    assert len((tmp_path / "work" / "starts.txt").read_text().splitlines()) == 2   # r1 adopted, not rerun


def test_follow_exits_1_when_the_run_ends_with_a_stuck_job(tmp_path, ledger_db):
    m = write_manifest(tmp_path, """
        project: stuckexit
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - {{id: ok, cmd: "true"}}
          - {{id: bad, cmd: "exit 3"}}
        """)
    res = ledger("submit", m, "--host", "local", "--follow", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "completed 1" in res.stdout and "stuck 1" in res.stdout
    res = ledger("status", "--watch", check=False)
    assert res.returncode == 1 and "stuck 1" in res.stdout
    blocked = write_manifest(tmp_path, """
        project: blockedexit
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs:
          - {{id: ok, cmd: "true"}}
          - id: needs_ckpt
            cmd: "true"
            preconditions: [{{type: checkpoint_exists, path: missing.pt}}]
        """, name="blocked.yaml")
    res = ledger("submit", blocked, "--host", "local", "--no-check", "--follow", check=False)
    assert res.returncode == 1 and "blocked 1" in res.stdout, res.stdout + res.stderr
    assert "scheduler is not running" not in res.stderr     # no false alarm while it starts


def test_a_tick_that_keeps_failing_stops_the_scheduler_with_the_reason_recorded(tmp_path, ledger_db, monkeypatch):
    """An error the loop does not expect (here: an impossible transition written into the
    ledger behind the store's back) is logged, the state rebuilt and the tick tried again;
    when it keeps failing the scheduler stops and records why, instead of dying silently
    or spinning."""
    import sqlite3
    import threading
    from ledger import api
    from ledger import scheduler as sched_mod
    from ledger.gpus import provider_from_spec
    from ledger.manifest import load_manifest
    from ledger.store import open_store
    monkeypatch.setattr(sched_mod, "MAX_FAILED_TICKS", 3)
    m = write_manifest(tmp_path, """
        project: broken
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        launcher: process
        jobs:
          - {{id: a, cmd: "sleep 60"}}
          - {{id: b, cmd: "true"}}
        """)
    run = api.submit(ledger_db, load_manifest(m).to_dict(), start_scheduler=False)["run"]

    def forge_an_impossible_event():   # b is pending: 'launched' without a launch is not allowed
        conn = sqlite3.connect(ledger_db, isolation_level=None, timeout=10)
        seq, version = conn.execute("SELECT max(seq), (SELECT max(version) FROM events WHERE run = ? AND job = 'b') "
                                    "FROM events", (run,)).fetchone()
        conn.execute("INSERT INTO events (seq, ts, run, job, version, attempt, kind, data) VALUES "
                     "(?, ?, ?, 'b', ?, 1, 'launched', '{\"pid\": 1}')", (seq + 1, time.time(), run, version + 1))
        conn.close()

    lines = []
    with open_store(ledger_db) as store:
        provider = provider_from_spec("sim:1x80G,lag=0", os.path.dirname(ledger_db))
        scheduler = sched_mod.Scheduler(store, provider, "sim:1x80G,lag=0", log=lines.append)
        threading.Thread(target=lambda: (wait_event(ledger_db, run, "launched", "a"), forge_an_impossible_event()),
                         daemon=True).start()
        reason = scheduler.run()
    assert reason.startswith("stopped after 3 failed ticks in a row: TransitionError")
    assert sum("tick failed" in line and "Traceback" in line for line in lines) == 3
    conn = sqlite3.connect(ledger_db)
    last = conn.execute("SELECT kind, data FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    assert last[0] == "scheduler_stopped" and "failed ticks" in json.loads(last[1])["reason"]
