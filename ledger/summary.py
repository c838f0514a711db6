"""summary.md for a run, rendered from the projection alone (a pure replay).

Same events in, same bytes out: the scheduler writes it when a run ends, and
``ledger summary RUN`` renders it again at any time from the ledger.
"""

import re
import time

from .states import JobStatus

#: More stuck jobs than this with one reason are summarised in one line.
GROUP_AFTER = 3


def iso(ts):
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def duration(seconds):
    """Human wall-clock: 45s, 12m05s, 3h02m."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%02ds" % (seconds // 60, seconds % 60)
    return "%dh%02dm" % (seconds // 3600, (seconds % 3600) // 60)


def job_runtime(job):
    """Seconds the job's attempts ran in total (launch to end)."""
    total = 0.0
    for a in job.attempts:
        start = a.started_at or a.requested_at
        if start and a.ended_at:
            total += a.ended_at - start
    return total


_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _is_number(value):
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, str) and bool(_NUMBER.match(value)))


def _table(headers, rows):
    """A GitHub-flavoured markdown table (as tabulate's "github" format lays it out:
    numeric columns right-aligned, the rest left, headers padded by two). Written here
    because the host-side bundle carries no tabulate."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    columns = list(zip(*cells)) if cells else [()] * len(headers)
    numeric = [bool(col) and all(_is_number(v) for v in col if v != "") and any(v != "" for v in col)
               for col in columns]
    widths = [max([len(h) + 2] + [len(v) for v in col]) for h, col in zip(headers, columns)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"
    out = [line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _ooms(job):
    """OOMs over every attempt (the job's own counter restarts at a manual retry)."""
    return sum(1 for a in job.attempts if a.oom)


def _failures(job):
    """Attempts that failed for another reason than an OOM, over every attempt."""
    return sum(1 for a in job.attempts if a.outcome not in (None, "success", "oom", "cancelled"))


def render_summary(state, run_id):
    run = state.runs[run_id]
    plan = run.plan_obj
    jobs = list(run.jobs.values())
    by = {s: [j for j in jobs if j.status == s] for s in JobStatus}
    completed = by[JobStatus.COMPLETED]
    oom_then_ok = [j for j in completed if _ooms(j) > 0]
    end = run.finished_at or state.last_ts
    lines = [
        "# Summary of run %s" % run.id,
        "",
        "- Project: %s" % run.project,
        "- Working directory: %s" % plan.cwd,
        "- Started: %s" % iso(run.submitted_at),
        "- Completed: %s" % (iso(run.finished_at) if run.finished_at else "not yet (as of %s)" % iso(end)),
        "- Total wall clock: %s" % duration(end - run.submitted_at if end else None),
        "- Jobs: %d total, %d completed (%d after OOM retries), %d stuck, %d blocked, %d cancelled"
        % (len(jobs), len(completed), len(oom_then_ok), len(by[JobStatus.STUCK]),
           len(by[JobStatus.BLOCKED]), len(by[JobStatus.CANCELLED])),
        "",
        "## Phases",
        "",
    ]
    rows = []
    for phase in plan.phases:
        pj = [j for j in jobs if j.phase == phase.name]
        ok = [j for j in pj if j.status == JobStatus.COMPLETED]
        starts = [a.requested_at for j in pj for a in j.attempts if a.requested_at]
        ends = [a.ended_at for j in pj for a in j.attempts if a.ended_at]
        span = (max(ends) - min(starts)) if starts and ends else None
        rows.append([phase.name, len(pj), "%d/%d" % (len(ok), len(pj)), sum(_ooms(j) for j in pj),
                     sum(_failures(j) for j in pj), duration(span)])
    lines += [_table(["phase", "jobs", "success", "OOM retries", "other failures", "duration"], rows), ""]
    lines += ["## Jobs", ""]
    rows = [[j.id, j.phase, j.status.value, j.attempt, _ooms(j), duration(job_runtime(j)),
             _one_line(j.reason) if j.status != JobStatus.COMPLETED else ""] for j in jobs]
    lines += [_table(["job", "phase", "status", "attempts", "OOMs", "run time", "last error"], rows), ""]
    results = [(j.id, o) for j in completed for o in j.outputs]
    lines += ["## Result files", ""]
    if results:
        lines += ["- %s: `%s`" % (jid, path) for jid, path in results]
    else:
        lines.append("No output checks matched any file." if any(plan.job(j.id).output_check for j in jobs)
                     else "The manifest has no output checks.")
    lines += ["", "## Next steps", ""]
    lines += _next_steps(run, by)
    return "\n".join(lines) + "\n"


def _next_steps(run, by):
    """What a human should do now. Jobs stuck for the same reason are listed together,
    so a sweep where 40 jobs hit one bug reads as one line, not forty."""
    steps = []
    groups = {}
    for job in by[JobStatus.STUCK]:
        groups.setdefault(_one_line(job.reason), []).append(job.id)
    for reason, ids in groups.items():
        if len(ids) <= GROUP_AFTER:
            for jid in ids:
                steps.append("- `%s` is stuck: %s. Read `ledger logs %s --run %s`, fix it, then "
                             "`ledger retry %s --run %s`." % (jid, reason, jid, run.id, jid, run.id))
        else:
            shown = ", ".join("`%s`" % j for j in ids[:GROUP_AFTER])
            steps.append("- %d jobs are stuck with the same reason: %s (%s and %d more). Read `ledger logs %s "
                         "--run %s`, fix it, then `ledger retry JOB --run %s` for each."
                         % (len(ids), reason, shown, len(ids) - GROUP_AFTER, ids[0], run.id, run.id))
    for job in by[JobStatus.BLOCKED]:
        steps.append("- `%s` is blocked: %s." % (job.id, _one_line(job.reason)))
    if by[JobStatus.CANCELLED]:
        steps.append("- %d job(s) were cancelled; `ledger retry JOB --run %s` runs one again."
                     % (len(by[JobStatus.CANCELLED]), run.id))
    if not steps:
        steps.append("- Every job completed. Audit retries with `ledger sql \"SELECT * FROM retry_history "
                     "WHERE run = '%s'\"`." % run.id)
    return steps


def _one_line(text, limit=160):
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
