"""Reliability under bad surroundings and bad input: a network filesystem, readers hammering the
ledger, huge binary logs, hostile manifests and arguments, private files.

Real components: an sshfs mount over the test sshd, real screen sessions, real processes.
docs/reliability.md lists each guarantee with the test that proves it.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import wait_for
from fixtures_run import events, ledger, state, submit, wait_event, wait_finished, write_manifest
from fixtures_ssh import ssh_env  # noqa: F401  (fixture)

SIM_JOB = "python3 -m ledger.sim job"


# ---- a ledger folder on a network filesystem ----------------------------------------

@pytest.fixture
def sshfs_mount(ssh_env, tmp_path):  # noqa: F811
    """The test user's folder on the test sshd, mounted here with sshfs (FUSE)."""
    if not shutil.which("sshfs"):
        pytest.skip("sshfs is not installed (apt-get install sshfs)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: FUSE mounts are impossible here")
    remote = "share-%d-%s" % (os.getpid(), tmp_path.name)
    ssh_env.run_as_user("mkdir -p ~/%s" % remote)
    point = tmp_path / "nfs-home"
    point.mkdir()
    cmd = ["sshfs", "-F", str(ssh_env.config_path), "gpu-a:%s" % remote, str(point),
           "-o", "UserKnownHostsFile=%s" % ssh_env.known_hosts_path, "-o", "StrictHostKeyChecking=yes",
           "-o", "BatchMode=yes"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip("sshfs mount impossible here: %s" % (res.stderr.strip() or res.stdout.strip()))
    try:
        yield point
    finally:
        subprocess.run(["fusermount", "-u", "-z", str(point)], capture_output=True)
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
        ssh_env.run_as_user("rm -rf ~/%s" % remote, check=False)


def test_a_ledger_folder_on_sshfs_is_detected_and_the_ledger_kept_on_a_local_disk(sshfs_mount, tmp_path,
                                                                                  monkeypatch):
    from ledger.localdisk import filesystem_of, is_network
    fstype, point, _source = filesystem_of(str(sshfs_mount / ".ledger" / "ledger.db"))
    assert fstype == "fuse.sshfs" and point == str(sshfs_mount) and is_network(fstype)
    asked = str(sshfs_mount / ".ledger" / "ledger.db")
    local_dir = tmp_path / "var-tmp"
    monkeypatch.setenv("LEDGER_DB", asked)
    monkeypatch.setenv("LEDGER_LOCAL_DIR", str(local_dir))
    local = str(local_dir / ("%s.db" % socket.gethostname().split(".")[0]))
    m = write_manifest(tmp_path, """
        project: onnfs
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs: [{{id: a, cmd: "echo hi > out.txt", output_check: out.txt}}]
        """)
    res = ledger("submit", m, "--host", "local")
    note = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(note) == 1 and "network filesystem" in note[0] and "fuse.sshfs" in note[0] and local in note[0]
    run = res.stdout.split("run ", 1)[1].split()[0]
    final = wait_finished(local, run)
    assert final.counts()["completed"] == 1
    assert not os.path.exists(asked) and not os.listdir(str(sshfs_mount))    # nothing written over sshfs
    assert os.stat(local).st_mode & 0o777 == 0o600 and os.stat(str(local_dir)).st_mode & 0o777 == 0o700
    out = ledger("status", run)
    assert "completed" in out.stdout and "network filesystem" in out.stderr
    # a ledger that already lives there is refused, naming the fix
    os.makedirs(os.path.dirname(asked))
    shutil.copyfile(local, asked)
    res = ledger("status", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "network filesystem" in line and "mv %s" % asked in line and "LEDGER_DB" in line


def test_filesystem_types_that_count_as_network(tmp_path):
    """mountinfo parsing (escaped spaces, the longest prefix wins) and the type list."""
    from ledger.localdisk import filesystem_of, is_network
    root = tmp_path / "root"
    for folder in ("home/bob", "home/al ice/scratch", "mnt/w"):
        (root / folder).mkdir(parents=True)
    r = str(root)
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:40 / {r}/home rw,relatime shared:2 - nfs4 srv:/export/home rw,vers=4.2\n"
        "41 40 0:41 / {r}/home/al\\040ice/scratch rw - ext4 /dev/sdb1 rw\n"
        "42 22 0:42 / {r}/mnt/w rw - cifs //srv/w rw\n".format(r=r))
    assert filesystem_of(r + "/home/bob/.ledger/ledger.db", str(info))[:2] == ("nfs4", r + "/home")
    assert filesystem_of(r + "/home/al ice/scratch/l.db", str(info))[:2] == ("ext4", r + "/home/al ice/scratch")
    assert filesystem_of(r + "/mnt/w/x", str(info))[0] == "cifs"
    assert filesystem_of(r + "/var/tmp/x", str(info))[:2] == ("ext4", "/")
    for fstype in ("nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "fuse.s3fs", "fuse", "9p", "lustre"):
        assert is_network(fstype), fstype
    for fstype in ("ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "fuseblk"):
        assert not is_network(fstype), fstype


# ---- readers hammering while the scheduler appends -------------------------------------

READER = """
import sys, time, traceback
from ledger import api
from ledger.errors import LedgerError
db, stop, which = sys.argv[1], sys.argv[2], sys.argv[3]
import os
calls = errors = 0
while not os.path.exists(stop):
    try:
        if which == "status":
            api.status(db)
        elif which == "replay":
            api.replay(db, since="1")
        else:
            api.sql(db, "SELECT kind, COUNT(*) FROM events GROUP BY kind")
        calls += 1
    except LedgerError as exc:
        errors += 1
        print("ERROR", exc, flush=True)
print("CALLS", calls, errors, flush=True)
"""

WRITER = """
import os, sys, time
from ledger.events import Event
from ledger.store import open_store
db, run, stop = sys.argv[1], sys.argv[2], sys.argv[3]
store = open_store(db)
worst, n = 0.0, 0
while not os.path.exists(stop):
    for kind in ("paused", "resumed"):                 # what `ledger pause`/`resume` append, timed
        t = time.monotonic()
        store.append([Event(kind, run, data={"actor": "hammer-test"})])
        worst = max(worst, time.monotonic() - t)
        n += 1
    time.sleep(0.05)
print("WORST", worst, n, flush=True)
"""


def test_readers_hammering_never_see_locked_and_no_writer_stalls(tmp_path, ledger_db):
    """3 processes loop status/replay/sql through the API, a shell loops the real `ledger status`,
    `ledger replay` and `ledger sql`, and a user pauses/resumes the run again and again, while the
    scheduler runs 16 short jobs: no `database is locked` anywhere, no write waits a second."""
    m = write_manifest(tmp_path, """
        project: hammer
        cwd: {cwd}
        gpu_provider: "sim:4x80G,lag=0"
        grid: {{i: [{ids}]}}
        template:
          id: "h${{i}}"
          cmd: {job} --mem 1000 --ramp 0.05 --seconds 0.3 --out out/h${{i}}.json
          output_check: out/h${{i}}.json
        """, job=SIM_JOB, ids=", ".join(str(i) for i in range(1, 17)))
    run = submit(m)
    stop = str(tmp_path / "stop")
    procs = [subprocess.Popen([sys.executable, "-c", READER, ledger_db, stop, which], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for which in ("status", "replay", "sql")]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, ledger_db, run, stop], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    cli_errors, cli_calls = [], 0
    try:
        while not state(ledger_db).runs[run].finished or cli_calls < 6:
            for args in (["status"], ["replay", "--since", "1"], ["sql", "SELECT COUNT(*) FROM events"]):
                res = ledger(*args, check=False)
                cli_calls += 1
                if res.returncode != 0 or "locked" in res.stderr.lower():
                    cli_errors.append(res.stderr)
            assert len(cli_errors) == 0, cli_errors
    finally:
        open(stop, "w").close()
        outs = [p.communicate(timeout=60) for p in procs]
        wout, werr = writer.communicate(timeout=60)
    for out, err in outs:
        assert "ERROR" not in out and "Traceback" not in err and "locked" not in (out + err).lower(), out + err
        calls = int(out.split("CALLS")[1].split()[0])
        assert calls >= 3
    assert "Traceback" not in werr, werr
    worst, n = wout.split("WORST")[1].split()
    assert n and int(n) >= 10
    print("worst write %.3f s over %s writes; %d CLI calls; reader calls %s" % (float(worst), n, cli_calls,
          [o.split("CALLS")[1].split()[0] for o, _e in outs]))
    assert float(worst) < 1.0, "a write waited %.2f s" % float(worst)
    final = wait_finished(ledger_db, run)
    assert final.counts()["completed"] == 16


# ---- job logs of many GB, binary junk, no newlines -------------------------------------

OOM_TEXT = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
            "capacity of 79.15 GiB of which 1.20 GiB is free.")


def _vm_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM for %d" % pid)


def test_huge_sparse_binary_logs_are_judged_from_their_tail_with_bounded_memory(tmp_path, ledger_db):
    """Each job makes its own log a 20 GB sparse file, then writes 300 KB of random bytes with no
    newline (and one an OOM message at the very end). The scheduler judges both from the tail,
    its peak memory stays far below the log size, and the recorded lines are short."""
    log = "experiment_queue/$LEDGER_RUN/logs/$LEDGER_JOB.$LEDGER_ATTEMPT.log"
    junk = "truncate -s 20G {log}; head -c 300000 /dev/urandom | tr -d '\\\\n\\\\r'".format(log=log)
    m = write_manifest(tmp_path, """
        project: hugelog
        cwd: {cwd}
        gpu_provider: "sim:3x80G,lag=0"
        oom_retry: {{delay: 1, max_attempts: 1}}
        retry: {{max_attempts: 1}}
        jobs:
          - id: oom
            cmd: "{junk}; printf '%s' '{oom}'; exit 1"
          - id: junk
            cmd: "{junk}; exit 3"
          - id: keepalive
            cmd: "while [ ! -e release ]; do sleep 0.1; done"
        """, junk=junk, oom=OOM_TEXT)
    run = submit(m)
    from fixtures_run import scheduler_pid
    sched = wait_for(lambda: scheduler_pid(ledger_db), timeout=30, what="the scheduler")
    wait_event(ledger_db, run, "stuck", "oom")
    wait_event(ledger_db, run, "stuck", "junk")
    peak = _vm_hwm_kib(sched)
    (tmp_path / "work" / "release").write_text("")
    final = wait_finished(ledger_db, run)
    logs = tmp_path / "work" / "experiment_queue" / run / "logs"
    assert os.path.getsize(str(logs / "oom.1.log")) > 20 * 2 ** 30          # really many GB (sparse)
    assert peak < 300 * 1024, "scheduler peaked at %d MiB" % (peak // 1024)
    (oom,) = events(ledger_db, run, ["oom_detected"])
    assert oom.job == "oom" and oom.data["oom_kind"] == "torch" and oom.data["requested_mib"] == 2048
    assert oom.data["line"].endswith("1.20 GiB is free.") and len(oom.data["line"]) <= 1000
    job = final.jobs["junk"]
    assert job.status.value == "stuck" and "exit code 3" in job.reason and len(job.reason) <= 500
    for e in events(ledger_db, run):
        assert len(str(e.data.get("log_tail", ""))) <= 4000 and len(str(e.data.get("reason", ""))) <= 1000
    # reading such a log back is bounded too
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    for args in (["logs", "oom"], ["history", "oom"], ["status", run]):
        out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "ledger.cli.main"] + args,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) < 300 * 1024, (args, out.stdout)


# ---- hostile ids, args and paths ---------------------------------------------------------

def _hostile_values(canary_dir):
    c = str(canary_dir)
    return [
        "two words  and\ttab",
        "it's \"quoted\" \\ back\\slash",
        "$(touch %s/dollar-paren)" % c,
        "`touch %s/backtick`" % c,
        "x; touch %s/semicolon" % c,
        "x && touch %s/and || touch %s/or" % (c, c),
        "x | touch %s/pipe > %s/redirect" % (c, c),
        "line one\ntouch %s/newline" % c,
        "$HOME $$ $0 $PATH * ? [a] ~ {a,b} !!",
        "unicodé 日本語 🚀 \u2028 \u00a0",
        "-rf",
        "",
    ]


def test_hostile_args_reach_the_job_byte_exact_and_no_injected_command_runs(tmp_path, ledger_db):
    """Grid values and args full of shell syntax pass through plan, submit, the scheduler, the
    wrapper and screen into the job's argv and environment unchanged; the cwd itself has a
    hostile name; none of the commands hidden in them runs (their canary files never appear)."""
    import json
    canaries = tmp_path / "canaries"
    canaries.mkdir()
    values = _hostile_values(canaries)
    cwd = tmp_path / "work dir 'q' \"d\" $(touch canaries-cwd) `x`"
    cwd.mkdir()
    (cwd / "argv.py").write_text(
        "import json, os, sys\n"
        "os.makedirs('out', exist_ok=True)\n"
        "json.dump({'argv': sys.argv[1:], 'env': os.environ.get('HOSTILE'), 'cwd': os.getcwd()},\n"
        "          open(os.path.join('out', os.environ['LEDGER_JOB'] + '.json'), 'w'))\n")
    manifest = {"project": "inject", "cwd": str(cwd), "gpu_provider": "sim:2x80G,lag=0", "jobs": []}
    for i, value in enumerate(values):
        manifest["jobs"].append({"id": "h%d" % i, "cmd": "python3 argv.py", "args": {"value": value},
                                 "env": {"HOSTILE": value}, "output_check": "out/h%d.json" % i})
    path = tmp_path / "inject.json"
    path.write_text(json.dumps(manifest))
    plan = ledger("plan", str(path), "--out-dir", str(tmp_path / "plan"))
    assert "%d jobs" % len(values) in plan.stdout
    run = submit(str(path))
    final = wait_finished(ledger_db, run, timeout=120)
    assert final.counts()["completed"] == len(values), {j.id: (j.status.value, j.reason) for j in final.jobs.values()}
    for i, value in enumerate(values):
        got = json.loads((cwd / "out" / ("h%d.json" % i)).read_text())
        assert got["argv"] == ["--value", value], (i, got)
        assert got["env"] == value and got["cwd"] == str(cwd)
    assert sorted(os.listdir(str(canaries))) == []
    assert not (cwd / "canaries-cwd").exists() and not os.path.exists("canaries-cwd")


@pytest.mark.parametrize("job_id", ["a b", "a;b", "$(x)", "`x`", "a\nb", "日本", "a'b", "../x", "-x"])
def test_hostile_job_ids_are_refused_at_plan_time_in_one_line(tmp_path, ledger_db, job_id):
    import json
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"project": "p", "cwd": str(tmp_path),
                                "jobs": [{"id": job_id, "cmd": "true"}]}))
    for command in (["plan", str(path)], ["submit", str(path), "--host", "local"]):
        res = ledger(*command, check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        (line,) = res.stderr.strip().splitlines()
        assert "job id" in line and "jobs[0].id" in line, line
    assert not os.path.exists(ledger_db)


# ---- private files -----------------------------------------------------------------------

def test_everything_the_ledger_keeps_is_private_and_jobs_keep_the_users_umask(tmp_path, ledger_db):
    """After a run, status, sql and a backup: every folder below the ledger's is 0700 and every
    file 0600 or 0700 (the GPU simulator's own folder aside: it plays the GPUs, not the ledger).
    The job's files still follow the user's umask (here 022)."""
    m = write_manifest(tmp_path, """
        project: private
        cwd: {cwd}
        gpu_provider: "sim:1x80G,lag=0"
        jobs: [{{id: a, cmd: "echo hi > out.txt", output_check: out.txt}}]
        """)
    old = os.umask(0o022)
    try:
        run = submit(m)
        wait_finished(ledger_db, run)
        ledger("status", run)
        ledger("sql", "SELECT COUNT(*) FROM events")
        ledger("pull", "-o", str(tmp_path / "copy.db"), "--host", "local")
    finally:
        os.umask(old)
    root = os.path.dirname(ledger_db)
    seen = []
    for folder, dirs, files in os.walk(root):
        if folder == os.path.join(root, "sim"):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != os.path.join(root, "sim")]
        assert os.stat(folder).st_mode & 0o777 == 0o700, folder
        for name in files:
            path = os.path.join(folder, name)
            seen.append(os.path.relpath(path, root))
            assert os.stat(path).st_mode & 0o077 == 0, "%s is %o" % (path, os.stat(path).st_mode & 0o777)
    assert {"ledger.db", "scheduler.log", "ledger.db.lock"} <= set(seen)
    assert any(p.endswith("a.1.exit") for p in seen) and any(p.endswith("a.1.pid") for p in seen)
    assert os.stat(str(tmp_path / "copy.db")).st_mode & 0o777 == 0o600
    assert os.stat(str(tmp_path / "work" / "out.txt")).st_mode & 0o777 == 0o644
