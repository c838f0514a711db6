"""A hand-written event history of one small run, with fixed times, for read-side tests."""

from ledger.events import Event
from ledger.plan import JobSpec, Phase, Plan

T0 = 1796306400.0   # 2026-12-03 14:00:00 UTC
RUN = "distill-20261203T140000Z"

PLAN = Plan(
    project="distill", cwd="/home/alice/distill",
    phases=(Phase("teachers"), Phase("students", ("teachers",))),
    jobs=(
        JobSpec(id="teacher_N384", phase="teachers", cmd="python train.py --N 384",
                output_check="checkpoints/teacher_N384.pt"),
        JobSpec(id="student_N384_s42", phase="students", cmd="python distill.py --N 384 --seed 42",
                output_check="figures/distill_N384_seed42.json"),
        JobSpec(id="student_N384_s200", phase="students", cmd="python distill.py --N 384 --seed 200",
                output_check="figures/distill_N384_seed200.json"),
    ),
)


def history():
    """teacher completes; student s42 OOMs once then completes; student s200 fails and is stuck."""
    out = []

    def ev(dt, kind, job=None, attempt=1, **data):
        out.append(Event(kind=kind, run=RUN, job=job, attempt=attempt if job else 0, data=data, ts=T0 + dt))

    ev(0, "run_submitted", project="distill", plan=PLAN.to_dict(), plan_hash=PLAN.content_hash(),
       host="local", cwd=PLAN.cwd, actor="alice@laptop")
    for j in PLAN.jobs:
        ev(0, "submitted", j.id, phase=j.phase, cmd=j.cmd, gpus_per_job=1)
    ev(1, "launch_requested", "teacher_N384", gpus=[0], gpu_uuids=["GPU-0"], session="ledger.t.a1",
       log="/home/alice/distill/experiment_queue/%s/logs/teacher_N384.1.log" % RUN, control="/c")
    ev(2, "launched", "teacher_N384", pid=4001, session="ledger.t.a1", gpus=[0], gpu_uuids=["GPU-0"])
    ev(600, "exited", "teacher_N384", exit_code=0, signal=None, ended_at=T0 + 600, duration=598, log_tail="done")
    ev(600, "completed", "teacher_N384", outputs=["checkpoints/teacher_N384.pt"])
    for i, job in enumerate(("student_N384_s42", "student_N384_s200")):
        ev(601, "launch_requested", job, gpus=[i], gpu_uuids=["GPU-%d" % i], session="ledger.%s.a1" % job,
           log="/home/alice/distill/experiment_queue/%s/logs/%s.1.log" % (RUN, job), control="/c")
        ev(602, "launched", job, pid=4002 + i, session="ledger.%s.a1" % job, gpus=[i], gpu_uuids=["GPU-%d" % i])
    ev(700, "exited", "student_N384_s42", exit_code=1, signal=None, ended_at=T0 + 700, duration=98,
       log_tail="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.")
    ev(700, "oom_detected", "student_N384_s42", oom_kind="torch", requested_mib=2048.0, retry_at=T0 + 820,
       delay=120, line="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.")
    ev(750, "exited", "student_N384_s200", exit_code=2, signal=None, ended_at=T0 + 750, duration=148,
       log_tail="ValueError: bad config")
    ev(750, "failed", "student_N384_s200", reason="exit code 2: ValueError: bad config", outcome="exit_code",
       exit_code=2, log_tail="ValueError: bad config", retry_at=None, delay=None)
    ev(750, "stuck", "student_N384_s200", reason="exit code 2: ValueError: bad config")
    ev(820, "retried", "student_N384_s42", next_attempt=2)
    ev(821, "launch_requested", "student_N384_s42", attempt=2, gpus=[1], gpu_uuids=["GPU-1"],
       session="ledger.s42.a2", log="/home/alice/distill/experiment_queue/%s/logs/student_N384_s42.2.log" % RUN,
       control="/c")
    ev(822, "launched", "student_N384_s42", attempt=2, pid=4010, session="ledger.s42.a2", gpus=[1],
       gpu_uuids=["GPU-1"])
    ev(1500, "exited", "student_N384_s42", attempt=2, exit_code=0, signal=None, ended_at=T0 + 1500, duration=678,
       log_tail="ok")
    ev(1500, "completed", "student_N384_s42", attempt=2, outputs=["figures/distill_N384_seed42.json"])
    ev(1501, "run_finished", counts={})
    return out


def build(db_path):
    """Write the history into a real ledger file; returns the stored events."""
    from ledger.store import open_store
    with open_store(db_path) as store:
        return store.append(history())
