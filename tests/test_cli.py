"""The read side through the real `ledger` command, on a ledger with a recorded history."""

import json
import os
import re

import pytest

from fixtures_recorded import RUN, T0, build
from fixtures_run import ledger

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture
def recorded(ledger_db):
    build(ledger_db)
    return ledger_db


def test_version_and_help_with_examples():
    from ledger import __version__
    from ledger.cli.main import cli
    assert ledger("--version").stdout.strip() == "ledger %s" % __version__
    assert len(cli.commands) >= 19
    for cmd in sorted(cli.commands):      # every command, so a new one without an example fails
        out = ledger(cmd, "--help").stdout
        assert "Example" in out and "ledger %s" % cmd in out.split("Example", 1)[1], cmd


def test_the_sql_examples_in_the_docs_run(recorded):
    with open(os.path.join(os.path.dirname(DATA), "..", "docs", "events.md")) as f:
        queries = re.findall(r'^ledger sql "(.+)"$', f.read(), re.M)
    assert len(queries) == 3
    results = [json.loads(ledger("sql", "--json", q.replace("s200_N64_n50K", "student_N384_s42")).stdout)
               for q in queries]
    assert results[0] == [{"run": RUN, "job": "student_N384_s42", "ooms": 1}]
    assert {(r["job"], r["attempt"], r["seconds"]) for r in results[1]} == {
        ("teacher_N384", 1, 598.0), ("student_N384_s42", 2, 678.0)}
    assert [r["kind"] for r in results[2]][:3] == ["submitted", "launch_requested", "launched"]


def test_status_of_one_run_shows_totals_and_jobs(recorded):
    out = ledger("status").stdout
    assert "run %s (finished): completed 2  stuck 1" % RUN in out
    assert "student_N384_s200" in out and "exit code 2: ValueError: bad config" in out
    data = json.loads(ledger("status", "--json").stdout)
    assert data["kind"] == "run" and data["counts"]["completed"] == 2
    job = {j["job"]: j for j in data["jobs"]}["student_N384_s42"]
    assert job["attempt"] == 2 and job["oom_count"] == 1 and job["status"] == "completed"


def test_status_at_a_past_time_shows_the_state_then(recorded):
    data = json.loads(ledger("status", "--json", "--at", "2026-12-03T14:12:00").stdout)
    jobs = {j["job"]: j["status"] for j in data["jobs"]}
    assert jobs == {"teacher_N384": "completed", "student_N384_s42": "retry_wait", "student_N384_s200": "running"}
    text = ledger("status", "--at", "2026-12-03T14:12:00").stdout
    assert "as of 2026-12-03 14:11:40Z" in text and "retry at 14:13:40Z: torch.OutOfMemoryError" in text
    by_seq = json.loads(ledger("status", "--json", "--at", "4").stdout)
    assert {j["status"] for j in by_seq["jobs"]} == {"pending"}


def test_status_with_several_runs_gives_one_row_per_run(recorded):
    from ledger.events import Event
    from ledger.store import open_store
    with open_store(recorded) as store:
        store.append([Event(kind="run_submitted", run="other-1", data={"project": "other", "plan": {
            "project": "other", "cwd": "/x", "jobs": []}, "plan_hash": "h"}, ts=T0 + 5),
            Event(kind="submitted", run="other-1", job="x", attempt=1, data={"phase": "main"}, ts=T0 + 5)])
        store.append([Event(kind="run_submitted", run="third-1", data={"project": "third", "plan": {
            "project": "third", "cwd": "/x", "jobs": []}, "plan_hash": "h3"}, ts=T0 + 6)])
    data = json.loads(ledger("status", "--json").stdout)
    assert data["kind"] == "runs" and [r["run"] for r in data["runs"]] == [RUN, "other-1", "third-1"]
    assert data["runs"][0]["done"] == 2 and data["runs"][0]["total"] == 3 and data["runs"][0]["stuck"] == 1


def test_replay_filters(recorded):
    lines = ledger("replay", "--json", "--kind", "oom_detected", "--kind", "stuck").stdout.splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds == ["oom_detected", "stuck"]
    job = [json.loads(x) for x in ledger("replay", "--json", "--job", "teacher_N384").stdout.splitlines()]
    assert [e["kind"] for e in job] == ["submitted", "launch_requested", "launched", "exited", "completed"]
    since = [json.loads(x)["seq"] for x in ledger("replay", "--json", "--since", "20").stdout.splitlines()]
    assert since[0] == 20 and since == list(range(20, since[-1] + 1))
    window = [json.loads(x) for x in ledger("replay", "--json", "--since", "2026-12-03T14:11:00Z",
                                            "--until", "2026-12-03T14:13:00Z").stdout.splitlines()]
    assert window and all(T0 + 660 <= e["ts"] <= T0 + 780 for e in window)
    recent = ledger("replay", "--json", "--since", "90m").stdout
    assert recent.strip() == ""     # everything happened long before 90 minutes ago
    table = ledger("replay", "--since", "1").stdout
    assert "run_submitted" in table and "seq" in table


def test_history_is_the_audit_of_one_job(recorded):
    data = json.loads(ledger("history", "student_N384_s42", "--json").stdout)
    a1, a2 = data["attempts"]
    assert a1["oom"] and a1["exit_code"] == 1 and a1["retry_delay"] == 120 and a1["gpus"] == [0]
    assert a2["outcome"] == "success" and a2["gpus"] == [1] and a2["log"].endswith("student_N384_s42.2.log")
    text = ledger("history", "student_N384_s42").stdout
    assert "2m00s" in text and "yes" in text


def test_summary_matches_the_hand_checked_file(recorded, tmp_path):
    out = tmp_path / "summary.md"
    ledger("summary", RUN, "-o", str(out))
    with open(os.path.join(DATA, "summary_expected.md")) as f:
        assert out.read_text() == f.read()


def test_sql_reads_views_and_the_database_refuses_writes(recorded):
    rows = json.loads(ledger("sql", "--json", "SELECT job, count(*) AS n FROM retry_history WHERE kind = "
                             "'oom_detected' GROUP BY job").stdout)
    assert rows == [{"job": "student_N384_s42", "n": 1}]
    att = json.loads(ledger("sql", "--json", "SELECT job, attempt, outcome FROM job_attempts ORDER BY job, attempt").stdout)
    assert {"job": "student_N384_s42", "attempt": 1, "outcome": "oom"} in att
    for bad in ("DELETE FROM events", "INSERT INTO meta VALUES ('a', 'b')", "DROP TABLE events",
                "UPDATE events SET kind = 'x'"):
        res = ledger("sql", bad, check=False)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, bad


def test_unknown_job_and_run_are_one_line_user_errors(recorded):
    for args in (["history", "nope"], ["status", "no-such-run"], ["logs", "nope"], ["retry", "teacher_N384"],
                 ["replay", "--since", "yesterday-ish"]):
        res = ledger(*args, check=False)
        assert res.returncode == 2, args
        assert res.stderr.startswith("ledger: error: ") and res.stderr.count("\n") == 1, (args, res.stderr)


def test_a_missing_ledger_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LEDGER_DB", str(tmp_path / "none" / "ledger.db"))
    res = ledger("status", check=False)
    assert res.returncode == 2 and "no ledger at" in res.stderr


def test_ledger_file_is_private(recorded):
    assert os.stat(recorded).st_mode & 0o777 == 0o600


def test_paths_that_cannot_be_used_are_one_line_user_errors(recorded, tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such"
    cases = [(["summary", RUN, "-o", str(missing / "s.md")], "%s: No such file or directory" % (missing / "s.md")),
             (["plan", os.path.join(os.path.dirname(__file__), "..", "ledger", "examples", "sim_sweep.yaml"),
               "--out-dir", "/proc/ledger-test/plan"], "No such file or directory"),
             (["pull", "-o", str(missing / "x.db")], "pull: folder %s does not exist" % missing)]
    for args, message in cases:
        res = ledger(*args, check=False)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.startswith("ledger: error: ") and res.stderr.count("\n") == 1, (args, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert not missing.parent.exists()                  # a typo in -o creates no folders
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a database, just notes\n" * 200)
    monkeypatch.setenv("LEDGER_DB", str(garbage))
    res = ledger("status", check=False)
    assert res.returncode == 2 and "cannot open ledger at %s: file is not a database" % garbage in res.stderr


def test_replay_filters_that_can_match_nothing_are_refused(recorded):
    for args, message in ((["--kind", "stuk"], "unknown event kind 'stuk' (did you mean 'stuck'?)"),
                          (["--job", "nosuch"], "no job named nosuch in the ledger"),
                          (["--since", "10m", "--until", "20m"], "--since 10m is after --until 20m")):
        res = ledger("replay", *args, check=False)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
    assert "stuck" in ledger("replay", "--kind", "stuck").stdout


def test_bare_ledger_prints_help_and_a_closed_pipe_is_not_an_error(recorded):
    import subprocess
    import sys
    res = ledger(check=False)
    assert res.returncode == 0 and res.stdout.startswith("Usage: ledger") and not res.stderr
    many = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 50000) SELECT x FROM c"
    cmd = "%s -m ledger.cli.main sql '%s' | head -1" % (sys.executable, many)    # far beyond a pipe's buffer
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "x" and not res.stderr, res


def test_db_is_accepted_after_the_command_name_too(recorded, tmp_path, monkeypatch):
    monkeypatch.setenv("LEDGER_DB", str(tmp_path / "elsewhere.db"))     # the explicit flag wins
    for args in (["status", "--db", recorded], ["--db", recorded, "status"]):
        assert RUN in ledger(*args).stdout, args


def test_sql_edge_cases_are_clear(recorded):
    out = ledger("sql", "SELECT ts FROM events ORDER BY seq LIMIT 1").stdout
    assert "e+09" not in out and str(int(T0)) in out          # epoch times printed whole
    for query, message in (("", "sql: empty query"),
                           ("PRAGMA journal_mode=DELETE", "opened read-only and this PRAGMA would change it")):
        res = ledger("sql", query, check=False)
        assert res.returncode == 2 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_logs_lines_must_be_positive_and_a_finished_run_cannot_be_cancelled_again(recorded):
    res = ledger("logs", "teacher_N384", "-n", "0", check=False)
    assert res.returncode == 2 and "-n" in res.stderr
    res = ledger("cancel", RUN, check=False)
    assert res.returncode == 2 and "run %s has no job left to cancel" % RUN in res.stderr


def test_demo_runs_the_example_end_to_end_and_a_second_demo_is_a_new_run(ledger_db, tmp_path):
    env = dict(os.environ, HOME=str(tmp_path / "home"))        # the example works in ~/ledger-demo
    runs = []
    for _ in range(2):
        out = ledger("demo", env=env, timeout=240).stdout
        runs.append(re.search(r"^run (\S+): 12 jobs of sim_sweep", out, re.M).group(1))
        assert "ledger %s; jobs work in ~/ledger-demo" % ledger_db in out
        assert "(finished): completed 12" in out and "# Summary of run %s" % runs[-1] in out
    assert runs[0] != runs[1]
    assert len(list((tmp_path / "home" / "ledger-demo" / "experiment_queue").iterdir())) == 2
