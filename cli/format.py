"""Turning the library's JSON-able answers into tables and lines for people."""

import json
import time

from tabulate import tabulate

from ledger.summary import duration


def when(ts):
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def short(text, limit=70):
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def middle(text, limit=90):
    """Shorten from the middle: a command's distinguishing part (its args) is at the end."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " … " + text[-(limit - head - 3):]


def table(rows, headers):
    # .15g: an epoch time stays 1796369904.38 instead of tabulate's default 1.79637e+09
    return tabulate(rows, headers=headers, tablefmt="simple", floatfmt=".15g")


def runs_table(runs):
    rows = [[r["run"], r["state"], "%d/%d" % (r["done"], r["total"]), r["running"], r["retrying"],
             r["stuck"], when(r["started"])] for r in runs]
    return table(rows, ["run", "state", "done/total", "running", "retrying", "stuck", "started"])


def _job_note(j):
    """The last error, and for a job waiting to retry, when it will."""
    if j["status"] == "retry_wait" and j.get("retry_at"):
        return short("retry at %s: %s" % (time.strftime("%H:%M:%SZ", time.gmtime(j["retry_at"])),
                                          j["last_error"] or "?"))
    if j["status"] == "pending" and j.get("waiting"):
        return short(j["waiting"] + ("; last: %s" % j["last_error"] if j["last_error"] else ""))
    return short(j["last_error"])


def jobs_table(jobs):
    rows = [[j["job"], j["phase"], j["status"], ",".join(str(g) for g in j["gpus"]) or "-", j["attempt"],
             duration(j["elapsed"]) if j["elapsed"] else "-", _job_note(j)] for j in jobs]
    return table(rows, ["job", "phase", "status", "gpu", "attempt", "elapsed", "last error"])


def counts_line(counts):
    return "  ".join("%s %d" % (k, v) for k, v in counts.items() if v)


def progress_counts(run):
    """What --follow compares to decide whether the progress changed (not the clock)."""
    return tuple(run[k] for k in ("done", "total", "running", "retrying", "stuck", "blocked"))


def progress_line(run):
    return ("%s: %d/%d done, %d running, %d retrying, %d stuck, %d blocked, elapsed %s"
            % (run["run"], run["done"], run["total"], run["running"], run["retrying"], run["stuck"],
               run["blocked"], duration(run["elapsed"])))


def status_text(data):
    out = []
    if data.get("at"):
        out.append("as of %s" % when(data["at"]))
    sch = data["scheduler"]
    idle = "not running"
    if not data.get("at") and sch.get("unfinished_runs"):
        idle += "; %d unfinished run(s) wait: `ledger resume` starts it" % sch["unfinished_runs"]
    running = "running (pid %s%s)" % (sch["pid"], ", gpus %s" % sch["gpu_provider"] if sch.get("gpu_provider") else "")
    out.append("scheduler: %s" % (running if sch["running"] else idle))
    if sch.get("halted"):
        out.append("launching halted: %s" % sch["halted"])
    if data["kind"] == "runs":
        out.append(runs_table(data["runs"]) if data["runs"] else "no runs in this ledger yet")
        return "\n".join(out)
    run = data["run"]
    out.append("run %s (%s): %s" % (run["run"], run["state"], counts_line(data["counts"])))
    if data.get("launching_halted"):
        out.append("launching halted: %s" % data["launching_halted"])
    for gpu, reason in (data.get("unreadable_gpus") or {}).items():
        out.append("GPU %s unreadable: %s" % (gpu, reason))
    out.append(jobs_table(data["jobs"]))
    return "\n".join(out)


def events_table(events):
    rows = [[e["seq"], when(e["ts"]), e["run"], e["job"] or "-", e["attempt"] or "-", e["kind"],
             short(_payload(e["data"]), 80)] for e in events]
    return table(rows, ["seq", "time (UTC)", "run", "job", "att", "kind", "data"])


def _payload(data):
    keep = {k: v for k, v in data.items() if k not in ("plan", "log_tail")}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"))


def history_text(h):
    out = ["%s (run %s, phase %s): %s%s" % (h["job"], h["run"], h["phase"], h["status"],
                                           " — %s" % short(h["reason"], 120) if h["reason"] else "")]
    rows = []
    for a in h["attempts"]:
        rows.append([a["attempt"], ",".join(str(g) for g in a["gpus"]) or "-", when(a["started_at"] or a["requested_at"]),
                     when(a["ended_at"]), "-" if a["exit_code"] is None else a["exit_code"],
                     "yes" if a["oom"] else "no", a["outcome"] or "-",
                     duration(a["retry_delay"]) if a["retry_delay"] is not None else "-", a["log"] or "-"])
    out.append(table(rows, ["attempt", "gpu", "start", "end", "exit", "oom", "outcome", "retry delay", "log"])
               if rows else "not launched yet")
    return "\n".join(out)


def plan_table(rows):
    return table([[r[0], r[1], middle(r[2], 90), r[3], r[4] or "-"] for r in rows],
                 ["id", "phase", "command", "gpus", "output check"])


def check_text(report, host):
    out = ["host %s:" % host]
    for h in report["host"]:
        mark = {True: "ok", False: "FAIL", None: "busy"}[h["ok"]]
        out.append("  [%s] %s: %s" % (mark, h["check"], h["detail"]))
    blocked = [j for j in report["jobs"] if j["blocked"]]
    out.append("jobs: %d ready, %d blocked" % (len(report["jobs"]) - len(blocked), len(blocked)))
    for j in blocked:
        out.append("  %s: %s" % (j["job"], "; ".join(j["reasons"])))
    waiting = [j for j in report["jobs"] if not j["blocked"] and j.get("notes")]
    for j in waiting:
        out.append("  %s (ready, waits): %s" % (j["job"], "; ".join(j["notes"])))
    return "\n".join(out)


def hosts_text(rows):
    if not rows:
        return "no hosts yet: `ledger submit MANIFEST --host ALIAS` records one"
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([r["host"], "unreachable", "-", short(r["error"], 60)])
            continue
        sch = r.get("scheduler", {})
        runs = r.get("runs", [])
        active = sum(1 for x in runs if x["state"] != "finished")
        table_rows.append([r["host"], "running" if sch.get("running") else "stopped",
                           "%d (%d active)" % (len(runs), active), short(r.get("gpus"), 60)])
    return table(table_rows, ["host", "scheduler", "runs", "gpus"])
